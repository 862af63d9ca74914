"""Evaluation, the same code path for every model (anything with gmlib.mixture's interface:
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
PARus zero-shot (Table 3): each alternative is scored by its log-likelihood given the context;
the more likely one is the answer. Primary: the SUM of the alternative's token log-probs;
secondary: the mean per token (length-normalised). Accuracy with a Wilson 95% interval.
Generation: the article's two prompts, every model side by side, fixed sampling and seed.

Tokenizers are anything with encode(str) -> list[int], decode(list[int]) -> str and bos_id()
(SentencePiece). Cleaning of a raw JSONL corpus is passed in (`clean_fn`), because gmlib never
imports data_prep.
"""
import gzip
import json
import math
import time
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import numpy as np
import pandas as pd

from .checkpoint import load_checkpoint, load_model, read_meta
from .data import TokenShards
from .mixture import MixtureConfig, MixtureLM, SingleLM

# The article's two generation prompts (the "Контекст:" lines of the Habr article, 2021).
PROMPT_METHANOL = ("Также ученые сообщили об обнаружении метанола в отдаленных от центра Млечного Пути "
                   "молекулярных облаках. По словам исследователей, их открытие ставит под сомнение")
PROMPT_SWEETS = ("Я огляделась по сторонам и увидела женщину, торопливо уводящую нескольких детей подальше "
                 "от двух наших групп. Она тоже оглянулась, перевела взгляд на нас и приказала своим отпрыскам "
                 "поторапливаться. Младший захныкал, пытаясь задержать ее у витрины со сладостями")
PROMPTS = {"methanol": PROMPT_METHANOL, "sweets": PROMPT_SWEETS}


# ---------------------------------------------------------------------------------------------
# documents


@dataclass
class EvalDoc:
    tokens: np.ndarray  # [bos] + the text's tokens (the first max_tokens of them when capped)
    nbytes: int         # UTF-8 bytes of the (scored part of the) text
    nwords: int         # whitespace-separated words of the (scored part of the) text
    source: str = ""    # the corpus source the document comes from
    max_tokens: int | None = None  # the max_doc_tokens cap it was made with (None: whole)


def _capped(toks: np.ndarray, nbytes: int, nwords: int, source: str, tokenizer, cap: int | None) -> EvalDoc:
    """The document, cut to its first `cap` scored tokens (after the bos) when it is longer; the
    bytes and words are then those of the decoded kept tokens."""
    if cap is not None and cap < 1:
        raise ValueError(f"max_doc_tokens={cap} must be >= 1 (or None: no cap)")
    if cap is not None and len(toks) - 1 > cap:
        toks = toks[:cap + 1]
        text = tokenizer.decode([int(t) for t in toks[1:]])
        nbytes, nwords = len(text.encode("utf-8")), len(text.split())
    return EvalDoc(toks, nbytes, nwords, source, cap)


def docs_from_shards(root, tokenizer, max_docs: int | None = None, max_doc_tokens: int | None = None) -> list[EvalDoc]:
    """Documents of a shard folder (e.g. work/<data>/shards/test). With max_docs, that many
    documents evenly spaced over the folder (shards are written source by source, so the first
    N documents would come from one source only); with max_doc_tokens, each capped to that many
    scored tokens."""
    shards = TokenShards(root)
    n = len(shards)
    idx = range(n) if max_docs is None or max_docs >= n else np.unique(np.linspace(0, n - 1, max_docs).round().astype(int))
    bos = tokenizer.bos_id()
    out = []
    for i in idx:
        toks = shards.doc(int(i))
        if len(toks) == 0 or toks[0] != bos:
            raise ValueError(f"{shards.root}: document {i} does not start with bos={bos} (another tokenizer's shards?)")
        text = tokenizer.decode(toks[1:].tolist())
        nbytes = int(shards.doc_nbytes[i]) or len(text.encode("utf-8"))  # 0 = not recorded: the tokenizer round-trips
        src = shards.sources[int(shards.doc_source[i])] if shards.sources else ""
        out.append(_capped(toks, nbytes, len(text.split()), src, tokenizer, max_doc_tokens))
    return out


