"""The compute frontier: one ledger row per evaluated model, and what is drawn from the ledger.

The question of the repository is whether gm beats the best dense model at the same training
compute. One budget cannot answer it (BTM and c-BTM find that expert ensembles lose at small
compute and win as it grows), so the experiment trains dense models and gm variants at several
budgets and keeps every evaluated model in one table, `results/frontier/runs.csv`:
  - rows are written only by the evaluation (notebook 05 with `ledger` set), from the same
    per-document bits for every model, so every number in the ledger is measured the same way;
  - each row's `delta_*_vs_best_dense` is a *paired* difference against the best dense model of
    the same evaluation (lowest macro bpb among its dense models), computed by
    gmlib.evaluate.quality_from_docs from the per-document bits (documents resampled within each
    source for the macro bpb);
  - a rerun of a budget's evaluation replaces that budget's rows of the same models, so a plan
    may evaluate a budget in parts and the ledger grows as models finish.
What this module draws: the dense envelope (the best dense model at each budget) and one line per
gm family (the same gm settings across budgets), against 6ND FLOPs or against GPU-seconds.
"""
from pathlib import Path

import numpy as np
import pandas as pd

from . import atomic, evaluate
from .checkpoint import read_meta
from .model import PRESETS, GPTConfig

COLUMNS = ["budget", "budget_flops_6nd", "model", "kind", "family", "tokens", "flops_6nd", "train_gpu_seconds",
           "model_size", "n_experts", "seed_fraction", "train_top_r", "router", "k", "pool", "weight_decay",
           "params_total", "params_active", "bpb", "bpb_ci_lo", "bpb_ci_hi", "bpb_macro", "bpb_macro_ci_lo",
           "bpb_macro_ci_hi", "best_dense", "delta_vs_best_dense", "delta_ci_lo", "delta_ci_hi",
           "delta_macro_vs_best_dense", "delta_macro_ci_lo", "delta_macro_ci_hi", "max_doc_tokens", "n_docs",
           "device", "commit", "date"]
KEY = ["budget", "model"]
TOLERANCE = 0.01   # how far a model's 6ND compute may be from its budget's (rounding to whole steps)
SAME = ["n_docs", "max_doc_tokens", "best_dense"]  # what every row of one budget must share


def read(path) -> pd.DataFrame:
    path = Path(path)
    if not path.is_file():
        return pd.DataFrame(columns=COLUMNS)
    df = pd.read_csv(path)
    if missing := [c for c in COLUMNS if c not in df.columns]:
        raise ValueError(f"{path}: not a frontier ledger (missing columns {missing})")
    return df[COLUMNS]


def update(path, rows: pd.DataFrame) -> pd.DataFrame:
    """Add `rows` to the ledger at `path`, replacing rows with the same (budget, model); atomic. Refused
    when a budget would then hold rows scored on other documents or against another reference."""
    if missing := [c for c in COLUMNS if c not in rows.columns]:
        raise ValueError(f"frontier rows lack columns {missing}")
    with atomic.file_lock(Path(path).with_name(f".{Path(path).name}.lock")):  # two plans may evaluate at once
        return _update(Path(path), rows)


def _update(path: Path, rows: pd.DataFrame) -> pd.DataFrame:
    old = read(path)
    keep = ~old.set_index(KEY).index.isin(rows.set_index(KEY).index) if len(old) else []
    df = pd.concat([old[keep], rows[COLUMNS]], ignore_index=True) if len(old) else rows[COLUMNS].copy()
    for b, g in df.groupby("budget"):  # rows of one budget come from one scoring: same documents, same reference
        if bad := [c for c in SAME if g[c].astype(str).nunique() > 1]:
            raise ValueError(f"{path}: budget {b!r} would mix rows with different {bad}; evaluate all of the "
                             f"budget's models together (05's merge_earlier) or give the new ones another budget")
    df = df.sort_values(["budget_flops_6nd", "kind", "model"], kind="stable", ignore_index=True)
    atomic.write_text(path, df.to_csv(index=False))
    return df


def _size(cfg: dict) -> str:
    """The gmlib.model preset a model config was made from, else its parameter count."""
    for name, p in PRESETS.items():
        if all(cfg.get(k) == v for k, v in p.items() if k != "n_head"):
            return name
    return f"{GPTConfig(**cfg).n_params / 1e6:.0f}M"


