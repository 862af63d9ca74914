"""Append to the frontier ledger the rows of an evaluation part that saved its tables but was cut off
before its last step (the ledger append), from those tables, with the evaluation's own code.

  python scripts/ledger_from_eval.py results/frontier/b4x2 results/frontier/b4x2/05_evaluate.settings.params.yaml

PARAMS is the part's parameters file (budget, budget_flops_6nd, ledger, n_boot, seed); the rows are
gmlib.frontier.rows of the run folder's eval_docs.csv(.gz), eval_quality.csv and eval_facts.json
(pipeline.eval_parts.ledger_rows_from_files), so they are what notebook 05 would have written. The
stamp (device, commit) is the run's last finished 05_evaluate stage in metrics.json, the machine and
tree of the same plan; the date is that stage's. Only models not yet in the ledger are added, and only
when the budget's rows already there come out equal when recomputed (a check of the recomputation); if
the part scored a better dense model, every row of the budget is rewritten, as notebook 05 would have.
"""
import argparse
import json
import sys
from pathlib import Path

import numpy as np
import yaml

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # runs from a clone without installing

from gmlib import frontier  # noqa: E402
from gmlib.paths import results_dir  # noqa: E402
from pipeline.eval_parts import ledger_rows_from_files  # noqa: E402


def stamp_of(run_dir: Path) -> dict:
    stages = json.loads((run_dir / "metrics.json").read_text()).get("stages", {})
    done = sorted((s["finished_at"], s) for n, s in stages.items() if n.startswith("05_evaluate"))
    if not done:
        raise ValueError(f"{run_dir / 'metrics.json'}: no finished 05_evaluate stage to take the device and "
                         "commit from")
    s = done[-1][1]
    return {"device": s["device"], "commit": s["git_commit"], "date": s["finished_at"][:10]}


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("run_dir", type=Path)
    ap.add_argument("params", type=Path, help="the cut-off part's 05_evaluate.<part>.params.yaml")
    args = ap.parse_args(argv)
    p = yaml.safe_load(args.params.read_text())
    if not p.get("ledger"):
        raise SystemExit(f"{args.params}: this evaluation has no ledger")
    rows = ledger_rows_from_files(args.run_dir, p["budget"], p.get("budget_flops_6nd"), stamp_of(args.run_dir),
                                  n_boot=p["n_boot"], seed=p["seed"])
    path = results_dir(p["ledger"]) / "runs.csv"
    old = frontier.read(path).query("budget == @p['budget']").set_index("model") if path.is_file() else None
    old = old if old is not None and len(old) else None
    moved = None
    if old is not None:
        if gone := sorted(set(old.index) - set(rows["model"])):
            raise SystemExit(f"{path}: budget {p['budget']} has rows for {gone}, which {args.run_dir} does not "
                             "score; these are not that evaluation's tables")
        new = rows.set_index("model").loc[old.index]
        if set(new["best_dense"]) != set(old["best_dense"]):  # every paired difference moves: 05 rewrites them all
            moved = f"{old['best_dense'].iloc[0]} -> {new['best_dense'].iloc[0]}"
        else:
            num = [c for c in frontier.COLUMNS if c not in frontier.KEY and new[c].dtype.kind == "f"]
            close = np.isclose(new[num].to_numpy(float), old[num].to_numpy(float), rtol=1e-9, equal_nan=True)
            if not close.all():
                bad = sorted({num[j] for j in np.nonzero(~close)[1]})
                raise SystemExit(f"{path}: the recomputed rows of {list(old.index[~close.all(axis=1)])} differ from "
                                 f"the ledger's in {bad}: the saved tables or {args.params} are not that "
                                 "evaluation's; nothing written")
    # new models only, the rows already there untouched (they recomputed equal); all of them when the best
    # dense model moved, as notebook 05 would have written them
    frontier.update(path, rows if old is None or moved else rows[~rows["model"].isin(old.index)])
    added = sorted(set(rows["model"]) - set(old.index if old is not None else []))
    said = (f"; the best dense model moved ({moved}), so the budget's {len(old)} earlier rows were rewritten"
            if moved else f"; the {len(old)} rows already there recomputed equal" if old is not None else "")
    print(f"{path}: {len(added)} rows added for budget {p['budget']}: {added}{said}")

if __name__ == "__main__":
    main()
