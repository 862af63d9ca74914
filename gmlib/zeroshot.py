"""PARus zero-shot (Table 3): each alternative is scored by its log-likelihood given the context;
the more likely one is the answer. Primary: the SUM of the alternative's token log-probs;
secondary: the mean per token (length-normalised). Accuracy with a Wilson 95% interval.
"""
import math

import numpy as np
import pandas as pd

from . import jsonl

PARUS_FIELDS = ("premise", "choice1", "choice2", "question", "label")
CONNECTORS = {"cause": " потому что", "effect": ", поэтому"}
RELATION = {"cause": "причиной", "effect": "следствием"}
STYLES = ("connector", "mera")


def load_parus(path) -> list[dict]:
    """PARus-format JSONL: {idx, premise, choice1, choice2, question: cause|effect, label: 0|1}."""
    items = []
    for n, rec in jsonl.records(path):
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
