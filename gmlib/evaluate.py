"""Evaluation, the same code path for every model (anything with gmlib.lm's interface:
a dense GPT, one gm expert, the gm mixture).

Held-out quality (the article's Table 2, made tokenizer-independent):
  bits per byte   sum over documents of -log2 p(x_t | x_<t) over every token but the leading
                  bos, divided by the documents' UTF-8 bytes (the bytes of the text, as stored
                  in the shards). It does not depend on the tokenizer, so models with different
                  vocabularies compare.
  per-token ppl   exp(total nats / number of predicted tokens)
  per-word ppl    exp(total nats / number of whitespace-separated words)
  95% intervals   percentile bootstrap over documents (the documents are the independent units;
                  tokens inside a document are not), fixed seed, the same resamples for all three.
  macro bpb       the mean over sources of each source's bpb: every source counts once, so two
                  long novels cannot be most of the score (byte-weighted "micro" bpb is the first
                  line). Its interval resamples documents within each source (stratified).
  paired deltas   a model's bpb (micro and macro) minus the reference model's, from per-document
                  bits on the same resamples: the honest test of "better".
  max_doc_tokens  an optional cap: only a document's first max_doc_tokens tokens are scored (and
                  their bytes counted), for every model alike.
Every held-out table comes from one per-document table (`doc_table`, saved as eval_docs.csv):
one row per (model, document) with its source, bytes, tokens and bits, and for a gm mixture the
expert the router assigns the document to as in training and the experts the mixture ended on.
The oracle row of a gm (the best expert per document, chosen with the document's own loss) is
computed from its experts' rows: an upper bound on routing, not a model.

The documents come from gmlib.eval_docs, the models from gmlib.registry; PARus is gmlib.parus and the
generation prompts gmlib.generation.
"""
import math
import time

import numpy as np
import pandas as pd

from .eval_docs import EvalDoc


def bootstrap(stat, n: int, n_boot: int = 1000, seed: int = 0, chunk: int = 100) -> np.ndarray:
    """stat(weights) for `n_boot` resamples of n units; weights (b, n) are the resample counts."""
    rng, out = np.random.default_rng(seed), []
    for b in range(0, n_boot, chunk):
        m = min(chunk, n_boot - b)
        out.append(stat(rng.multinomial(n, np.full(n, 1.0 / n), size=m).astype(np.float64)))
    return np.concatenate(out)


def doc_nats(lm, docs: list[EvalDoc]) -> np.ndarray:
    """Each document's total loss in nats: -sum log p(x_t | x_<t) over every token but the bos."""
    return np.array([-lp.sum() for lp in lm.token_logprobs_many([d.tokens for d in docs])])


def quality(lm, docs: list[EvalDoc], n_boot: int = 1000, seed: int = 0, nats: np.ndarray | None = None) -> dict:
    """bpb, per-token and per-word perplexity with bootstrap 95% intervals over documents."""
    if not docs:
        raise ValueError("quality: no documents to evaluate")
    t0 = time.time()
    nats = doc_nats(lm, docs) if nats is None else nats
    ntok = np.array([len(d.tokens) - 1 for d in docs], np.float64)
    nbytes = np.array([d.nbytes for d in docs], np.float64)
    nwords = np.array([d.nwords for d in docs], np.float64)
    return {**_micro(nats, ntok, nbytes, nwords, n_boot, seed), "eval_seconds": round(time.time() - t0, 2)}


def _micro(nats, ntok, nbytes, nwords, n_boot: int, seed: int) -> dict:
    """Byte-weighted bpb, per-token and per-word perplexity with document-bootstrap intervals."""
    ratios = {"bpb": (nats / math.log(2), nbytes, lambda r: r),
              "ppl_token": (nats, ntok, np.exp), "ppl_word": (nats, nwords, np.exp)}
    out = {}
    for name, (num, den, f) in ratios.items():
        out[name] = float(f(num.sum() / den.sum()))
        boot = f(bootstrap(lambda w: (w @ num) / (w @ den), len(nats), n_boot, seed))
        out[f"{name}_lo"], out[f"{name}_hi"] = (float(v) for v in np.percentile(boot, [2.5, 97.5]))
    out.update(n_docs=len(nats), n_tokens=int(ntok.sum()), n_bytes=int(nbytes.sum()), n_words=int(nwords.sum()))
    return out


