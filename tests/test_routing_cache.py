"""The routing cache returns what a fresh fit and routing would, and computes each only once."""
import os

import numpy as np

from gmlib import routing_cache
from gmlib import router as router_mod
from gmlib.data import TokenShards
from gmlib.router import route_shards

SMALL = dict(n_features=2 ** 10, n_units=2 ** 12, unit_inputs=4, wta_k=64, epochs=1, batch_docs=64, seed=3)


def test_fit_is_cached_per_settings_and_shards(tiny_shards, tmp_path, monkeypatch):
    train = TokenShards(tiny_shards / "train")
    r1, a1 = routing_cache.fit("local", 3, train, tmp_path, **SMALL)
    calls = []
    monkeypatch.setattr(routing_cache, "make_router",
                        lambda *a, **k: calls.append(a) or router_mod.make_router(*a, **k))
    r2, a2 = routing_cache.fit("local", 3, train, tmp_path, **SMALL)
    assert not calls and r2.fingerprint() == r1.fingerprint() and np.array_equal(a1, a2)  # read, not refitted
    r3, _ = routing_cache.fit("local", 3, train, tmp_path, **{**SMALL, "seed": 4})     # other settings: a new fit
    assert len(calls) == 1 and r3.fingerprint() != r1.fingerprint()
    fresh = router_mod.make_router("local", 3, train.vocab_size, **SMALL).fit(train)
    assert fresh.fingerprint() == r1.fingerprint() and np.array_equal(fresh.assign(train), a1)


def test_route_links_the_same_shards_a_direct_routing_writes(tiny_shards, tmp_path):
    train = TokenShards(tiny_shards / "train")
    rt, assign = routing_cache.fit("local", 3, train, None, **SMALL)
    direct = route_shards(rt, train, tmp_path / "direct", assign=assign)
    a = routing_cache.route(rt, train, tmp_path / "gm_a", tmp_path / "cache", assign=assign)
    b = routing_cache.route(rt, train, tmp_path / "gm_b", tmp_path / "cache", assign=assign)
    for d, pa, pb in zip(direct, a, b):
        assert np.array_equal(np.concatenate([TokenShards(d).doc(i) for i in range(TokenShards(d).n_docs)]),
                              np.concatenate([TokenShards(pa).doc(i) for i in range(TokenShards(pa).n_docs)]))
        fa, fb = sorted(p for p in pa.rglob("*") if p.is_file()), sorted(p for p in pb.rglob("*") if p.is_file())
        assert fa and all(os.path.samefile(x, y) for x, y in zip(fa, fb))  # one copy on disk, linked into both
    # another assignment is another routing
    c = routing_cache.route(rt, train, tmp_path / "gm_c", tmp_path / "cache", assign=(assign + 1) % 3)
    assert not os.path.samefile(c[0] / "meta.json", a[0] / "meta.json")


def test_top_r_assignment_scores_the_corpus_once_and_equals_the_router_s(tiny_shards, tmp_path, monkeypatch):
    train = TokenShards(tiny_shards / "train")
    rt, top1 = routing_cache.fit("local", 3, train, tmp_path, **SMALL)  # scores the corpus and keeps the scores
    calls = []
    real = type(rt).assign_scores
    monkeypatch.setattr(type(rt), "assign_scores", lambda self, docs: calls.append(1) or real(self, docs))
    top2 = routing_cache.assign_top(rt, train, 2, tmp_path)
    assert not calls  # read from the cache the fit filled
    monkeypatch.undo()
    assert np.array_equal(top2, rt.assign_top(train, 2)) and np.array_equal(top2[:, 0], top1)
    other = router_mod.make_router("local", 3, train.vocab_size, **{**SMALL, "seed": 5}).fit(train)
    assert np.array_equal(routing_cache.assign_top(other, train, 2, tmp_path), other.assign_top(train, 2))
    assert len(list((tmp_path / "scores").glob("*.npy"))) == 2  # one per router state
