"""Shop reviews as fine-tuning data (gmlib.finetune): reading, formatting, a fixed held-out set, nested
training subsets, held-out scores, and reviews generated per star rating.

Data. A review becomes one document, "Оценка: 4 из 5\\nТовар: <product>\\n<text>", so a generated
review can be prompted with a star rating. The held-out set is fixed by a hash of the review's
text (duplicated texts fall on the same side, so none is both trained on and scored). The rest,
the pool, is shuffled by a seed and cut into NESTED training subsets: subset s is the shortest
prefix of the shuffled pool holding at least s KB (1 KB = 1000 bytes of UTF-8 documents), so a
larger subset contains every smaller one. Every `val_every`-th review of that order is the
subset's validation slice (nested too); the learning rate and the stopping step are chosen on
it, never on the held-out set.

Held-out perplexity and bits per byte come from gmlib.evaluate.quality: the same computation as
every other evaluation, over whole documents; the header is 40% of the bytes, so text_bpb also
scores the review texts alone (header given, same log-probs).
"""
import hashlib
import math
from dataclasses import dataclass

import numpy as np
import pandas as pd

from .eval_docs import EvalDoc
from .evaluate import quality
from .generation import generate_texts
from . import jsonl

KB = 1000


def load_reviews(path, clean_fn=None) -> list[dict]:
    """{id, text, rating (1-5 or None), product, category} per review of a JSONL(.gz) file.
    clean_fn(text) -> cleaned text (the notebook passes data_prep's cleaner); a review whose
    text is empty after cleaning is skipped (the Wildberries dump has rating-only reviews), a
    record without a "text" string is an error naming the file and line."""
    out = []
    try:
        for n, rec in jsonl.records(path):
            if not isinstance(rec.get("text"), str):
                raise ValueError(f"{path}:{n}: no \"text\" string field in the review")
            text = (clean_fn(rec["text"]) if clean_fn else rec["text"]) or ""
            if not text.strip():
                continue
            rating = rec.get("rating")
            out.append({"id": str(rec.get("id", f"line-{n}")), "text": text.strip(),
                        "rating": int(rating) if isinstance(rating, (int, float)) and 1 <= rating <= 5 else None,
                        "product": str(rec.get("product_name") or "").strip(),
                        "category": str(rec.get("category") or "")})
    except FileNotFoundError:
        raise
    except (OSError, EOFError, jsonl.NotUTF8) as e:  # a truncated or mislabelled .gz, not UTF-8
        raise ValueError(f"{path}: unreadable reviews file ({type(e).__name__}: {e})") from e
    if not out:
        raise ValueError(f"{path}: no review with text")
    return out


def size_kb(reviews: list[dict]) -> float:
    """KB of the reviews as documents (format_review's UTF-8 bytes / KB)."""
    return sum(len(format_review(r).encode()) for r in reviews) / KB


def review_prompt(rating: int | None, product: str = "") -> str:
    """The header of a review document: what a generation is prompted with."""
    head = ([f"Оценка: {rating} из 5"] if rating else []) + ([f"Товар: {product}"] if product else [])
    return "".join(h + "\n" for h in head)


def format_review(r: dict) -> str:
    return review_prompt(r["rating"], r["product"]) + r["text"]


def _unit(text: str, salt: str) -> float:
    """A uniform number in [0, 1) from a salted hash: the same on every machine and run."""
    return int.from_bytes(hashlib.sha1(f"{salt}\0{text}".encode()).digest()[:8], "big") / 2.0 ** 64


def split_heldout(reviews: list[dict], frac: float = 0.1, max_heldout: int | None = None):
    """(pool, heldout): a review is held out when the hash of its text is below frac. With
    max_heldout, the held-out reviews of the smallest hashes (a fixed subsample)."""
    h = np.array([_unit(r["text"], "reviews-heldout") for r in reviews])
    held = np.flatnonzero(h < frac)
    held = held[np.argsort(h[held], kind="stable")][:max_heldout]
    pool = np.flatnonzero(h >= frac)
    return [reviews[i] for i in pool], [reviews[i] for i in held]


