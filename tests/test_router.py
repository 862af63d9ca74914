"""The router: features and FlyHash against hand computations, the local rule's update,
balance, planted-topic recovery, refinement, persistence, per-expert shards, the report."""
import math

import numpy as np
import pytest
import torch

from gmlib import routing_report as rr
from gmlib.data import ShardWriter, TokenShards
from gmlib.router import (FlyHash, Features, LocalRouter, RouterConfig, balanced_assign, balanced_assign_top,
                          load_router, make_router, route_shards)

# small and fast: every router in this file fits in well under a second
SMALL = dict(n_features=2 ** 10, n_units=2 ** 12, unit_inputs=4, wta_k=64, epochs=3, batch_docs=64)


def topic_docs(n_topics=4, per_topic=40, vocab=400, seed=0):
    """Planted topics: topic t draws 70% of its tokens from its own 40 words, 30% from 40
    common words shared by all. Returns (docs as [bos]+ids, topic labels)."""
    rng = np.random.default_rng(seed)
    docs, labels = [], []
    for t in range(n_topics):
        own = np.arange(40 + 40 * t, 80 + 40 * t)
        for _ in range(per_topic):
            L = int(rng.integers(40, 160))
            ids = np.where(rng.random(L) < 0.7, rng.choice(own, L), rng.integers(2, 40, L))
            docs.append(np.concatenate([[1], ids]).astype(np.int64))
            labels.append(t)
    order = rng.permutation(len(docs))
    assert 80 + 40 * (n_topics - 1) <= vocab
    return [docs[i] for i in order], np.array(labels)[order]


@pytest.fixture(scope="module")
def planted():
    return topic_docs()


def write_shards(root, docs, sources, source_of, vocab=400):
    with ShardWriter(root, vocab, sources) as w:
        for d, s in zip(docs, source_of):
            w.add(d, source=int(s), nbytes=2 * len(d))
    return TokenShards(root)


# ---------------------------------------------------------------- features, FlyHash, assignment

def test_tfidf_matches_hand_computation():
    cfg = RouterConfig(vocab_size=16, n_features=2 ** 16)
    f = Features(cfg)
    docs = [np.array([1, 5, 5, 7]), np.array([1, 5, 8]), np.array([1, 9])]
    b = {t: int(f._bucket(np.array([t], np.uint64))[0]) for t in (1, 5, 7, 8, 9)}
    assert len(set(b.values())) == 5, "test tokens collide; pick others"
    f.fit(docs)
    # idf = log((1 + N) / (1 + df)), N = 3: bos is in every document, so it weighs nothing
    assert f.idf[b[1]] == pytest.approx(0.0)
    assert f.idf[b[5]] == pytest.approx(math.log(4 / 3))
    assert f.idf[b[7]] == pytest.approx(math.log(2))
    indptr, j, x = f.transform(docs[:1])
    got = dict(zip(j.tolist(), x.tolist()))
    w5, w7 = (1 + math.log(2)) * math.log(4 / 3), 1 * math.log(2)  # sublinear tf * idf
    norm = math.hypot(w5, w7)
    assert got[b[5]] == pytest.approx(w5 / norm, rel=1e-5)
    assert got[b[7]] == pytest.approx(w7 / norm, rel=1e-5)
    assert got.get(b[1], 0.0) == 0.0 and list(indptr) == [0, len(j)]


def test_bigrams_add_features_within_documents_only():
    on = Features(RouterConfig(vocab_size=16, n_features=2 ** 16, bigrams=True))
    off = Features(RouterConfig(vocab_size=16, n_features=2 ** 16))
    docs = [np.array([1, 3, 4]), np.array([1, 3, 4])]
    # 3 unigrams + 2 bigrams per document; the (4 -> 1) pair across the boundary is not a bigram
    assert np.diff(on.counts(docs)[0]).tolist() == [5, 5]
    assert np.diff(off.counts(docs)[0]).tolist() == [3, 3]


