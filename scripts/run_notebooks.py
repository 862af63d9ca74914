"""Run the pipeline's notebooks in order through papermill into results/<run-name>/.

  python scripts/run_notebooks.py --run-name demo                      # tiny CPU defaults
  python scripts/run_notebooks.py --run-name data --only 01 02 --params-dir params/data
  python scripts/run_notebooks.py --run-name experiment --only 03 -f params/experiment/03_dense124m.yaml --tag dense124m

Parameters, later ones winning: each notebook's defaults, `<params-dir>/<notebook stem>.yaml`
(when present), the --params-file YAML, then -p NAME VALUE. Each executed notebook is saved as
results/<run-name>/<stem>.ipynb, or <stem>.<tag>.ipynb with --tag (several models of one notebook
in one run); the notebooks themselves write their params, metrics and figures beside it.
"""
import argparse
import sys
import time
from pathlib import Path

import papermill as pm
import yaml

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
from gmlib.paths import results_dir  # noqa: E402  (honours GM_RESULTS_DIR, as the notebooks do)


def read_yaml(path: Path) -> dict:
    try:
        params = yaml.safe_load(path.read_text()) or {}
    except (OSError, yaml.YAMLError) as e:
        sys.exit(f"{path}: cannot read parameters: {e}")
    if not isinstance(params, dict):
        sys.exit(f"{path}: expected a mapping of parameter names to values, got {type(params).__name__}")
    return params


def notebook_params(nb: Path, run_name: str, params_dir: Path | None, from_file: dict, from_cli: dict) -> dict:
    """The parameters of one notebook, later sources winning: run_name, <params_dir>/<stem>.yaml,
    the --params-file YAML, -p NAME VALUE."""
    params = {"run_name": run_name}
    if params_dir and (f := params_dir / f"{nb.stem}.yaml").is_file():
        params.update(read_yaml(f))
    return {**params, **from_file, **from_cli}


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--run-name", default="demo")
    ap.add_argument("--only", nargs="*", help="notebook number prefixes to run, e.g. 01 02")
    ap.add_argument("--params-dir", type=Path, help="folder of <stem>.yaml parameter files")
    ap.add_argument("-f", "--params-file", type=Path, help="one YAML of parameters for the selected notebooks")
    ap.add_argument("-p", "--param", nargs=2, action="append", default=[], metavar=("NAME", "VALUE"),
                    help="a parameter for every notebook (YAML value)")
    ap.add_argument("--tag", help="save the executed notebook as <stem>.<tag>.ipynb")
    args = ap.parse_args(argv)

    notebooks = sorted(REPO.glob("notebooks/[0-9][0-9]_*.ipynb"))
    if args.only:
        notebooks = [nb for nb in notebooks if nb.name[:2] in args.only]
    if not notebooks:
        sys.exit("no notebooks selected")
    out_dir = results_dir(args.run_name)
    from_file = read_yaml(args.params_file) if args.params_file else {}
    from_cli = {k: yaml.safe_load(v) for k, v in args.param}
    for nb in notebooks:
        params = notebook_params(nb, args.run_name, args.params_dir, from_file, from_cli)
        out = out_dir / (f"{nb.stem}.{args.tag}.ipynb" if args.tag else nb.name)
        t0 = time.time()
        print(f"== {nb.name} -> {out}  {params}", flush=True)
        pm.execute_notebook(str(nb), str(out), parameters=params, kernel_name="python3",
                            cwd=str(REPO / "notebooks"), progress_bar=False)
        print(f"   done in {time.time() - t0:.1f} s", flush=True)


if __name__ == "__main__":
    main()