def read_jsonl(path):
    """Records of a JSONL file (plain or .gz) with their line numbers; a bad line is an error
    naming the file and the line."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such file")
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rt", encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                rec = json.loads(line)
            except json.JSONDecodeError as e:
                raise ValueError(f"{path}:{n}: not valid JSON ({e.msg})") from None
            if not isinstance(rec, dict):
                raise ValueError(f"{path}:{n}: expected a JSON object, got {type(rec).__name__}")
            yield n, rec


def docs_from_jsonl(path, tokenizer, clean_fn=None, max_docs: int | None = None,
                    max_doc_tokens: int | None = None) -> list[EvalDoc]:
    """Documents of a corpus-format JSONL file ({"text": ..., "source": ...} per line), cleaned by
    `clean_fn(record) -> cleaned text, or None to drop it` (the data pipeline's cleaner: the
    notebook passes data_prep's), then tokenized as the shards are: [bos] + encode(text)."""
    out, bos = [], tokenizer.bos_id()
    for n, rec in read_jsonl(path):
        if not isinstance(rec.get("text"), str):
            raise ValueError(f"{path}:{n}: no \"text\" string field")
        text = clean_fn(rec) if clean_fn else rec["text"]
        if not text:
            continue
        out.append(_capped(np.array([bos] + list(tokenizer.encode(text)), np.int64), len(text.encode("utf-8")),
                           len(text.split()), str(rec.get("source", "")), tokenizer, max_doc_tokens))
        if max_docs and len(out) >= max_docs:
            break
    if not out:
        raise ValueError(f"{path}: no documents left to evaluate")
    return out


# ---------------------------------------------------------------------------------------------
# held-out quality


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
        out.append((idx, bootstrap(lambda w: w, len(idx), n_boot, int(np.random.SeedSequence([seed, j]).generate_state(1)[0]))))
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


# ---------------------------------------------------------------------------------------------
# PARus zero-shot

PARUS_FIELDS = ("premise", "choice1", "choice2", "question", "label")
CONNECTORS = {"cause": " потому что", "effect": ", поэтому"}
RELATION = {"cause": "причиной", "effect": "следствием"}
STYLES = ("connector", "mera")


def load_parus(path) -> list[dict]:
    """PARus-format JSONL: {idx, premise, choice1, choice2, question: cause|effect, label: 0|1}."""
    items = []
    for n, rec in read_jsonl(path):
        missing = [k for k in PARUS_FIELDS if k not in rec]
        if missing:
            raise ValueError(f"{path}:{n}: PARus record lacks {missing}")
        if rec["question"] not in CONNECTORS:
            raise ValueError(f"{path}:{n}: question must be 'cause' or 'effect', not {rec['question']!r}")
        if rec["label"] not in (0, 1):
            raise ValueError(f"{path}:{n}: label must be 0 or 1, not {rec['label']!r}")
        if not all(isinstance(rec[k], str) and rec[k].strip() for k in ("premise", "choice1", "choice2")):
            raise ValueError(f"{path}:{n}: premise, choice1 and choice2 must be non-empty strings")
        items.append({**rec, "idx": rec.get("idx", len(items))})
    if not items:
        raise ValueError(f"{path}: no PARus items")
    return items


def parus_texts(item: dict, style: str) -> tuple[str, list[str]]:
    """(context, [continuation 1, continuation 2]); only the continuations are scored.
    connector: "<premise without its final period> потому что|, поэтому <alternative, first
               letter lower-cased>"
    mera:      a MERA-style instruction listing the situation and both alternatives, a question
               about the cause or effect, then "Ответ: <alternative>" (the same context for both)."""
    p, q = item["premise"].strip(), item["question"]
    alts = [item["choice1"].strip(), item["choice2"].strip()]
    if style == "connector":
        ctx = (p[:-1] if p.endswith(".") else p) + CONNECTORS[q]
        return ctx, [" " + a[:1].lower() + a[1:] for a in alts]
    if style == "mera":
        ctx = (f"Дано описание ситуации: «{p}» и два фрагмента текста:\n1. {alts[0]}\n2. {alts[1]}\n"
               f"Какой из двух фрагментов является {RELATION[q]} описанной ситуации?\nОтвет:")
        return ctx, [" " + a for a in alts]
    raise ValueError(f"unknown PARus prompt style {style!r}; choose one of {STYLES}")


def encode_continuation(tokenizer, context: str, continuation: str) -> tuple[list[int], list[int]]:
    """Token ids of the context and of the continuation as they fall in the joint text: the
    joint text is encoded once and split where the context's own encoding ends (SentencePiece
    splits at whitespace, so that is a token boundary); else they are encoded apart."""
    ctx, full = list(tokenizer.encode(context)), list(tokenizer.encode(context + continuation))
    if full[:len(ctx)] == ctx and len(full) > len(ctx):
        return ctx, full[len(ctx):]
    return ctx, list(tokenizer.encode(continuation))


def score_parus(lm, items: list[dict], tokenizer, style: str) -> pd.DataFrame:
    """One row per item: log-likelihood (sum and per token) of each alternative, the predictions."""
    bos, seqs, known, ntok = tokenizer.bos_id(), [], [], []
    for it in items:
        context, conts = parus_texts(it, style)
        for c in conts:
            ctx_ids, cont_ids = encode_continuation(tokenizer, context, c)
            seqs.append(np.array([bos] + ctx_ids + cont_ids, np.int64))
            known.append(1 + len(ctx_ids))  # the mixture may route on the context (not on the answer)
            ntok.append(len(cont_ids))
    lps = lm.token_logprobs_many(seqs, known)
    ll = np.array([lp[k - 1:].sum() for lp, k in zip(lps, known)]).reshape(-1, 2)  # lp[i] scores token i+1
    nt = np.array(ntok).reshape(-1, 2)
    df = pd.DataFrame({"idx": [it["idx"] for it in items], "question": [it["question"] for it in items],
                       "label": [it["label"] for it in items], "ll1": ll[:, 0], "ll2": ll[:, 1],
                       "ntok1": nt[:, 0], "ntok2": nt[:, 1]})
    df["pred"] = (ll[:, 1] > ll[:, 0]).astype(int)  # a tie goes to choice1
    df["pred_norm"] = (ll[:, 1] / nt[:, 1] > ll[:, 0] / nt[:, 0]).astype(int)
    df["correct"] = (df["pred"] == df["label"]).astype(int)
    df["correct_norm"] = (df["pred_norm"] == df["label"]).astype(int)
    return df


def wilson(k: int, n: int, z: float = 1.959964) -> tuple[float, float]:
    """Wilson score interval for a proportion k/n (sound at small n and near 0 or 1)."""
    if n == 0:
        return (0.0, 1.0)
    p = k / n
    mid, half = (p + z * z / (2 * n)), z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n))
    return ((mid - half) / (1 + z * z / n), (mid + half) / (1 + z * z / n))


