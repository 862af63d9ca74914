"""The audit of stage 01 (and the token counts of stage 02): what was removed, by which rule,
from which source, as results/<run>/audit.json, a pandas table and a bar chart.

audit.json:
  sources.<name>: role, docs_in, docs_out, bytes_in, bytes_out (UTF-8 bytes of the raw text in,
                  of the cleaned text out, after deduplication, before mixing), removed_docs and
                  removed_bytes per rule (raw bytes), read issues (undecodable lines, bad JSON,
                  missing text, truncated gzip, missing file)
  rules.<rule>:   docs and raw bytes removed over all sources (document rules, then exact_dup
                  and near_dup; dedup bytes are cleaned bytes)
  splits.<split>: docs and bytes after mixing (training copies counted), tokens filled by 02
  tokens.<split>: tokens in the shards ([bos] per document included), from 02
  wall_seconds:   per stage, as recorded when the stage ran (this_run_seconds: this invocation)
  throughput_mb_s_per_core: cleaning (raw MB per CPU-second in the workers: normalise, strip,
                  rules, MinHash) and tokenization (MB of cleaned text per CPU-second of encoding)
  examples.<rule>: a few removed documents (their cleaned text, cut to 300 characters)
  sources.<name>.residual: the residual-junk scan (residual.py) of the kept documents: per kind
                  (footer, credit, html, url, email_phone, mojibake, repeated_line) the share of
                  docs_out that still has it; residual_examples: the first offending lines
"""
import json
from pathlib import Path

import pandas as pd

from gmlib import atomic
from .clean import RULES
from .prepare import DEDUP_RULES
from .residual import KINDS as RESIDUAL_KINDS
from .split import SPLITS

ALL_RULES = (*RULES, *DEDUP_RULES)
READ_ISSUES = ("undecodable_lines", "bad_json", "no_text", "truncated", "empty_file")


def build(prep: dict, data_name: str, params: dict | None = None) -> dict:
    """The audit dict from `prepare.prepare`'s return value."""
    filtered, dd, sp = prep["filtered"], prep["dedup"], prep["split"]
    srcs, rules = {}, {r: {"docs": 0, "bytes": 0} for r in ALL_RULES}
    examples = {}
    cpu, raw_in = 0.0, 0
    for s in sp["sources"]:
        f = filtered[s]
        rem_docs = dict(f["removed"])
        rem_bytes = dict(f["removed_bytes"])
        for r in DEDUP_RULES:
            rem_docs[r] = len(dd["removed"][s][r])
            rem_bytes[r] = sp["counts"]["dedup_bytes"][s][r]
        docs_out = f["docs_kept"] - rem_docs["exact_dup"] - rem_docs["near_dup"]
        bytes_out = f["bytes_kept"] - rem_bytes["exact_dup"] - rem_bytes["near_dup"]
        srcs[s] = {"role": f["role"], "docs_in": f["docs_in"], "docs_out": docs_out, "bytes_in": f["bytes_in"],
                   "bytes_out": bytes_out, "removed_docs": rem_docs, "removed_bytes": rem_bytes,
                   "bytes_stripped": f["bytes_kept_raw"] - f["bytes_kept"],  # markup, boilerplate, whitespace
                   "lines_removed": f["lines_removed"], "missing": f["missing"],
                   "read_issues": {k: f["read"][k] for k in READ_ISSUES}, "read_errors": f["read"]["errors"],
                   "residual": {k: round(n / docs_out, 5) if docs_out else 0.0
                                for k, n in sp["counts"]["residual"][s].items()},
                   "residual_examples": sp.get("residual_examples", {}).get(s, {})}
        for r in ALL_RULES:
            rules[r]["docs"] += rem_docs[r]
            rules[r]["bytes"] += rem_bytes[r]
        for r, ex in f["examples"].items():
            examples.setdefault(r, []).extend({"source": s, "text": t} for t in ex[:1])
        cpu += f["cpu_seconds"]
        raw_in += f["bytes_in"]
    for r, ex in sp["dedup_examples"].items():
        # both lists hold the first removals of each rule in corpus order, so they line up
        examples[r] = [{"source": p["removed"][0], "duplicate_of": p["kept"], "text": t}
                       for p, t in zip(dd["pairs"][r], ex)]
    totals = {k: sum(v[k] for v in srcs.values()) for k in ("docs_in", "docs_out", "bytes_in", "bytes_out")}
    splits = {x: {"docs": sum(c["docs"] for c in sp["counts"][x].values()),
                  "bytes": sum(c["bytes"] for c in sp["counts"][x].values())} for x in SPLITS}
    return {"data_name": data_name, "params": params or {}, "sources": srcs, "rules": rules, "totals": totals,
            "splits": splits, "splits_by_source": {x: sp["counts"][x] for x in SPLITS},
            "weights": sp["weights"], "tokens": {},
            "throughput_mb_s_per_core": {"cleaning": round(raw_in / 1e6 / cpu, 3) if cpu else None,
                                         "tokenization": None},
            # how long each stage took when it actually ran (a rerun that reuses it does not reset this)
            "wall_seconds": {"filter": round(sum(filtered[s]["seconds"] for s in sp["sources"]), 2),
                             "dedup": dd.get("seconds", prep["wall_seconds"]["dedup"]),
                             "split": sp.get("seconds", prep["wall_seconds"]["split"])},
            "this_run_seconds": dict(prep["wall_seconds"]), "examples": examples}


def save(audit: dict, path) -> Path:
    atomic.write_json(path, audit)
    return Path(path)


def load(path) -> dict:
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no audit (run notebooks/01_data.ipynb for this run first)")
    return json.loads(path.read_text())


