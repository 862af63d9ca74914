"""Run the pipeline's notebooks in order through papermill into results/<run-name>/.

  python scripts/run_notebooks.py --run-name demo                      # tiny CPU defaults
  python scripts/run_notebooks.py --run-name data --only 01 02 --params-dir params/data

With --params-dir, `<dir>/<notebook stem>.yaml` (when present) overrides that notebook's
defaults. Each executed notebook is saved as results/<run-name>/<stem>.ipynb; the notebooks
themselves write their params, metrics and figures beside it.
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


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--run-name", default="demo")
    ap.add_argument("--only", nargs="*", help="notebook number prefixes to run, e.g. 01 02")
    ap.add_argument("--params-dir", type=Path, help="folder of <stem>.yaml parameter files")
    ap.add_argument("-p", "--param", nargs=2, action="append", default=[], metavar=("NAME", "VALUE"),
                    help="a parameter for every notebook (YAML value)")
    args = ap.parse_args(argv)

    notebooks = sorted(REPO.glob("notebooks/[0-9][0-9]_*.ipynb"))
    if args.only:
        notebooks = [nb for nb in notebooks if nb.name[:2] in args.only]
    if not notebooks:
        sys.exit("no notebooks selected")
    out_dir = results_dir(args.run_name)
    common = {k: yaml.safe_load(v) for k, v in args.param}
    for nb in notebooks:
        params = {"run_name": args.run_name, **common}
        if args.params_dir:
            f = args.params_dir / f"{nb.stem}.yaml"
            if f.is_file():
                params.update(yaml.safe_load(f.read_text()) or {})
        t0 = time.time()
        print(f"== {nb.name} -> {out_dir / nb.name}  {params}", flush=True)
        pm.execute_notebook(str(nb), str(out_dir / nb.name), parameters=params, kernel_name="python3",
                            cwd=str(REPO / "notebooks"), progress_bar=False)
        print(f"   done in {time.time() - t0:.1f} s", flush=True)


if __name__ == "__main__":
    main()