def test_flyhash_equals_dense_projection_and_topk():
    cfg = RouterConfig(n_features=64, n_units=256, unit_inputs=3, wta_k=10)
    fly = FlyHash(cfg)
    P = np.zeros((cfg.n_units, cfg.n_features))
    for u, ins in enumerate(fly.inputs):
        for i in ins:
            P[u, i] += 1  # a dim sampled twice counts twice
    rng = np.random.default_rng(0)
    dense = np.where(rng.random((5, 64)) < 0.2, rng.random((5, 64)), 0.0)
    indptr = np.concatenate([[0], np.cumsum((dense > 0).sum(1))])
    j = np.concatenate([np.flatnonzero(r) for r in dense])
    csr = (indptr, j, dense[dense > 0].astype(np.float32))
    act = fly.activations(csr)
    np.testing.assert_allclose(act, dense.astype(np.float32).astype(np.float64) @ P.T, rtol=1e-6, atol=1e-9)
    codes = fly.codes(csr)
    for r in range(5):
        ref = np.sort(np.argsort(-act[r], kind="stable")[:10])
        assert set(codes[r]) == set(ref) or np.isclose(act[r][codes[r]].sum(), act[r][ref].sum())


def test_balanced_assign_caps_and_prefers_high_scores():
    s = np.array([[3.0, 0], [2, 0], [1, 0], [0.5, 0.4]])
    # without pressure it is the argmax
    assert balanced_assign(s, float("inf")).tolist() == [0, 0, 0, 0]
    # cap 2: expert 0 keeps its two best documents, the others move
    assert balanced_assign(s, 0.0).tolist() == [0, 0, 1, 1]
    # weighted: expert 0 may take documents while its load is under cap = 10 / 2
    w = np.array([4, 4, 1, 1])
    lab = balanced_assign(s, 0.0, w)
    assert lab.tolist() == [0, 0, 1, 1]
    rng = np.random.default_rng(1)
    S, W = rng.random((500, 7)), rng.integers(1, 50, 500)
    lab = balanced_assign(S, 0.1, W)
    load = np.bincount(lab, W, minlength=7)
    assert load.max() <= W.sum() / 7 * 1.1 + W.max()


def test_top_r_assignment_is_distinct_balanced_and_starts_with_the_top_1():
    rng = np.random.default_rng(2)
    S, W = rng.random((600, 6)), rng.integers(1, 50, 600)
    top = balanced_assign_top(S, 2, 0.1, W)
    assert top.shape == (600, 2) and np.array_equal(top[:, 0], balanced_assign(S, 0.1, W))
    kept = top[:, 1] >= 0
    assert kept.mean() > 0.95 and (top[kept, 0] != top[kept, 1]).all()   # two distinct experts (rarely one)
    load = np.bincount(top[top >= 0], np.repeat(W[:, None], 2, 1)[top >= 0], minlength=6)
    assert load.max() <= 2 * (W.sum() / 6 * 1.1 + W.max())           # each round within its cap
    # without capacity pressure: the two best experts of every row
    free = balanced_assign_top(S, 2, float("inf"))
    assert np.array_equal(np.sort(free, 1), np.sort(np.argsort(-S, 1)[:, :2], 1))
    # r = K: every row to every expert
    assert np.array_equal(balanced_assign_top(S, 6), np.tile(np.arange(6), (600, 1)))


# ---------------------------------------------------------------- the local rule

def test_single_hebbian_update_matches_hand_computation():
    cfg = RouterConfig(n_experts=3, n_units=16, wta_k=4, lr=0.1)
    r = LocalRouter(cfg)
    rng = np.random.default_rng(0)
    r.protos = rng.random((3, 16))
    r.wins = np.array([50.0, 3.0, 50.0])
    before = r.protos.copy()
    code = np.array([[1, 4, 9, 15]])
    x = np.zeros(16)
    x[code[0]] = 1 / 2  # k = 4 ones, L2-normalised
    r.hebb(code, np.array([1]))
    a = max(0.1, 1 / 4)  # expert 1 has won 3 documents: this is its 4th, a = 1/4
    np.testing.assert_allclose(r.protos[1], before[1] + a * (x - before[1]))
    np.testing.assert_array_equal(r.protos[[0, 2]], before[[0, 2]])  # losers do not move
    assert r.wins.tolist() == [50, 4, 50]


