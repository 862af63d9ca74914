"""How a router split a corpus: balance, topicality, and a figure.

Per expert: documents, tokens, share, the tokens most over-represented among its documents
(lift against the whole corpus), and its source mix. Over the whole split: max/min share,
coefficient of variation, normalised entropy, and the normalised mutual information between
expert and source (0 for a random split; 1 when experts and sources coincide).
Token counts stream through the memory-mapped shards, so any corpus size works.
"""
import numpy as np
import pandas as pd

from .assign import check_assign
from .data import TokenShards


def balance(assign, n_experts: int, weights=None) -> dict:
    """Shares of an assignment (per document, or weighted, e.g. by tokens)."""
    share = np.bincount(assign, weights, minlength=n_experts).astype(np.float64)
    share /= max(share.sum(), 1e-300)
    nz = share[share > 0]
    return {"max_share": float(share.max()), "min_share": float(share.min()),
            "max_over_ideal": float(share.max() * n_experts), "min_over_ideal": float(share.min() * n_experts),
            "cv": float(share.std() / share.mean()),
            "entropy": float(-(nz * np.log(nz)).sum() / np.log(n_experts)) if n_experts > 1 else 1.0}


def nmi(a, b) -> float:
    """Normalised mutual information I(a; b) / ((H(a) + H(b)) / 2) of two labelings."""
    a = np.unique(np.asarray(a), return_inverse=True)[1]
    b = np.unique(np.asarray(b), return_inverse=True)[1]
    joint = np.bincount(a * (b.max() + 1) + b, minlength=(a.max() + 1) * (b.max() + 1)).reshape(a.max() + 1, -1)
    p = joint / joint.sum()
    pa, pb = p.sum(1), p.sum(0)
    nz = p > 0
    mi = (p[nz] * np.log(p[nz] / np.outer(pa, pb)[nz])).sum()
    h = -(pa[pa > 0] * np.log(pa[pa > 0])).sum() - (pb[pb > 0] * np.log(pb[pb > 0])).sum()
    return float(2 * mi / h) if h > 0 else 1.0


def token_counts(assign, shards: TokenShards, n_experts: int, chunk_docs: int = 20000) -> np.ndarray:
    """(n_experts, vocab) counts of each token among each expert's documents, bos excluded."""
    assign = check_assign(assign, shards, n_experts)
    E, V = n_experts, shards.vocab_size
    counts = np.zeros((E + 1) * V, np.int64)  # row E collects the bos tokens, dropped at the end
    for s, tokens in enumerate(shards.tokens):
        docs = np.flatnonzero(shards.doc_shard == s)
        for c in range(0, len(docs), chunk_docs):
            d = docs[c:c + chunk_docs]
            lo, hi = shards.doc_start[d[0]], shards.doc_end[d[-1]]
            lab = np.repeat(assign[d], shards.doc_end[d] - shards.doc_start[d])
            lab[shards.doc_start[d] - lo] = E
            counts += np.bincount(lab * V + np.asarray(tokens[lo:hi], np.int64), minlength=(E + 1) * V)
    return counts.reshape(E + 1, V)[:E]


def top_tokens(counts: np.ndarray, n: int = 8) -> list[np.ndarray]:
    """Per expert, the tokens with the largest sqrt(p(t|e)) log(p(t|e) / p(t)): over-represented
    among the expert's documents (the log lift) and not rare there (the sqrt(p) factor keeps
    one-off pieces out without letting punctuation in: a tf-idf-like lift)."""
    p_te = counts / np.maximum(counts.sum(1, keepdims=True), 1)
    p_t = counts.sum(0) / max(counts.sum(), 1)
    with np.errstate(divide="ignore", invalid="ignore"):
        score = np.where(counts > 0, np.sqrt(p_te) * np.log(p_te / p_t), -np.inf)
    out = []
    for row in score:
        best = np.argsort(-row, kind="stable")[:n]
        out.append(best[np.isfinite(row[best])])
    return out


def source_tokens(assign, shards: TokenShards, n_experts: int) -> np.ndarray:
    """(n_experts, n_sources) tokens of each source routed to each expert."""
    assign = check_assign(assign, shards, n_experts)
    S = len(shards.sources)
    return np.bincount(assign * S + shards.doc_source.astype(np.int64), shards.doc_end - shards.doc_start,
                       minlength=n_experts * S).reshape(n_experts, S)


