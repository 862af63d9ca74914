"""The documents an evaluation scores: from a shard folder (the test split) or from a corpus-format
JSONL file, each as [bos] + its tokens with its UTF-8 bytes, words and source, optionally capped.

Tokenizers are anything with encode(str) -> list[int], decode(list[int]) -> str and bos_id()
(SentencePiece). Cleaning of a raw JSONL corpus is passed in (`clean_fn`), because gmlib never
imports data_prep.
"""
from dataclasses import dataclass

import numpy as np

from .data import TokenShards
from . import jsonl


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
    idx = (range(n) if max_docs is None or max_docs >= n
           else np.unique(np.linspace(0, n - 1, max_docs).round().astype(int)))
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


def docs_from_jsonl(path, tokenizer, clean_fn=None, max_docs: int | None = None,
                    max_doc_tokens: int | None = None) -> list[EvalDoc]:
    """Documents of a corpus-format JSONL file ({"text": ..., "source": ...} per line), cleaned by
    `clean_fn(record) -> cleaned text, or None to drop it` (the data pipeline's cleaner: the
    notebook passes data_prep's), then tokenized as the shards are: [bos] + encode(text)."""
    out, bos = [], tokenizer.bos_id()
    for n, rec in jsonl.records(path):
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