def update(path, **sections) -> dict:
    """Merge sections into an existing audit.json (dicts are merged one level deep)."""
    a = load(path)
    for k, v in sections.items():
        if isinstance(v, dict) and isinstance(a.get(k), dict):
            a[k].update(v)
        else:
            a[k] = v
    save(a, path)
    return a


def source_table(audit: dict) -> pd.DataFrame:
    """One row per source (plus a total): documents and MB in/out, documents removed per rule, and
    the residual-junk shares of the kept documents (res_<kind>, fractions of docs_out)."""
    rows = []
    for s, v in audit["sources"].items():
        rows.append({"source": s, "role": v["role"], "docs_in": v["docs_in"], "docs_out": v["docs_out"],
                     "mb_in": v["bytes_in"] / 1e6, "mb_out": v["bytes_out"] / 1e6,
                     "kept_bytes_pct": 100 * v["bytes_out"] / v["bytes_in"] if v["bytes_in"] else 0.0,
                     **{r: v["removed_docs"][r] for r in ALL_RULES},
                     "read_skips": sum(v["read_issues"][k] for k in ("bad_json", "no_text", "truncated", "empty_file"))
                     + v["missing"],
                     **{f"res_{k}": v.get("residual", {}).get(k, 0.0) for k in RESIDUAL_KINDS}})
    df = pd.DataFrame(rows)
    total = df.drop(columns=["source", "role"]).sum(numeric_only=True)
    total["kept_bytes_pct"] = 100 * total["mb_out"] / total["mb_in"] if total["mb_in"] else 0.0
    for k in RESIDUAL_KINDS:  # shares: the total is the share over all kept documents
        total[f"res_{k}"] = (df[f"res_{k}"] * df["docs_out"]).sum() / total["docs_out"] if total["docs_out"] else 0.0
    df.loc[len(df)] = {"source": "TOTAL", "role": "", **total.to_dict()}
    return df


def rule_table(audit: dict) -> pd.DataFrame:
    total = audit["totals"]["bytes_in"] or 1
    return pd.DataFrame([{"rule": r, "docs_removed": v["docs"], "mb_removed": v["bytes"] / 1e6,
                          "pct_of_bytes_in": 100 * v["bytes"] / total} for r, v in audit["rules"].items()])


RULE_COLORS = ["#000000", "#9e9ac8", "#ff7f0e", "#fdae6b", "#8c564b", "#e377c2", "#d62728", "#ff9896",
               "#1f77b4", "#9ecae1"]


def plot(audit: dict):
    """One bar per source, as a share of its raw bytes: kept, stripped from kept documents
    (markup, boilerplate, whitespace), and removed by each rule. The source's size is written
    at the end of its bar."""
    import matplotlib.pyplot as plt
    names = list(audit["sources"])
    src = audit["sources"]
    total = [max(src[s]["bytes_in"], 1) for s in names]
    fig, ax = plt.subplots(figsize=(10, 0.32 * len(names) + 1.6))
    segments = [("kept", "#2ca02c", [src[s]["bytes_out"] for s in names]),
                ("stripped (markup, boilerplate)", "#bcbd22", [src[s]["bytes_stripped"] for s in names])]
    segments += [(r, RULE_COLORS[k % len(RULE_COLORS)], [src[s]["removed_bytes"][r] for s in names])
                 for k, r in enumerate(ALL_RULES)]
    left = [0.0] * len(names)
    for label, color, vals in segments:
        pct = [100 * v / t for v, t in zip(vals, total)]
        if sum(pct) == 0:
            continue
        ax.barh(names, pct, left=left, color=color, label=label)
        left = [a + b for a, b in zip(left, pct)]
    for y, s in enumerate(names):
        ax.text(101, y, f"{src[s]['bytes_in'] / 1e6:.2f} MB", va="center", fontsize=7)
    ax.set_xlim(0, 112)
    ax.set_xlabel("share of the source's raw UTF-8 bytes (%)")
    ax.set_title(f"Data audit ({audit['data_name']}): kept, stripped, and removed by rule")
    ax.invert_yaxis()
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.0, 1.0))
    fig.tight_layout()
    return fig


def bytes_per_token_table(sh: dict) -> pd.DataFrame:
    """Stage 02's per-source compression, from shards.tokenize_all's record: MB of cleaned text, tokens
    and UTF-8 bytes per token over all splits."""
    rows = []
    for s in sh["train"]["per_source"]:
        b = sum(sh[x]["per_source"][s]["bytes"] for x in sh)
        t = sum(sh[x]["per_source"][s]["tokens"] for x in sh)
        rows.append({"source": s, "mb": b / 1e6, "tokens": t, "bytes_per_token": b / t if t else float("nan")})
    return pd.DataFrame(rows)


def bytes_per_token_plot(bpt: pd.DataFrame, overall: float, vocab_size: int):
    """Bytes per token by source (bytes_per_token_table), the overall value as a dashed line."""
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(8, 0.3 * len(bpt) + 1.5))
    ax.barh(bpt["source"], bpt["bytes_per_token"], color="tab:blue")
    ax.axvline(overall, color="k", ls="--", label=f"all: {overall:.2f}")
    ax.set_xlabel("UTF-8 bytes per token")
    ax.set_title(f"Tokenizer {vocab_size} pieces: bytes per token by source")
    ax.invert_yaxis()
    ax.legend()
    return fig


def segmentations(sp, docs, n_sources: int = 8, chars: int = 200) -> pd.DataFrame:
    """How the tokenizer cuts the first `chars` characters of the first document of each of the
    first n_sources sources among `docs` ({"source", "text"} records)."""
    from .tokenizer import segment
    examples = {}
    for d in docs:
        examples.setdefault(d["source"], d["text"][:chars])
    return pd.DataFrame([{"source": s, "pieces": segment(sp, t)} for s, t in list(examples.items())[:n_sources]])
