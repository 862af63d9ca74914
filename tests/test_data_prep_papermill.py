"""Notebook 01 (and 02) run through papermill with injected parameters into a temporary
results/work folder; a misspelt parameter name fails instead of being silently ignored."""
import json
from pathlib import Path

import pytest

pm = pytest.importorskip("papermill")
REPO = Path(__file__).resolve().parent.parent
SOURCES = ["news_ng", "wiki_leipzig", "social_ruarg_comments", "books_ruslit"]


@pytest.fixture
def env(tmp_path, monkeypatch, real_docs):  # real_docs: skip without the shared corpus
    monkeypatch.setenv("GM_RESULTS_DIR", str(tmp_path / "res"))
    monkeypatch.setenv("GM_WORK_DIR", str(tmp_path / "work"))
    monkeypatch.setenv("MPLCONFIGDIR", str(tmp_path / "mpl"))
    return tmp_path


def _run(nb, out, **params):
    pm.execute_notebook(str(REPO / "notebooks" / nb), str(out), parameters=params, kernel_name="python3",
                        cwd=str(REPO / "notebooks"), progress_bar=False)


def test_01_and_02_with_injected_parameters(env):
    _run("01_data.ipynb", env / "01.ipynb", run_name="pm", data_name="pmdata", sources=SOURCES,
         max_bytes_per_source=30_000, val_frac=0.2, test_frac=0.2, workers=1, max_dup_line_frac=0.5)
    res = env / "res" / "pm"
    A = json.loads((res / "audit.json").read_text())
    assert list(A["sources"]) == SOURCES
    assert all(0 < v["bytes_in"] <= 30_000 for v in A["sources"].values())
    assert A["params"]["max_dup_line_frac"] == 0.5
    assert all(A["splits"][s]["docs"] > 0 for s in ("train", "val", "test"))
    assert (env / "work" / "pmdata" / "clean" / "meta.json").is_file()
    assert (res / "audit.png").is_file() and (res / "audit_sources.csv").is_file()
    assert (res / "01_data.params.yaml").read_text().count("pmdata") == 1
    _run("02_tokenizer.ipynb", env / "02.ipynb", run_name="pm", data_name="pmdata", vocab_size=500,
         workers=1, num_threads=1)
    A = json.loads((res / "audit.json").read_text())
    assert all(A["tokens"][s] > 0 for s in ("train", "val", "test"))
    assert A["throughput_mb_s_per_core"]["tokenization"] > 0 and A["throughput_mb_s_per_core"]["cleaning"] > 0
    assert (env / "work" / "pmdata" / "tokenizer.model").is_file()
    assert (env / "work" / "pmdata" / "shards" / "train" / "meta.json").is_file()
    metrics = json.loads((res / "metrics.json").read_text())
    assert {"01_data", "02_tokenizer"} <= set(metrics["stages"])


def test_misspelt_parameter_fails(env):
    with pytest.raises(pm.PapermillExecutionError, match="unknown parameter"):
        _run("01_data.ipynb", env / "bad.ipynb", run_name="pm", max_byte_per_source=10)