def _routes(lm, docs: list[EvalDoc]) -> tuple[list, list]:
    """For a mixture: (expert each document is assigned to as the router assigns training
    documents, the experts of the mixture's last route point); -1 and "" for other models."""
    router = getattr(lm, "router", None)
    if router is None or not hasattr(lm, "routed"):
        return [-1] * len(docs), [""] * len(docs)
    toks = [d.tokens for d in docs]
    assigned = router.assign(toks, slack=math.inf) if hasattr(router, "assign") else \
        np.argmax(lm._scores(toks), axis=1)
    return [int(e) for e in assigned], [" ".join(map(str, es)) for es in lm.routed(toks)]


def doc_table(models: dict, docs: list[EvalDoc]) -> pd.DataFrame:
    """One row per (model, document): source, n_bytes, n_tokens, n_words, bits (the document's
    -log2 likelihood), max_doc_tokens, and for a gm mixture `expert` (the training assignment of
    the document) and `experts` (the mixture's final top-k). Every other held-out table is
    computed from it. Each model's scoring seconds are in df.attrs["eval_seconds"]."""
    if not docs:
        raise ValueError("doc_table: no documents to evaluate")
    base = pd.DataFrame({"doc": np.arange(len(docs)), "source": [d.source for d in docs],
                         "n_bytes": [d.nbytes for d in docs], "n_tokens": [len(d.tokens) - 1 for d in docs],
                         "n_words": [d.nwords for d in docs],
                         "max_doc_tokens": pd.array([d.max_tokens for d in docs], dtype="Int64")})
    parts, secs = [], {}
    for name, lm in models.items():
        t0 = time.time()
        bits = doc_nats(lm, docs) / math.log(2)
        expert, experts = _routes(lm, docs)
        secs[name] = round(time.time() - t0, 2)
        parts.append(base.assign(model=name, bits=bits, expert=expert, experts=experts))
    df = pd.concat(parts, ignore_index=True)[["model", *base.columns, "bits", "expert", "experts"]]
    df.attrs["eval_seconds"] = secs
    return df


def model_info(models: dict) -> dict:
    """{name: {params_total, params_active, train_gpu_seconds}} of loaded models."""
    return {n: {"params_total": lm.params_total, "params_active": lm.params_active,
                "train_gpu_seconds": getattr(lm, "train_gpu_seconds", None)} for n, lm in models.items()}


def _strata(sources: np.ndarray, n_boot: int, seed: int) -> list[tuple[np.ndarray, np.ndarray]]:
    """Per source (sorted by name): its documents' indices and (n_boot, n_s) resample counts
    drawn within the source; the same for every model, so differences are paired."""
    out = []
    for j, src in enumerate(sorted(set(sources))):
        idx = np.flatnonzero(sources == src)
        out.append((idx, bootstrap(lambda w: w, len(idx), n_boot,
                                   int(np.random.SeedSequence([seed, j]).generate_state(1)[0]))))
    return out


def macro(bits: np.ndarray, nbytes: np.ndarray, strata) -> tuple[float, np.ndarray]:
    """(macro bpb, its n_boot bootstrap replicates): the mean over sources of sum(bits)/sum(bytes)."""
    value = np.mean([bits[i].sum() / nbytes[i].sum() for i, _ in strata])
    boot = np.mean([(w @ bits[i]) / (w @ nbytes[i]) for i, w in strata], axis=0)
    return float(value), boot


def _ci(boot) -> tuple[float, float]:
    lo, hi = np.percentile(boot, [2.5, 97.5])
    return float(lo), float(hi)