def test_batched_update_equals_sequential_updates():
    cfg = RouterConfig(n_experts=2, n_units=32, wta_k=4, lr=0.05)
    rng = np.random.default_rng(2)
    codes = np.sort(np.stack([rng.choice(32, 4, replace=False) for _ in range(9)]), axis=1)
    winners = np.array([0, 1, 0, 0, 1, 0, 1, 1, 0])
    a, b = LocalRouter(cfg), LocalRouter(cfg)
    a.protos = rng.random((2, 32))
    b.protos = a.protos.copy()
    a.wins[:] = b.wins[:] = [5, 30]
    a.hebb(codes, winners)
    for c, w in zip(codes, winners):
        b.hebb(c[None], np.array([w]))
    np.testing.assert_allclose(a.protos, b.protos, rtol=1e-12)


def test_winning_prototype_moves_toward_its_document(planted):
    docs, _ = planted
    r = make_router("local", 4, 400, **SMALL).fit(docs[:60])
    codes = r.codes(docs[60:100])
    k = r.cfg.wta_k
    for c in codes:
        x = np.zeros(r.cfg.n_units)
        x[c] = 1 / math.sqrt(k)
        before = r.protos.copy()
        (e,) = r.step(c[None])
        assert np.linalg.norm(r.protos[e] - x) < np.linalg.norm(before[e] - x)
        others = np.arange(4) != e
        np.testing.assert_array_equal(r.protos[others], before[others])


def test_local_rule_never_uses_autograd(planted, monkeypatch):
    def boom(*a, **k):
        raise AssertionError("the local rule must not call autograd")
    monkeypatch.setattr(torch.autograd, "backward", boom)
    monkeypatch.setattr(torch.autograd, "grad", boom)
    monkeypatch.setattr(torch.Tensor, "backward", boom)
    docs, _ = planted
    r = make_router("local", 4, 400, **SMALL).fit(docs)
    r.refine(docs, np.random.default_rng(0).random((len(docs), 4)))
    for name, v in r.state().items():
        assert isinstance(v, np.ndarray), f"{name} is {type(v)}: the state is plain numpy"


def test_local_rule_separates_planted_topics_better_than_random(planted):
    docs, topics = planted
    local = make_router("local", 4, 400, **SMALL).fit(docs)
    rand = make_router("random", 4, 400).fit(docs)
    nmi_local, nmi_rand = rr.nmi(local.assign(docs), topics), rr.nmi(rand.assign(docs), topics)
    assert nmi_local > 0.8 and nmi_rand < 0.1, (nmi_local, nmi_rand)
    # the soft scores agree: each topic's documents score highest on one expert
    best = local.scores(docs).argmax(1)
    assert rr.nmi(best, topics) > 0.8


def test_fit_is_deterministic_given_seed(planted):
    docs, _ = planted
    a = make_router("local", 4, 400, seed=3, **SMALL).fit(docs)
    b = make_router("local", 4, 400, seed=3, **SMALL).fit(docs)
    c = make_router("local", 4, 400, seed=4, **SMALL).fit(docs)
    np.testing.assert_array_equal(a.scores(docs), b.scores(docs))
    assert a.fingerprint() == b.fingerprint() != c.fingerprint()


# ---------------------------------------------------------------- baselines

