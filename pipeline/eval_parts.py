"""An evaluation (notebook 05) run in parts: each part scores some models and merges into what the
earlier parts of the same run wrote, so that a plan can evaluate models as soon as they are trained.
A GPU machine that is lost halfway then loses only the models it had not scored yet.

Parts merge soundly when they score the same documents with the same reference model (the first
dense model): every bpb_delta is then against the same per-document bits, and its paired bootstrap
draws the same resamples (they depend only on the seed and the number of documents).
"""
import json
import math
from pathlib import Path

import pandas as pd

from gmlib import frontier

FILES = ("eval_quality.csv", "eval_docs.csv", "eval_parus.csv", "eval_parus_items.csv", "eval_generations.json",
         "summary.json", "metrics.json")


def read_docs(path) -> pd.DataFrame:
    """05's per-document table (eval_docs.csv, or .csv.gz as results/ keeps it); an empty max_doc_tokens is NaN,
    every other empty cell an empty string."""
    return pd.read_csv(path, keep_default_na=False, na_values={"max_doc_tokens": [""]})


def load_earlier(run_dir: Path, parus_style: str) -> dict | None:
    """What earlier parts wrote in `run_dir`, or None when no evaluation has run there yet."""
    run_dir = Path(run_dir)
    if not (run_dir / "eval_quality.csv").is_file():
        return None
    missing = [f for f in FILES if not (run_dir / f).is_file()]
    if missing:
        raise FileNotFoundError(f"{run_dir}: an earlier evaluation wrote eval_quality.csv but not {missing}; "
                                "rerun it, or remove eval_quality.csv to start afresh")
    metrics = json.loads((run_dir / "metrics.json").read_text())
    summary = json.loads((run_dir / "summary.json").read_text())
    if "parus" not in metrics:
        raise ValueError(f"{run_dir / 'metrics.json'}: no 'parus' entry from an earlier evaluation")
    if summary.get("parus_style") != parus_style:
        raise ValueError(f"{run_dir / 'summary.json'}: the earlier evaluation summarised PARus style "
                         f"{summary.get('parus_style')!r}, this one {parus_style!r}; use the same parus_styles")
    return {"quality": pd.read_csv(run_dir / "eval_quality.csv"),
            "docs": read_docs(run_dir / "eval_docs.csv"),
            "parus_table": pd.read_csv(run_dir / "eval_parus.csv"),
            "parus_items": pd.read_csv(run_dir / "eval_parus_items.csv"),
            "parus": metrics["parus"],
            "texts": json.loads((run_dir / "eval_generations.json").read_text())["texts"],
            "routers": {n: m["router"] for n, m in summary["models"].items() if m.get("router")}}


def merge_rows(old: pd.DataFrame, new: pd.DataFrame) -> pd.DataFrame:
    """old's rows for models that `new` does not have, then new's rows: a model scored again replaces its old rows."""
    return pd.concat([old[~old["model"].isin(new["model"])], new], ignore_index=True)


def merge_quality(old: pd.DataFrame, new: pd.DataFrame, source) -> pd.DataFrame:
    """The quality table of all parts, the shared reference model first. Refuses parts that scored other
    documents (document or byte counts differ) or another reference (name or bpb differ)."""
    a, b = old.iloc[0], new.iloc[0]
    same_docs = (a["n_docs"], a["n_bytes"]) == (b["n_docs"], b["n_bytes"])
    if a["model"] != b["model"] or not same_docs or not math.isclose(a["bpb"], b["bpb"], rel_tol=1e-4):
        raise ValueError(f"{source}: the earlier evaluation's reference is {a['model']} (bpb {a['bpb']:.5f} on "
                         f"{a['n_docs']} documents, {a['n_bytes']} bytes), "
                         f"this one's {b['model']} (bpb {b['bpb']:.5f}, "
                         f"{b['n_docs']} documents, {b['n_bytes']} bytes); give every part the same first dense "
                         "model and documents")
    return pd.concat([new.iloc[:1], merge_rows(old.iloc[1:], new.iloc[1:])], ignore_index=True)


def merge_texts(old: dict, new: dict) -> dict:
    """{prompt: {model: text}} of both parts; new texts replace old ones of the same model."""
    return {p: {**old.get(p, {}), **new.get(p, {})} for p in {**old, **new}}


def ledger_rows_from_files(run_dir: Path, budget: str, budget_flops_6nd: float | None, stamp: dict,
                           n_boot: int = 1000, seed: int = 0) -> pd.DataFrame:
    """The ledger rows (gmlib.frontier.rows) of the evaluation saved in `run_dir`, from its files: a part
    whose machine was lost after it saved eval_docs, eval_quality and eval_facts (05 writes them in that
    order, then appends to the ledger) but before the append. With the evaluation's own budget, n_boot
    and seed (its parameters file) the rows are the ones 05 would have written: the bootstrap depends
    only on the seed and the documents. `stamp`: device, commit and date of the evaluation."""
    run_dir = Path(run_dir)
    docs_path = next((run_dir / f for f in ("eval_docs.csv", "eval_docs.csv.gz") if (run_dir / f).is_file()), None)
    for path in (docs_path, run_dir / "eval_quality.csv", run_dir / "eval_facts.json"):
        if path is None or not path.is_file():
            raise FileNotFoundError(f"{path or run_dir / 'eval_docs.csv'}: missing; the evaluation did not get "
                                    "that far, rerun it")
    docs = read_docs(docs_path)
    quality = pd.read_csv(run_dir / "eval_quality.csv").set_index("model")
    facts = json.loads((run_dir / "eval_facts.json").read_text())
    models = list(dict.fromkeys(docs["model"]))
    for name, have in (("eval_quality.csv", set(quality.index)), ("eval_facts.json", set(facts))):
        if missing := [m for m in models if m not in have]:
            raise ValueError(f"{run_dir / name}: no entry for {missing}, which {docs_path.name} scores; "
                             "the files are from different parts")
    info = quality[["params_total", "params_active", "train_gpu_seconds"]].to_dict("index")
    return frontier.rows(docs, info, facts, budget, budget_flops_6nd, stamp, n_boot=n_boot, seed=seed)