def parus_summary(pred: pd.DataFrame) -> dict:
    n, k, kn = len(pred), int(pred["correct"].sum()), int(pred["correct_norm"].sum())
    return {"acc": k / n, "ci": list(wilson(k, n)), "n": n, "acc_norm": kn / n, "ci_norm": list(wilson(kn, n))}


# ---------------------------------------------------------------------------------------------
# generation


def generate_texts(models: dict, tokenizer, prompts: dict = PROMPTS, max_new_tokens: int = 60,
                   temperature: float = 0.8, top_p: float = 0.9, seed: int = 0) -> dict:
    """{prompt name: {model name: continuation}}; generation stops early at a bos (a new document).
    Each model continues all prompts in one batched call, each prompt with the same seed."""
    bos = tokenizer.bos_id()
    encoded = [[bos] + list(tokenizer.encode(text)) for text in prompts.values()]
    out = {pname: {} for pname in prompts}
    for name, lm in models.items():
        got = lm.generate_many(encoded, max_new_tokens, temperature=temperature, top_p=top_p, seed=seed, stop_token=bos)
        for pname, toks in zip(prompts, got):
            out[pname][name] = tokenizer.decode([t for t in toks if t != bos])
    return out


def generations_markdown(texts: dict, prompts: dict = PROMPTS, params: dict | None = None) -> str:
    lines = ["# Generated continuations", ""]
    if params:
        lines += ["Sampling: " + ", ".join(f"{k}={v}" for k, v in params.items()), ""]
    for pname, by_model in texts.items():
        lines += [f"## {pname}", "", f"**Контекст:** {prompts[pname]}", ""]
        for name, cont in by_model.items():
            one_line = " ".join(cont.split())  # keep each continuation on one Markdown line
            lines += [f"- **{name}:** …{one_line}", ""]
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------
# models


def _load_dense(spec: dict, device):
    model, meta = load_checkpoint(spec["path"], device=device)
    lm = SingleLM(model.eval())
    lm.train_gpu_seconds = (meta.get("accounting") or {}).get("gpu_seconds")
    return lm


def _load_mixture(spec: dict, device):
    """A mixture over dense checkpoints (spec["experts"]: paths), optionally with a router object;
    at most k experts are kept loaded (an LRU of checkpoints)."""
    paths = list(spec["experts"])
    cfg = MixtureConfig.from_spec(spec)

    @lru_cache(maxsize=cfg.experts_held(len(paths)))  # log-linear holds every expert
    def load_expert(e):
        return load_model(paths[e], device=device)

    lm = MixtureLM(load_expert, len(paths), router=spec.get("router"), cfg=cfg, base_prior=spec.get("base_prior"))
    secs = [(read_meta(p).get("accounting") or {}).get("gpu_seconds") for p in paths]  # headers only
    lm.train_gpu_seconds = None if None in secs else float(sum(secs))
    return lm


# kind -> loader(spec, device): the kinds every evaluation knows
LOADERS = {"dense": _load_dense, "mixture": _load_mixture}


def load_models(specs: list[dict], device="cpu", loaders: dict | None = None) -> dict:
    """{name: model with the gmlib.mixture interface} from specs such as
       {"name": "dense-30m", "kind": "dense", "path": ".../checkpoint.safetensors"}
       {"name": "ens-k2", "kind": "mixture", "experts": [paths], "k": 2, "eta": 1.0}
    loaders adds kinds to LOADERS for this call, e.g. {"gm": gmlib.serve.mixture_loader(gm_root)}.
    Each model carries params_total, params_active and train_gpu_seconds (None if unknown)."""
    out, known = {}, {**LOADERS, **(loaders or {})}
    for spec in specs:
        kind, name = spec.get("kind", "dense"), spec.get("name")
        if not name or name in out:
            raise ValueError(f"model spec {spec}: needs a unique 'name'")
        if kind not in known:
            raise ValueError(f"model spec {name!r}: unknown kind {kind!r}; known: {sorted(known)}")
        out[name] = known[kind](spec, device)
    return out