def nested_subsets(pool: list[dict], sizes_kb, seed: int, val_every: int = 10) -> dict:
    """{size: (train indices, validation-slice indices)} into pool. size is a number of KB or
    "all" (the whole pool). Nested: every subset is a prefix of one seeded order of the pool."""
    order = np.random.default_rng([seed, 17]).permutation(len(pool))
    cum = np.cumsum([len(format_review(pool[i]).encode()) for i in order])
    out = {}
    for s in sizes_kb:
        if s == "all":
            n = len(order)
        elif isinstance(s, (int, float)) and 0 < s * KB <= cum[-1]:
            n = int(np.searchsorted(cum, s * KB)) + 1
        else:
            raise ValueError(f"subset size {s!r}: need a positive number of KB up to the pool's "
                             f"{cum[-1] / KB:.0f} KB, or 'all'")
        is_val = np.arange(n) % val_every == val_every - 1
        if not is_val.any() or is_val.all():
            raise ValueError(f"subset of {s} KB has {n} reviews: too few for a validation slice of 1 in {val_every}")
        out[s] = (order[:n][~is_val], order[:n][is_val])
    return out


@dataclass
class ReviewDoc(EvalDoc):
    n_head: int = 0      # tokens before the review text: [bos] and the header
    text_bytes: int = 0  # UTF-8 bytes of the review text alone


def encode(reviews: list[dict], tokenizer) -> list[ReviewDoc]:
    """[bos] + tokens of each formatted review, with its UTF-8 bytes and words (for bpb, ppl),
    and where its text starts (the header is 40% of the bytes: see heldout_scores)."""
    bos, texts = tokenizer.bos_id(), [format_review(r) for r in reviews]
    heads = tokenizer.encode([review_prompt(r["rating"], r["product"]) for r in reviews])
    out = []
    for r, t, ids, h in zip(reviews, texts, tokenizer.encode(texts), heads):
        if ids[:len(h)] != h:  # "\n" is its own piece, so the header's tokens are a prefix
            raise ValueError(f"review {r['id']}: its header does not tokenize as a prefix of the document")
        # by name: EvalDoc's fields may grow (they did: source, max_tokens), and positions would shift
        out.append(ReviewDoc(tokens=np.array([bos] + ids, np.int64), nbytes=len(t.encode()), nwords=len(t.split()),
                             source="reviews", n_head=1 + len(h), text_bytes=len(r["text"].encode())))
    return out


def heldout_scores(lm, docs: list[ReviewDoc], n_boot: int = 1000) -> dict:
    """gmlib.evaluate.quality of the whole documents (per-token ppl, bpb with its 95% interval,
    per-word ppl), plus text_bpb: the review texts alone given their headers (same log-probs)."""
    lps = lm.token_logprobs_many([d.tokens for d in docs])
    q = quality(lm, docs, n_boot, nats=np.array([-lp.sum() for lp in lps]))
    text = sum(-lp[d.n_head - 1:].sum() for lp, d in zip(lps, docs)) / math.log(2) / sum(d.text_bytes for d in docs)
    return {"val_ppl": q["ppl_token"], "val_bpb": q["bpb"], "val_ppl_word": q["ppl_word"], "val_bpb_lo": q["bpb_lo"],
            "val_bpb_hi": q["bpb_hi"], "text_bpb": float(text)}


def generate_reviews(lms: dict, tokenizer, reviews: list[dict], ratings=(5, 4, 3, 2, 1), max_new_tokens: int = 60,
                     temperature: float = 0.8, top_p: float = 0.9, seed: int = 0) -> str:
    """Markdown: one review per star rating for every model, prompted with the rating and a
    product (the most frequent products of `reviews`, in turn)."""
    counts = pd.Series([r["product"] for r in reviews if r["product"]]).value_counts()
    products = list(counts.index[:len(ratings)]) or [""]
    prompts = {f"{r} из 5": review_prompt(r, products[i % len(products)]) for i, r in enumerate(ratings)}
    texts = generate_texts(lms, tokenizer, prompts, max_new_tokens, temperature, top_p, seed)
    lines = ["# Generated reviews", "",
             f"Sampling: max_new_tokens={max_new_tokens}, temperature={temperature}, top_p={top_p}, seed={seed}", ""]
    for name, prompt in prompts.items():
        lines += [f"## {name}: «{prompt.strip().replace(chr(10), ' / ')}»", ""]
        lines += [f"- **{m}:** {' '.join(t.split())}" for m, t in texts[name].items()] + [""]
    return "\n".join(lines)