def test_random_split_is_balanced_and_deterministic(planted):
    docs, _ = planted
    a = make_router("random", 8, 400, balance="docs", slack=0.0).assign(docs)
    b = make_router("random", 8, 400, balance="docs", slack=0.0).assign(docs)
    c = make_router("random", 8, 400, balance="docs", slack=0.0, seed=1).assign(docs)
    np.testing.assert_array_equal(a, b)
    assert (a != c).mean() > 0.5
    assert np.bincount(a, minlength=8).tolist() == [20] * 8  # 160 documents, 8 experts
    # it depends on the content of each document, not on its position
    perm = np.random.default_rng(0).permutation(len(docs))
    again = make_router("random", 8, 400, balance="docs", slack=0.0).assign([docs[i] for i in perm])
    np.testing.assert_array_equal(again, a[perm])
    assert np.all(make_router("random", 8, 400).scores(docs) == 0)


def test_kmeans_recovers_planted_clusters_with_tight_balance(planted):
    docs, topics = planted
    r = make_router("kmeans", 4, 400, balance="docs", slack=0.0, n_features=2 ** 10).fit(docs)
    lab = r.assign(docs)
    assert rr.nmi(lab, topics) > 0.95
    assert np.bincount(lab, minlength=4).tolist() == [40] * 4
    s = r.scores(docs)
    assert s.shape == (len(docs), 4) and np.all(s <= 1 + 1e-5)


# ---------------------------------------------------------------- refinement, persistence

@pytest.mark.parametrize("kind", ["local", "kmeans", "random"])
def test_refine_moves_document_to_the_expert_that_predicts_it_best(planted, kind):
    docs, _ = planted
    r = make_router(kind, 4, 400, balance="docs", slack=0.1, **SMALL).fit(docs)
    old = r.assign(docs)
    losses = np.full((len(docs), 4), 3.0)
    losses[np.arange(len(docs)), old] = 2.0   # every expert predicts its own documents best ...
    target = (old[0] + 1) % 4
    losses[0, target] = 1.0                   # ... except document 0, best on another expert
    new = r.refine(docs, losses)
    assert new[0] == target
    np.testing.assert_array_equal(new[1:], old[1:])
    with pytest.raises(ValueError, match="shape"):
        r.refine(docs, losses[:, :3])


def test_refine_pulls_the_prototype_toward_the_moved_documents(planted):
    docs, topics = planted
    r = make_router("local", 4, 400, **SMALL).fit(docs)
    old = r.assign(docs)
    # the experts report that topic-0 documents are best predicted by expert e
    e = int(np.bincount(old[topics != 0], minlength=4).argmax())
    t0 = np.flatnonzero(topics == 0)
    losses = np.full((len(docs), 4), 3.0)
    losses[np.arange(len(docs)), old] = 2.0
    losses[t0, :] = 3.0
    losses[t0, e] = 1.0
    before = r.scores([docs[i] for i in t0])[:, e].mean()
    new = r.refine(docs, losses, slack=float("inf"))
    assert np.all(new[t0] == e)
    assert r.scores([docs[i] for i in t0])[:, e].mean() > before


def test_refined_prototype_is_halfway_to_its_new_documents(planted):
    docs, _ = planted
    r = make_router("local", 4, 400, balance="docs", **SMALL).fit(docs)
    old = r.protos.copy()
    target = np.arange(len(docs)) % 4
    losses = np.where(np.arange(4) == target[:, None], 1.0, 2.0)
    assert r.refine(docs, losses).tolist() == target.tolist()
    codes = r.codes(docs)
    for e in range(4):
        x = np.zeros((len(docs), r.cfg.n_units))
        np.put_along_axis(x, codes.astype(np.int64), 1 / math.sqrt(r.cfg.wta_k), axis=1)
        # the old prototype weighs as much as the 40 new documents: exactly halfway
        np.testing.assert_allclose(r.protos[e], 0.5 * old[e] + 0.5 * x[target == e].mean(0), atol=1e-12)


@pytest.mark.parametrize("kind", ["local", "kmeans", "random"])
def test_save_load_round_trip(planted, tmp_path, kind):
    docs, _ = planted
    r = make_router(kind, 4, 400, **SMALL).fit(docs)
    r.save(tmp_path / "r")
    q = load_router(tmp_path / "r")
    assert type(q) is type(r) and q.cfg == r.cfg and q.fingerprint() == r.fingerprint()
    np.testing.assert_array_equal(q.scores(docs), r.scores(docs))
    np.testing.assert_array_equal(q.assign(docs), r.assign(docs))