def quality_from_docs(dt: pd.DataFrame, info: dict, n_boot: int = 1000, seed: int = 0) -> pd.DataFrame:
    """One row per model of a doc_table (in its order): micro bpb, per-token and per-word
    perplexity with intervals, macro bpb with its stratified interval, and both bpb minus the
    FIRST model's (the reference) with paired intervals; size, compute, max_doc_tokens."""
    names = list(dict.fromkeys(dt["model"]))
    first = dt[dt["model"] == names[0]]
    ntok, nbytes = first["n_tokens"].to_numpy(np.float64), first["n_bytes"].to_numpy(np.float64)
    nwords, sources = first["n_words"].to_numpy(np.float64), first["source"].to_numpy()
    strata = _strata(sources, n_boot, seed)
    secs = dt.attrs.get("eval_seconds", {})
    rows, ref = [], None
    for name in names:
        d = dt[dt["model"] == name]
        if not (d["doc"].to_numpy() == first["doc"].to_numpy()).all():
            raise ValueError(f"model {name!r}: scored other documents than {names[0]!r}")
        bits = d["bits"].to_numpy(np.float64)
        ref = bits if ref is None else ref
        row = {"model": name, **_micro(bits * math.log(2), ntok, nbytes, nwords, n_boot, seed)}
        row["bpb_macro"], mboot = macro(bits, nbytes, strata)
        row["bpb_macro_lo"], row["bpb_macro_hi"] = _ci(mboot)
        delta = bootstrap(lambda w: (w @ bits - w @ ref) / (w @ nbytes), len(bits), n_boot, seed)
        row["bpb_delta"] = float((bits - ref).sum() / nbytes.sum())
        row["bpb_delta_lo"], row["bpb_delta_hi"] = _ci(delta)
        row["bpb_macro_delta"], mdelta = macro(bits - ref, nbytes, strata)
        row["bpb_macro_delta_lo"], row["bpb_macro_delta_hi"] = _ci(mdelta)
        cap = d["max_doc_tokens"].dropna().unique()
        row.update(n_sources=len(strata), max_doc_tokens=int(cap[0]) if len(cap) else None,
                   eval_seconds=secs.get(name, 0.0), **info[name])
        rows.append(row)
    return pd.DataFrame(rows)


def quality_table(models: dict, docs: list[EvalDoc], n_boot: int = 1000, seed: int = 0) -> pd.DataFrame:
    """quality_from_docs of doc_table(models, docs): the reference is the FIRST model."""
    return quality_from_docs(doc_table(models, docs), model_info(models), n_boot, seed)


def source_table(dt: pd.DataFrame, n_boot: int = 1000, seed: int = 0) -> pd.DataFrame:
    """bpb of every model on every source, with a bootstrap interval over the source's documents
    (eval_sources.csv); the macro bpb is the mean of a model's bpb column."""
    rows = []
    names = list(dict.fromkeys(dt["model"]))
    first = dt[dt["model"] == names[0]]
    strata = _strata(first["source"].to_numpy(), n_boot, seed)
    for name in names:
        d = dt[dt["model"] == name]
        bits, nbytes = d["bits"].to_numpy(np.float64), d["n_bytes"].to_numpy(np.float64)
        for idx, w in strata:
            lo, hi = _ci((w @ bits[idx]) / (w @ nbytes[idx]))
            rows.append({"model": name, "source": first["source"].iloc[idx[0]], "n_docs": len(idx),
                         "n_bytes": int(nbytes[idx].sum()), "bpb": float(bits[idx].sum() / nbytes[idx].sum()),
                         "bpb_lo": lo, "bpb_hi": hi})
    return pd.DataFrame(rows)


def oracle_rows(dt: pd.DataFrame, name: str, expert_models: list[str]) -> pd.DataFrame:
    """Rows of the oracle `name` for a doc_table: per document, the bits of the best of
    `expert_models` on it, chosen with the document's own loss (so an upper bound on what any
    router could reach with these experts alone; `expert` is its position in expert_models)."""
    parts = [dt[dt["model"] == m].reset_index(drop=True) for m in expert_models]
    if not parts or any(len(p) == 0 for p in parts):
        raise ValueError(f"oracle {name!r}: no per-document rows for some of {expert_models}")
    bits = np.stack([p["bits"].to_numpy() for p in parts])
    best = np.argmin(bits, axis=0)
    return parts[0].assign(model=name, bits=bits.min(axis=0), expert=best, experts=[str(b) for b in best])