def facts(spec: dict, gm_info: dict | None = None) -> dict:
    """What a ledger row says of how a model of 05 was trained, read from its training records: a
    dense checkpoint's header, or the gm.json of its gm (`gm_info`). The compute of a gm's mixture
    and oracle is the whole gm's (seed run included), of its seed the seed run's, of one of its
    experts the seed run's plus the expert's own."""
    if spec["kind"] == "dense":
        meta = read_meta(spec["path"])
        acct, tc = meta.get("accounting") or {}, meta.get("train_config") or {}
        size, wd = _size(meta["config"]), tc.get("weight_decay")
        return {"kind": "dense", "family": f"dense {size} wd={wd:g}" if wd is not None else f"dense {size}",
                "model_size": size, "n_experts": 1, "weight_decay": wd, "tokens": acct.get("tokens"),
                "flops_6nd": acct.get("flops_6nd")}
    if spec["kind"] != "gm":
        return {"kind": spec["kind"], "family": spec["kind"], "n_experts": len(spec.get("experts", []))}
    g, cfg = gm_info, gm_info["config"]
    acct, seed_acct = g["accounting"], g["accounting"].get("seed_run") or {}
    out = {"kind": "gm", "model_size": cfg["model_size"], "n_experts": g["n_experts"], "router": g["router"],
           "seed_fraction": g.get("seed_fraction", 0.0), "train_top_r": g.get("train_top_r", 1),
           "weight_decay": cfg["train"]["weight_decay"], "tokens": acct["tokens"], "flops_6nd": acct["flops_6nd"]}
    out["family"] = f"{g['router']} seed={out['seed_fraction']:g} r={out['train_top_r']}"
    if spec.get("seed"):
        out.update(kind="gm-seed", tokens=seed_acct.get("tokens"), flops_6nd=seed_acct.get("flops_6nd"))
    elif "expert" in spec:
        own = g["records"][spec["expert"]]["accounting"]
        out.update(kind="gm-expert", tokens=own["tokens"] + seed_acct.get("tokens", 0),
                   flops_6nd=own["flops_6nd"] + seed_acct.get("flops_6nd", 0))
    else:
        out.update(k=spec["k"], pool=spec.get("pool", "linear"))
    return out


def rows(doc_rows: pd.DataFrame, info: dict, model_facts: dict, budget: str, budget_flops_6nd: float | None,
         stamp: dict, n_boot: int = 1000, seed: int = 0) -> pd.DataFrame:
    """The ledger rows of one evaluation: every model of its per-document table (05's eval_docs),
    scored by gmlib.evaluate.quality_from_docs with the best dense model (lowest macro bpb) as the
    reference of the paired differences. model_facts: {model: facts(...)}; info: 05's
    {model: params_total, params_active, train_gpu_seconds}; stamp: device, commit, date."""
    per_source = doc_rows.groupby(["model", "source"])[["bits", "n_bytes"]].sum()
    macro = (per_source["bits"] / per_source["n_bytes"]).groupby("model").mean()  # what quality_from_docs reports
    dense = [n for n in macro.index if model_facts[n]["kind"] == "dense"]
    best = macro[dense].idxmin() if dense else None
    if best is not None:  # the reference goes first: quality_from_docs pairs every model with it
        order = [best] + [n for n in dict.fromkeys(doc_rows["model"]) if n != best]
        doc_rows = pd.concat([doc_rows[doc_rows["model"] == n] for n in order], ignore_index=True)
    if budget_flops_6nd is None:
        budget_flops_6nd = model_facts[best]["flops_6nd"] if best is not None else np.nan
    for n, f in model_facts.items():  # a model trained with more compute than the budget is not at this budget
        flops = f.get("flops_6nd")
        over = flops is not None and np.isfinite(budget_flops_6nd) and flops > budget_flops_6nd * (1 + TOLERANCE)
        off = f["kind"] == "dense" and flops is not None and abs(flops / budget_flops_6nd - 1) > TOLERANCE
        if n in macro.index and (over or off):
            raise ValueError(f"{n}: trained {flops:.4g} 6ND FLOPs, not the budget {budget}'s {budget_flops_6nd:.4g} "
                             f"(more than {TOLERANCE:.0%} off); evaluate it at its own budget")
    q = evaluate.quality_from_docs(doc_rows, info, n_boot, seed).set_index("model")
    out = []
    for n, r in q.iterrows():
        row = {c: np.nan for c in COLUMNS}
        row.update({k: v for k, v in model_facts[n].items() if k in COLUMNS})
        row.update(budget=budget, budget_flops_6nd=budget_flops_6nd, model=n, bpb=r["bpb"], bpb_ci_lo=r["bpb_lo"],
                   bpb_ci_hi=r["bpb_hi"], bpb_macro=r["bpb_macro"], bpb_macro_ci_lo=r["bpb_macro_lo"],
                   bpb_macro_ci_hi=r["bpb_macro_hi"], params_total=r["params_total"], params_active=r["params_active"],
                   train_gpu_seconds=r["train_gpu_seconds"], max_doc_tokens=r["max_doc_tokens"], n_docs=r["n_docs"],
                   **stamp)
        if best is not None:
            row.update(best_dense=best, delta_vs_best_dense=r["bpb_delta"], delta_ci_lo=r["bpb_delta_lo"],
                       delta_ci_hi=r["bpb_delta_hi"], delta_macro_vs_best_dense=r["bpb_macro_delta"],
                       delta_macro_ci_lo=r["bpb_macro_delta_lo"], delta_macro_ci_hi=r["bpb_macro_delta_hi"])
        out.append(row)
    return pd.DataFrame(out, columns=COLUMNS)


