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


def balanced_assign_top(scores: np.ndarray, r: int, slack: float = 0.0, weights=None) -> np.ndarray:
    """(n, r): each row to r distinct columns, column j of the result one balanced_assign round
    over the columns the row does not have yet, so every round is balanced and every expert
    gets about r / E of the load (c-BTM's overlap). Column 0 is balanced_assign itself. A row
    whose remaining columns are all full in a round keeps one expert fewer (-1): rare, and
    never more load than the cap. r >= E: every row to every column, in order."""
    n, E = scores.shape
    if r < 1:
        raise ValueError(f"r must be >= 1, got {r}")
    if r >= E:
        return np.tile(np.arange(E, dtype=np.int64), (n, 1))
    s, out = np.array(scores, np.float64), []
    for _ in range(r):
        lab = balanced_assign(s, slack, weights)
        seen = np.zeros(n, bool)
        for prev in out:
            seen |= prev == lab
        out.append(np.where(seen, -1, lab))
        # chosen columns sink below every score, but stay finite: balanced_assign closes only full columns
        s[np.arange(n), lab] = -1e30
    return np.stack(out, axis=1)


def check_assign(assign, shards: TokenShards, n_experts: int) -> np.ndarray:
    """An assignment of the shards' documents as int64, (n_docs,) or (n_docs, r) with -1 for
    'no further expert', or ValueError if it is not one."""
    assign = np.asarray(assign, np.int64)
    first = assign if assign.ndim == 1 else assign[:, 0] if assign.ndim == 2 else None
    if first is None or len(assign) != shards.n_docs or (assign.size and (
            first.min() < 0 or assign.min() < -1 or assign.max() >= n_experts)):
        raise ValueError(f"{shards.root}: assignment must be {shards.n_docs} expert ids in [0, {n_experts})"
                         " (or rows of them, -1 after the first for none)")
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
           "assign": None if assign is None
           else hashlib.sha256(np.asarray(assign, np.int64).tobytes()).hexdigest()[:16]}
    manifest = out_root / "route.json"
    if manifest.is_file() and json.loads(manifest.read_text()).get("key") == key and all(map(is_complete, paths)):
        return paths
    manifest.unlink(missing_ok=True)
    labels = check_assign(router.assign(shards) if assign is None else assign, shards, E)
    rows = labels.reshape(len(labels), -1)  # a document goes to every expert of its row
    per = max(2 ** 20, min(SHARD_TOKENS, ram_tokens // E))
    with ExitStack() as stack:
        writers = [stack.enter_context(ShardWriter(p, shards.vocab_size, shards.sources, shard_tokens=per))
                   for p in paths]
        for i in range(shards.n_docs):
            doc = shards.doc(i)
            for e in rows[i][rows[i] >= 0]:
                writers[e].add(doc, int(shards.doc_source[i]), int(shards.doc_nbytes[i]))
    with atomic.atomic_path(out_root / "assign.npy") as tmp:
        with open(tmp, "wb") as f:
            np.save(f, labels)
    atomic.write_json(manifest, {"key": key, "docs": np.bincount(rows[rows >= 0], minlength=E).tolist()})
    return paths