def routed_table(dt: pd.DataFrame, mixture: str, expert_models: list[str], reference: str,
                 n_boot: int = 1000, seed: int = 0) -> pd.DataFrame:
    """Each expert against the reference model on the documents the router assigns to that
    expert (the `expert` column of the mixture's rows): bpb of both, the difference, and its
    paired bootstrap interval over those documents."""
    mix, ref = dt[dt["model"] == mixture].reset_index(drop=True), dt[dt["model"] == reference].reset_index(drop=True)
    rows = []
    for e, m in enumerate(expert_models):
        ex = dt[dt["model"] == m].reset_index(drop=True)
        sel = np.flatnonzero(mix["expert"].to_numpy() == e)
        if not len(sel):
            rows.append({"expert": m, "n_docs": 0})
            continue
        b, r, nb = (x.to_numpy(np.float64)[sel] for x in (ex["bits"], ref["bits"], ex["n_bytes"]))
        boot = bootstrap(lambda w: (w @ b - w @ r) / (w @ nb), len(sel), n_boot, seed)
        lo, hi = _ci(boot)
        rows.append({"expert": m, "n_docs": len(sel), "n_bytes": int(nb.sum()), "bpb_expert": b.sum() / nb.sum(),
                     f"bpb_{reference}": r.sum() / nb.sum(), "delta": (b - r).sum() / nb.sum(),
                     "delta_lo": lo, "delta_hi": hi})
    return pd.DataFrame(rows)


def sources_figure(st: pd.DataFrame):
    """bpb of every model on every source (grouped bars with 95% intervals)."""
    import matplotlib.pyplot as plt
    srcs, names = list(dict.fromkeys(st["source"])), list(dict.fromkeys(st["model"]))
    fig, ax = plt.subplots(figsize=(max(6, 0.5 * len(srcs) * (1 + 0.25 * len(names))), 4))
    width = 0.8 / len(names)
    for j, n in enumerate(names):
        d = st[st["model"] == n].set_index("source").loc[srcs]
        ax.bar(np.arange(len(srcs)) + j * width, d["bpb"], width, label=n,
               yerr=np.stack([d["bpb"] - d["bpb_lo"], d["bpb_hi"] - d["bpb"]]), capsize=2)
    ax.set_xticks(np.arange(len(srcs)) + 0.4 - width / 2, srcs, rotation=45, ha="right", fontsize=8)
    ax.set_xlabel("source")
    ax.set_ylabel("bits per byte (lower is better)")
    ax.legend(fontsize=7, ncol=2)
    ax.set_title("Held-out bits per byte by source, 95% bootstrap intervals", fontsize=10)
    fig.tight_layout()
    return fig


def quality_figure(df: pd.DataFrame):
    """Macro and micro bits per byte and per-word perplexity (log scale) of every model, with 95% intervals."""
    import matplotlib.pyplot as plt
    fig, axes = plt.subplots(1, 3, figsize=(8 + 1.8 * len(df), 3.8))
    x = np.arange(len(df))
    for ax, col, label, fmt in [(axes[0], "bpb_macro", "bits per byte, macro (mean over sources)", "{:.3f}"),
                                (axes[1], "bpb", "bits per byte, micro (byte-weighted)", "{:.3f}"),
                                (axes[2], "ppl_word", "per-word perplexity (lower is better)", "{:.3g}")]:
        err = np.stack([df[col] - df[f"{col}_lo"], df[f"{col}_hi"] - df[col]])
        bars = ax.bar(x, df[col], yerr=err, capsize=4, color="tab:blue", alpha=0.8)
        ax.bar_label(bars, [fmt.format(v) for v in df[col]], label_type="center", color="white", fontsize=8)
        ax.set_xticks(x, df["model"], rotation=30, ha="right")
        ax.set_ylabel(label)
        ax.set_xlabel("model")
    axes[2].set_yscale("log")
    fig.suptitle(f"Held-out documents (n={int(df['n_docs'].iloc[0])}, {int(df['n_bytes'].iloc[0]):,} bytes), "
                 "95% bootstrap intervals", fontsize=10)
    fig.tight_layout()
    return fig