def test_load_reports_incomplete_or_mismatched_folders(planted, tmp_path):
    docs, _ = planted
    r = make_router("local", 4, 400, **SMALL).fit(docs)
    with pytest.raises(FileNotFoundError, match="router.json"):
        load_router(tmp_path / "none")
    r.save(tmp_path / "r")
    r.protos[0, 0] += 1
    np.savez(tmp_path / "r" / "state.npz", **r.state())  # state changed behind the manifest's back
    with pytest.raises(ValueError, match="fingerprint"):
        load_router(tmp_path / "r")
    with pytest.raises(ValueError, match="unknown router settings"):
        make_router("local", 4, 400, n_unit=5)
    with pytest.raises(ValueError, match="kind"):
        make_router("lsh", 4, 400)


# ---------------------------------------------------------------- per-expert shards and the report

def test_route_shards_writes_each_document_once_and_reuses(planted, tmp_path):
    docs, topics = planted
    shards = write_shards(tmp_path / "src", docs, ["a", "b", "c", "d"], topics)
    r = make_router("local", 4, 400, **SMALL).fit(shards)
    paths = route_shards(r, shards, tmp_path / "routed")
    lab = r.assign(shards)
    seen = []
    for e, p in enumerate(paths):
        out = TokenShards(p)
        assert out.sources == shards.sources
        mine = np.flatnonzero(lab == e)
        assert len(out) == len(mine)
        for k, i in enumerate(mine):  # in corpus order, with source and byte count
            np.testing.assert_array_equal(out.doc(k), shards.doc(i))
            assert out.doc_source[k] == shards.doc_source[i] and out.doc_nbytes[k] == shards.doc_nbytes[i]
        seen += mine.tolist()
    assert sorted(seen) == list(range(len(docs)))
    stamp = [(p / "meta.json").stat().st_mtime_ns for p in paths]
    assert route_shards(r, shards, tmp_path / "routed") == paths
    assert [(p / "meta.json").stat().st_mtime_ns for p in paths] == stamp  # reused, not rewritten
    # a given assignment (e.g. after refinement) is a different routing: rewritten
    moved = lab.copy()
    moved[0] = (moved[0] + 1) % 4
    route_shards(r, shards, tmp_path / "routed", assign=moved)
    assert sum(len(TokenShards(p)) for p in paths) == len(docs)
    assert len(TokenShards(paths[moved[0]])) == (moved == moved[0]).sum()


def test_nmi_and_balance_against_hand_values():
    assert rr.nmi([0, 0, 1, 1], [5, 5, 7, 7]) == pytest.approx(1.0)
    assert rr.nmi([0, 1, 0, 1], [0, 0, 1, 1]) == pytest.approx(0.0, abs=1e-12)
    # a = [0,0,0,1], b = [0,0,1,1]: I = 0.5 log 2 + 0.25 log(1/(0.75*0.5)) + 0.25 log(1/(0.25*0.5)) - ... by hand:
    p = {(0, 0): .5, (0, 1): .25, (1, 1): .25}
    pa, pb = {0: .75, 1: .25}, {0: .5, 1: .5}
    mi = sum(v * math.log(v / (pa[i] * pb[j])) for (i, j), v in p.items())
    h = -sum(v * math.log(v) for v in pa.values()) - sum(v * math.log(v) for v in pb.values())
    assert rr.nmi([0, 0, 0, 1], [0, 0, 1, 1]) == pytest.approx(2 * mi / h)
    b = rr.balance(np.array([0, 0, 1, 2]), 4)
    assert b["max_share"] == 0.5 and b["min_share"] == 0.0 and b["max_over_ideal"] == 2.0
    shares = np.array([.5, .25, .25, 0])
    assert b["cv"] == pytest.approx(shares.std() / shares.mean())
    assert b["entropy"] == pytest.approx(-(0.5 * math.log(.5) + 0.5 * math.log(.25)) / math.log(4))


