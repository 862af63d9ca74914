"""Documents to experts: the balanced assignment every router's training split goes through,
and the per-expert shard folders an assignment is written to (what the trainer reads).

An expert's load counts documents or their tokens; no expert may take more than (1 + slack) / E
of the total, so no expert starves for data and none is trained far past the others.
"""
import hashlib
import json
import math
from contextlib import ExitStack
from pathlib import Path

import numpy as np

from . import atomic
from .data import SHARD_TOKENS, ShardWriter, TokenShards, is_complete


def balanced_assign(scores: np.ndarray, slack: float = 0.0, weights=None) -> np.ndarray:
    """Each row (document) to one column (expert), high scores first, no column loaded past
    cap = (1 + slack) * total / E, where a row weighs 1 or weights[i] (its tokens). Greedy
    rounds: every unassigned row proposes to its best open column; a column accepts its best
    proposers while its load is below cap (so it overshoots by at most one row) and then
    closes. An approximation of the balanced linear assignment that c-BTM solves; the plain
    argmax when no column overflows; slack=inf is the plain argmax."""
    n, E = scores.shape
    w = np.ones(n) if weights is None else np.asarray(weights, np.float64)
    if w.shape != (n,) or (w < 0).any():
        raise ValueError(f"weights must be {n} non-negative numbers")
    if not slack >= 0:
        raise ValueError(f"slack must be >= 0, got {slack}")
    s = np.array(scores, np.float64)
    if math.isinf(slack):
        return np.argmax(s, axis=1)
    cap = w.sum() / E * (1 + slack)
    # whole documents: exactly ceil(n / E) when slack = 0; weights: a hair over, against rounding
    cap = math.ceil(cap - 1e-9) if weights is None else cap * (1 + 1e-12)
    labels, load = np.full(n, -1, np.int64), np.zeros(E)
    while (free := np.flatnonzero(labels < 0)).size:
        if np.all(s[0] == -np.inf):  # cannot happen with cap * E >= total; never loop forever
            raise RuntimeError("balanced_assign: every expert is full but documents remain")
        best = np.argmax(s[free], axis=1)
        for e in np.unique(best):
            cand = free[best == e]
            cand = cand[np.argsort(-s[cand, e], kind="stable")]
            before = load[e] + np.cumsum(w[cand]) - w[cand]  # load just before each would join
            take = cand[before < cap]
            labels[take] = e
            load[e] += w[take].sum()
            if len(take) < len(cand) or load[e] >= cap:
                s[:, e] = -np.inf
    return labels


def check_assign(assign, shards: TokenShards, n_experts: int) -> np.ndarray:
    """An assignment of the shards' documents as int64, or ValueError if it is not one."""
    assign = np.asarray(assign, np.int64)
    if assign.shape != (shards.n_docs,) or (assign.size and (assign.min() < 0 or assign.max() >= n_experts)):
        raise ValueError(f"{shards.root}: assignment must be {shards.n_docs} expert ids in [0, {n_experts})")
    return assign


def route_shards(router, shards: TokenShards, out_root, assign: np.ndarray | None = None,
                 ram_tokens: int = 2 ** 27) -> list[Path]:
    """Write each expert's documents to out_root/expert_XXX/ (gmlib.data format, same sources).
    Documents stream from the memory-mapped shards; each writer buffers at most
    ram_tokens / E tokens. A finished routing (route.json, written last) for the same router
    state, source shards and assignment is reused."""
    out_root, E = Path(out_root), router.n_experts
    paths = [out_root / f"expert_{e:03d}" for e in range(E)]
    key = {"router": router.fingerprint(), "n_experts": E, "source": str(Path(shards.root).resolve()),
           "n_docs": shards.n_docs, "n_tokens": shards.n_tokens,
           "assign": None if assign is None else hashlib.sha256(np.asarray(assign, np.int64).tobytes()).hexdigest()[:16]}
    manifest = out_root / "route.json"
    if manifest.is_file() and json.loads(manifest.read_text()).get("key") == key and all(map(is_complete, paths)):
        return paths
    manifest.unlink(missing_ok=True)
    labels = check_assign(router.assign(shards) if assign is None else assign, shards, E)
    per = max(2 ** 20, min(SHARD_TOKENS, ram_tokens // E))
    with ExitStack() as stack:
        writers = [stack.enter_context(ShardWriter(p, shards.vocab_size, shards.sources, shard_tokens=per)) for p in paths]
        for i in range(shards.n_docs):
            writers[labels[i]].add(shards.doc(i), int(shards.doc_source[i]), int(shards.doc_nbytes[i]))
    with atomic.atomic_path(out_root / "assign.npy") as tmp:
        with open(tmp, "wb") as f:
            np.save(f, labels)
    atomic.write_json(manifest, {"key": key, "docs": np.bincount(labels, minlength=E).tolist()})
    return paths