def best_dense(df: pd.DataFrame) -> pd.DataFrame:
    """The best dense row (lowest macro bpb) of every budget: the dense envelope."""
    d = df[df["kind"] == "dense"]
    return d.loc[d.groupby("budget")["bpb_macro"].idxmin()].sort_values("budget_flops_6nd", ignore_index=True)


def best_table(df: pd.DataFrame) -> pd.DataFrame:
    """Per budget: the best dense model and the best gm mixture (by macro bpb), with the gm's paired
    difference from that dense model (micro and macro, 95% intervals) and its active parameters."""
    rows = []
    for b, g in df.groupby("budget", sort=False):
        dense, mix = g[g["kind"] == "dense"], g[g["kind"] == "gm"]
        if dense.empty or mix.empty:
            continue
        d, m = dense.loc[dense["bpb_macro"].idxmin()], mix.loc[mix["bpb_macro"].idxmin()]
        rows.append({"budget": b, "budget_flops_6nd": d["budget_flops_6nd"], "best_dense": d["model"],
                     "dense_bpb_macro": d["bpb_macro"], "best_gm": m["model"], "gm_bpb_macro": m["bpb_macro"],
                     "gm_params_active": m["params_active"],
                     "delta_macro": m["delta_macro_vs_best_dense"], "delta_macro_ci": _ci(m, "delta_macro"),
                     "delta_macro_rel": m["delta_macro_vs_best_dense"] / d["bpb_macro"],
                     "delta_micro": m["delta_vs_best_dense"], "delta_micro_ci": _ci(m, "delta")})
    return pd.DataFrame(rows).sort_values("budget_flops_6nd", ignore_index=True) if rows else pd.DataFrame(rows)


def _ci(r, prefix):
    return f"[{r[prefix + '_ci_lo']:+.4f}, {r[prefix + '_ci_hi']:+.4f}]"


def figure(df: pd.DataFrame, x: str = "budget_flops_6nd"):
    """Macro bpb (95% intervals) against training compute on a log axis: the dense envelope, every
    dense model as a point, and each gm family (its best k and pool per budget) as a line. Against
    FLOPs every model sits at its budget (each trains the budget's 6ND, to within rounding), the
    series side by side; against GPU-seconds at its own measured seconds."""
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(8, 5))
    mix = df[df["kind"] == "gm"]
    families = sorted(mix["family"].dropna().unique())
    n_series = len(families) + 2

    def bars(rows, i, **kw):
        xs = rows[x] * (1.03 ** (i - n_series / 2)) if x == "budget_flops_6nd" else rows[x]  # dodge, on a log axis
        err = np.vstack([rows["bpb_macro"] - rows["bpb_macro_ci_lo"], rows["bpb_macro_ci_hi"] - rows["bpb_macro"]])
        return ax.errorbar(xs, rows["bpb_macro"], yerr=err, capsize=3, **kw)

    dense = df[df["kind"] == "dense"]
    if len(dense):
        bars(dense, 0, fmt="o", color="0.6", alpha=0.7, label="dense (every size and decay)")
        bars(best_dense(df), 1, fmt="s-", color="k", lw=2, label="dense envelope (best per budget)")
    for i, fam in enumerate(families, start=2):
        g = mix[mix["family"] == fam]
        best = g.loc[g.groupby("budget")["bpb_macro"].idxmin()].sort_values(x)
        bars(best, i, fmt="o--", label=f"gm {fam} (best k, pool)")
    ax.set_xscale("log")
    ax.set_xlabel("training compute, 6·N·tokens (FLOPs)" if x == "budget_flops_6nd" else "training GPU-seconds")
    ax.set_ylabel("macro bits per byte on the test split (lower is better)")
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=7)
    return fig


def meets_goal(best: pd.DataFrame, goal: float) -> pd.Series:
    """Per budget of best_table: does the best gm beat the best dense model by at least `goal` (a fraction)
    in macro bpb, with the whole 95% interval of the macro difference below zero and micro bpb better too?"""
    ci_hi = best["delta_macro_ci"].map(lambda s: float(s.strip("[]").split(",")[1]))
    return (best["delta_macro_rel"] <= -goal) & (ci_hi < 0) & (best["delta_micro"] < 0)
