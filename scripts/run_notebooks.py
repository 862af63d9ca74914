"""Run the pipeline's notebooks in order through papermill into results/<run-name>/.

  python scripts/run_notebooks.py --run-name demo                      # tiny CPU defaults
  python scripts/run_notebooks.py --run-name data --only 01 02 --params-dir params/data
  python scripts/run_notebooks.py --run-name experiment --only 03 -f params/experiment/03_dense124m.yaml --tag dense124m

Parameters, later ones winning: each notebook's defaults, `<params-dir>/<notebook stem>.yaml`
(when present), the --params-file YAML, then -p NAME VALUE. A --params-file or -p name goes only
to the selected notebooks whose `parameters` cell declares it (`-p vocab_size 3000 --only 01 02`
reaches 02 alone); a name that none of them declares is refused, with the notebooks that do.
Each executed notebook is saved as results/<run-name>/<stem>.ipynb, or <stem>.<tag>.ipynb with
--tag (several models of one notebook in one run); the notebooks themselves write their params,
metrics and figures beside it.

Interrupted or killed (Ctrl-C, SIGTERM, even SIGKILL), the runner takes its kernel and the
kernel's worker processes with it: a watchdog process waits on a pipe that only the runner holds
open, and when it closes kills every process started under this runner (they carry its pid in
the environment variable GM_RUNNER_PID). papermill starts each kernel in a session of its own,
so a signal to the runner's process group would not reach it.
"""
import argparse
import os
import signal
import sys
import time
from pathlib import Path

import papermill as pm
import yaml

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
from gmlib import config  # noqa: E402
from gmlib.paths import results_dir  # noqa: E402  (honours GM_RESULTS_DIR, as the notebooks do)


def read_yaml(path: Path) -> dict:
    try:
        params = yaml.safe_load(path.read_text()) or {}
    except (OSError, yaml.YAMLError) as e:
        sys.exit(f"{path}: cannot read parameters: {e}")
    if not isinstance(params, dict):
        sys.exit(f"{path}: expected a mapping of parameter names to values, got {type(params).__name__}")
    return params


def declared_params(nb: Path) -> set[str]:
    """The names assigned in the notebook's cell tagged `parameters` (read, not run: gmlib.config)."""
    try:
        return set(config.declared(nb))
    except ValueError as e:
        sys.exit(str(e))


def check_shared(notebooks: list[Path], shared: dict, where: str, all_notebooks: list[Path]):
    """Refuse a --params-file / -p name that none of the selected notebooks declares."""
    declared = {nb: declared_params(nb) for nb in notebooks}
    for k in shared:
        if not any(k in d for d in declared.values()):
            others = [nb.stem for nb in all_notebooks if k in declared_params(nb)]
            sys.exit(f"{where}: parameter {k!r} is declared by none of the selected notebooks "
                     f"({', '.join(nb.stem for nb in notebooks)}); "
                     + (f"it is a parameter of {', '.join(others)}" if others else "no notebook has it"))


def notebook_params(nb: Path, run_name: str, params_dir: Path | None, from_file: dict, from_cli: dict) -> dict:
    """The parameters of one notebook, later sources winning: run_name, <params_dir>/<stem>.yaml,
    then those of the --params-file YAML and of -p NAME VALUE that the notebook declares."""
    params = {"run_name": run_name}
    if params_dir and (f := params_dir / f"{nb.stem}.yaml").is_file():
        params.update(read_yaml(f))
    mine = declared_params(nb)
    return {**params, **{k: v for k, v in {**from_file, **from_cli}.items() if k in mine}}


RUNNER_ENV = "GM_RUNNER_PID"


def start_watchdog():
    """Fork a process that, once this one exits for any reason, kills the processes started
    under it (marked by RUNNER_ENV in their environment; the kernel's pool workers inherit it)."""
    if not Path("/proc/self/environ").exists():  # no /proc (macOS): nothing to find them by
        return
    me = os.getpid()
    os.environ[RUNNER_ENV] = str(me)
    r, w = os.pipe()  # not inherited by exec'd children (PEP 446): only this process holds w
    if os.fork() == 0:
        try:
            os.close(w)
            os.setsid()                           # away from the terminal's Ctrl-C and group kills
            signal.signal(signal.SIGINT, signal.SIG_IGN)
            while os.read(r, 1):                  # returns b"" once the runner is gone
                pass
            kill_marked(str(me))
        finally:
            os._exit(0)
    os.close(r)
    os.set_inheritable(w, False)
    _keep_open.append(w)


_keep_open = []  # the pipe's write end, open for the runner's whole life


def _interrupt(signum, frame):
    raise KeyboardInterrupt(f"signal {signum}")


def kill_marked(runner_pid: str) -> list[int]:
    """SIGKILL every process whose environment says it was started under `runner_pid`."""
    needle = f"{RUNNER_ENV}={runner_pid}".encode()
    killed = []
    for d in Path("/proc").iterdir():
        if not d.name.isdigit() or int(d.name) == os.getpid():
            continue
        try:
            if needle in (d / "environ").read_bytes().split(b"\0"):
                os.kill(int(d.name), signal.SIGKILL)
                killed.append(int(d.name))
        except (OSError, ProcessLookupError):  # gone already, or not ours to read
            pass
    return killed


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--run-name", default="demo")
    ap.add_argument("--only", nargs="*", help="notebook number prefixes to run, e.g. 01 02")
    ap.add_argument("--params-dir", type=Path, help="folder of <stem>.yaml parameter files")
    ap.add_argument("-f", "--params-file", type=Path, help="one YAML of parameters for the selected notebooks")
    ap.add_argument("-p", "--param", nargs=2, action="append", default=[], metavar=("NAME", "VALUE"),
                    help="a parameter for the selected notebooks that declare it (YAML value)")
    ap.add_argument("--tag", help="save the executed notebook as <stem>.<tag>.ipynb")
    ap.add_argument("--notebooks", type=Path, default=REPO / "notebooks", help="the folder of NN_*.ipynb to run")
    args = ap.parse_args(argv)

    everything = sorted(args.notebooks.glob("[0-9][0-9]_*.ipynb"))
    notebooks = everything
    if args.only:
        notebooks = [nb for nb in notebooks if nb.name[:2] in args.only]
    if not notebooks:
        sys.exit("no notebooks selected")
    out_dir = results_dir(args.run_name)
    from_file = read_yaml(args.params_file) if args.params_file else {}
    from_cli = {k: yaml.safe_load(v) for k, v in args.param}
    check_shared(notebooks, from_file, str(args.params_file), everything)
    check_shared(notebooks, from_cli, "-p", everything)
    start_watchdog()
    # SIGTERM (kill, a scheduler) unwinds like Ctrl-C, so papermill stops its kernel itself
    signal.signal(signal.SIGTERM, _interrupt)
    for nb in notebooks:
        params = notebook_params(nb, args.run_name, args.params_dir, from_file, from_cli)
        out = out_dir / (f"{nb.stem}.{args.tag}.ipynb" if args.tag else nb.name)
        t0 = time.time()
        print(f"== {nb.name} -> {out}  {params}", flush=True)
        pm.execute_notebook(str(nb), str(out), parameters=params, kernel_name="python3",
                            cwd=str(args.notebooks), progress_bar=False)
        print(f"   done in {time.time() - t0:.1f} s", flush=True)


if __name__ == "__main__":
    main()
