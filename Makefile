# gm: two commands for a fresh clone (README): `make demo` runs the whole pipeline on the
# small default config on CPU; `make test` runs the test suite. Each builds .venv if missing.
PY := .venv/bin/python
VENV := .venv/.installed
# keep notebook kernels and matplotlib caches inside the project
export IPYTHONDIR := $(CURDIR)/.cache/ipython
export MPLCONFIGDIR := $(CURDIR)/.cache/matplotlib
export JUPYTER_CONFIG_DIR := $(CURDIR)/.cache/jupyter
# and its data (kernel specs): a python3 kernel spec in the user's home cannot replace the project's interpreter
export JUPYTER_DATA_DIR := $(CURDIR)/.cache/jupyter-data
export PYTHONUNBUFFERED := 1

.PHONY: demo test test-fast lab clean-demo

$(VENV): requirements.txt pyproject.toml
	test -x $(PY) || python3 -m venv .venv
	$(PY) -m pip install -q -r requirements.txt
	$(PY) -m pip install -q --no-deps -e .
	touch $@

demo: $(VENV)
	mkdir -p .cache
	$(PY) scripts/run_notebooks.py --run-name demo

# tests write into .cache/test-*, never into results/ or work/
test: $(VENV)
	rm -rf .cache/test-results .cache/test-work
	mkdir -p .cache
	$(PY) -m ruff check .
	GM_RESULTS_DIR=$(CURDIR)/.cache/test-results GM_WORK_DIR=$(CURDIR)/.cache/test-work \
	  $(PY) -m pytest -q tests
	GM_RESULTS_DIR=$(CURDIR)/.cache/test-results GM_WORK_DIR=$(CURDIR)/.cache/test-work \
	  $(PY) -m pytest -q --nbval-lax --nbval-current-env notebooks

test-fast: $(VENV)
	$(PY) -m pytest -q -x tests

# --allow-root: containers often run as root, where Jupyter refuses to start without it; LAB_ARGS for more
# (tests/test_lab.py starts it headless: --no-browser, a port and a token)
lab: $(VENV)
	$(PY) -m jupyter lab --allow-root $(LAB_ARGS) notebooks

clean-demo:
	rm -rf work/demo results/demo