def test_routing_table_and_figure_on_planted_topics(planted, tmp_path):
    docs, topics = planted
    shards = write_shards(tmp_path / "src", docs, ["t0", "t1", "t2", "t3"], topics)
    lab = topics.copy()  # the perfect router
    df = rr.routing_table(lab, shards, 4, decode_piece=lambda i: f"w{i}")
    assert df["docs"].sum() == len(docs) and df["tokens"].sum() == shards.n_tokens
    assert df["share"].sum() == pytest.approx(1.0)
    for e in range(4):
        # the top tokens are the topic's own words, the source mix is pure
        ids = [int(w[1:]) for w in df.loc[e, "top_tokens"].split()]
        assert ids and all(40 + 40 * e <= i < 80 + 40 * e for i in ids)
        assert df.loc[e, "sources"] == f"t{e} 100%"
    counts = rr.token_counts(lab, shards, 4)
    assert counts.sum() == shards.n_tokens - len(docs)  # every token but the bos of each document
    s = rr.routing_summary(lab, shards, 4)
    assert s["nmi_source"] == pytest.approx(1.0) and s["docs"]["max_over_ideal"] == pytest.approx(1.0)
    cmp = rr.compare_routers({"perfect": lab, "random": make_router("random", 4, 400).assign(shards)}, shards, 4)
    assert cmp.set_index("router").loc["perfect", "nmi_source"] > cmp.set_index("router").loc["random", "nmi_source"]
    fig = rr.routing_figure(lab, shards, 4, title="planted")
    assert len(fig.axes) == 2 and fig.axes[0].get_ylabel() and fig.axes[1].get_xlabel() == "expert"
    with pytest.raises(ValueError, match="assignment"):
        rr.routing_table(lab[:-1], shards, 4)


# ---------------------------------------------------------------- real documents

@pytest.fixture(scope="module")
def real_train(tiny_shards):
    return TokenShards(tiny_shards / "train")


@pytest.mark.parametrize("E", [4, 8])
def test_balance_on_real_documents(real_train, E):
    sh = real_train
    tokens = sh.doc_end - sh.doc_start
    # the local rule's own balancing (no cap at all): every token share within +-50% of 1/E
    local = make_router("local", E, sh.vocab_size, **SMALL).fit(sh)
    share = np.bincount(local.assign(sh, slack=float("inf")), tokens, minlength=E) / tokens.sum()
    assert share.min() > 0.5 / E and share.max() < 1.5 / E, share * E
    # with the default cap of 5%: at most one document over
    cap = tokens.sum() / E * 1.05 + tokens.max()
    for kind in ("local", "kmeans", "random"):
        r = local if kind == "local" else make_router(kind, E, sh.vocab_size, **SMALL).fit(sh)
        load = np.bincount(r.assign(sh), tokens, minlength=E)
        assert load.max() <= cap, (kind, load)
    # balanced k-means by documents is tight: ceil(n / E) at most
    km = make_router("kmeans", E, sh.vocab_size, balance="docs", slack=0.0, **SMALL).fit(sh)
    assert np.bincount(km.assign(sh), minlength=E).max() == math.ceil(len(sh) / E)


def test_local_rule_is_topical_on_real_documents(real_train, tiny_tokenizer_path):
    import sentencepiece as spm
    sh = real_train
    nmi = {}
    for kind in ("local", "kmeans", "random"):
        r = make_router(kind, 4, sh.vocab_size, **SMALL).fit(sh)
        nmi[kind] = rr.nmi(r.assign(sh), sh.doc_source)
    assert nmi["local"] > nmi["random"] + 0.1, nmi
    sp = spm.SentencePieceProcessor(model_file=str(tiny_tokenizer_path))
    df = rr.routing_table(r.assign(sh), sh, 4, decode_piece=sp.id_to_piece)
    assert len(df) == 4 and all(df["top_tokens"].str.len() > 0)