def routing_table(assign, shards: TokenShards, n_experts: int, decode_piece=None, n_tokens: int = 8,
                  n_sources: int = 3) -> pd.DataFrame:
    """One row per expert: docs, tokens, share (of tokens), doc_share, top tokens, top sources."""
    assign = check_assign(assign, shards, n_experts)
    lengths = shards.doc_end - shards.doc_start
    docs = np.bincount(assign, minlength=n_experts)
    toks = np.bincount(assign, lengths, minlength=n_experts).astype(np.int64)
    decode = decode_piece or str
    tops = top_tokens(token_counts(assign, shards, n_experts), n_tokens)
    src = source_tokens(assign, shards, n_experts)
    rows = []
    for e in range(n_experts):
        frac = src[e] / max(src[e].sum(), 1)
        order = [s for s in np.argsort(-frac, kind="stable")[:n_sources] if frac[s] > 0]
        rows.append({"expert": e, "docs": int(docs[e]), "tokens": int(toks[e]),
                     "share": toks[e] / max(toks.sum(), 1), "doc_share": docs[e] / max(docs.sum(), 1),
                     "top_tokens": " ".join(str(decode(int(t))) for t in tops[e]),
                     "sources": ", ".join(f"{shards.sources[s]} {frac[s]:.0%}" for s in order)})
    return pd.DataFrame(rows)


def routing_summary(assign, shards: TokenShards, n_experts: int) -> dict:
    """Balance by documents and by tokens, and NMI(expert; source): for metrics.json."""
    assign = check_assign(assign, shards, n_experts)
    return {"docs": balance(assign, n_experts), "tokens": balance(assign, n_experts, shards.doc_end - shards.doc_start),
            "nmi_source": nmi(assign, shards.doc_source)}


def compare_routers(assigns: dict, shards: TokenShards, n_experts: int) -> pd.DataFrame:
    """One row per router name: token-share balance and NMI with the source."""
    rows = []
    for name, a in assigns.items():
        s = routing_summary(a, shards, n_experts)
        rows.append({"router": name, "nmi_source": s["nmi_source"],
                     **{f"tokens_{k}": v for k, v in s["tokens"].items()}})
    return pd.DataFrame(rows)


def routing_figure(assign, shards: TokenShards, n_experts: int, title: str = ""):
    """Left: each expert's source mix (stacked token shares). Right: token share per expert
    against the ideal 1/E."""
    import matplotlib.pyplot as plt
    src = source_tokens(assign, shards, n_experts).astype(np.float64)
    frac = src / np.maximum(src.sum(1, keepdims=True), 1)
    share = src.sum(1) / max(src.sum(), 1)
    x = np.arange(n_experts)
    fig, (a1, a2) = plt.subplots(1, 2, figsize=(12, 5), gridspec_kw={"width_ratios": [3, 2]})
    # tab20 then tab20b: 40 distinct colours, enough for the corpus' 23 sources
    palette = np.vstack([plt.get_cmap("tab20")(np.arange(20)), plt.get_cmap("tab20b")(np.arange(20))])
    colors = palette[np.arange(len(shards.sources)) % len(palette)]
    bottom = np.zeros(n_experts)
    for s, name in enumerate(shards.sources):
        if frac[:, s].any():
            a1.bar(x, frac[:, s], bottom=bottom, color=colors[s], label=name)
            bottom += frac[:, s]
    a1.set(xlabel="expert", ylabel="share of the expert's tokens", title=f"{title} source mix".strip(), ylim=(0, 1),
           xticks=x)
    a1.legend(fontsize=7, ncol=4, loc="upper center", bbox_to_anchor=(0.5, -0.18))
    a2.bar(x, share, color="tab:blue")
    a2.axhline(1 / n_experts, color="k", ls="--", label="ideal 1/E")
    a2.set(xlabel="expert", ylabel="share of all tokens", title=f"{title} balance".strip(), xticks=x)
    a2.legend()
    fig.tight_layout()
    return fig
