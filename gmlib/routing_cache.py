"""Routing computed once per data set and router settings, and shared by every gm that uses it.

Fitting the local router on 50k documents and routing 50M training tokens into per-expert shards
take about a minute of CPU on the GPU machine, while a small expert at a small budget trains for
seconds: a frontier experiment that trains tens of gm on the same data with the same router would
spend most of its GPU time waiting for routing. The router is a function of its settings and the
training shards, and a routing of the router's state and the assignment, so both are kept under
a cache folder (notebook 04 uses work/<data_name>/routing/) and reused:
  routers/<key>/   a fitted router (gmlib.router's folder format) and assign.npy, its balanced
                   top-1 assignment of the training documents; key: the settings and the shards;
  scores/<key>.npy a router's assign_scores of the training documents (the slow part of assign and
                   assign_top: a gm with train_top_r > 1 balances them again); key: the router's
                   fingerprint and the shards;
  routed/<key>/    train/ and val/ routed by a router state and an assignment (gmlib.assign's
                   route_shards, which checks its own key); a gm gets hard links of these files.
A hit returns exactly what a fresh computation would: the cached router's fingerprint is part of
every routed key, and route_shards refuses to reuse a folder whose key differs. The keys cannot see
the code, so VERSION is part of them. Each router and routed folder is filled under a file lock
(<folder>.lock), so gm jobs of two plans that run side by side on one machine share the cache: the
second waits for the first and then reads what it wrote.
"""
import hashlib
import json
import os
import shutil
from pathlib import Path

import numpy as np

from . import atomic
from .data import TokenShards
from .router import load_router, make_router, route_shards

# part of every key: raise it when fitting, assignment or routing change what they compute, so that
# routings made by older code are not reused (the keys cannot see the code)
VERSION = 1


def shards_key(shards: TokenShards) -> str:
    """The identity of a shard folder: its meta.json (shard list, totals, sources) and location."""
    h = hashlib.sha256((shards.root / "meta.json").read_bytes())
    h.update(str(shards.root.resolve()).encode())
    return h.hexdigest()[:16]


def fit(kind: str, n_experts: int, train: TokenShards, cache: Path | None, **cfg):
    """(router, top-1 assignment of `train`'s documents), fitted with make_router(kind, n_experts,
    train.vocab_size, **cfg), or read from `cache` when the same settings were fitted on the same
    shards before. cache=None: always fit."""
    def fresh():
        router = make_router(kind, n_experts, train.vocab_size, **cfg).fit(train)
        return router, router.assign(train, scores=assign_scores(router, train, cache))
    if cache is None:
        return fresh()
    settings = json.dumps({"kind": kind, "n_experts": n_experts, "cfg": cfg, "shards": shards_key(train),
                           "version": VERSION}, sort_keys=True)
    d = Path(cache) / "routers" / hashlib.sha256(settings.encode()).hexdigest()[:16]
    with atomic.file_lock(d.with_name(d.name + ".lock")):  # a second plan on the machine waits, then reads
        if (d / "router" / "router.json").is_file() and (d / "assign.npy").is_file():
            return load_router(d / "router"), np.load(d / "assign.npy")
        router, assign = fresh()
        router.save(d / "router")
        with atomic.atomic_path(d / "assign.npy") as tmp, open(tmp, "wb") as f:
            np.save(f, assign)
        atomic.write_text(d / "settings.json", settings)
        return router, assign


def assign_scores(router, shards: TokenShards, cache: Path | None) -> np.ndarray:
    """router.assign_scores(shards), computed once per (router state, shards) under `cache` (None: always)."""
    if cache is None:
        return router.assign_scores(shards)
    p = Path(cache) / "scores" / f"v{VERSION}-{router.fingerprint()}-{shards_key(shards)}.npy"
    with atomic.file_lock(p.with_name(p.name + ".lock")):
        if p.is_file():
            return np.load(p)
        scores = np.asarray(router.assign_scores(shards))
        with atomic.atomic_path(p) as tmp, open(tmp, "wb") as f:
            np.save(f, scores)
        return scores


def assign_top(router, shards: TokenShards, r: int, cache: Path | None) -> np.ndarray:
    """router.assign_top(shards, r), its scores through `cache` (assign_scores above)."""
    if r >= router.n_experts:  # every document to every expert: no scores needed
        return router.assign_top(shards, r)
    return router.assign_top(shards, r, scores=assign_scores(router, shards, cache))


def _link_tree(src: Path, dst: Path):
    """dst mirrors src: every file hard-linked (copied where links are not possible)."""
    for f in sorted(src.rglob("*")):
        if f.is_file():
            t = dst / f.relative_to(src)
            t.parent.mkdir(parents=True, exist_ok=True)
            t.unlink(missing_ok=True)
            try:
                os.link(f, t)
            except OSError:
                shutil.copy2(f, t)


def route(router, shards: TokenShards, out_root: Path, cache: Path | None, assign=None) -> list[Path]:
    """route_shards(router, shards, out_root, assign), computed once per (router state, shards,
    assignment) under `cache` and hard-linked into out_root. cache=None: route directly."""
    if cache is None:
        return route_shards(router, shards, out_root, assign=assign)
    a = "" if assign is None else hashlib.sha256(np.asarray(assign, np.int64).tobytes()).hexdigest()[:16]
    d = Path(cache) / "routed" / f"v{VERSION}-{router.fingerprint()}-{shards_key(shards)}-{a or 'own'}"
    with atomic.file_lock(d.with_name(d.name + ".lock")):  # one writer per folder; a second plan waits
        route_shards(router, shards, d, assign=assign)   # reuses d when its key matches
    _link_tree(d, Path(out_root))
    return [Path(out_root) / p.name for p in sorted(d.glob("expert_*"))]
