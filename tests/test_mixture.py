"""Mixture inference against independent references: direct forward passes and hand formulas."""
import numpy as np
import pytest
import torch

from gmlib.lm import SingleLM, sample, window_logprobs, windows
from gmlib.mixture import MixtureConfig, MixtureLM, from_models
from gmlib.model import GPTConfig
from helpers import peaked_gpt

V = 40
CFG = GPTConfig(vocab_size=V, seq_len=16, n_layer=1, n_head=2, n_embd=16)


def expert(seed):
    return peaked_gpt(seed, CFG)


def ref_logprobs(model, toks):
    """Independent reference: one plain forward pass, log-softmax, pick the next token."""
    x = torch.tensor([list(toks)])
    with torch.no_grad():
        logits, _ = model(x)
    return torch.log_softmax(logits[0, :-1].double(), -1).gather(-1, x[0, 1:, None].long())[:, 0].numpy()


def doc(seed, T):
    return np.random.default_rng(seed).integers(1, V, T)


class HashRouter:
    """Content-dependent scores (a fixed random projection of token counts); records its calls."""

    def __init__(self, n_experts, seed=0):
        self.W = np.random.default_rng(seed).normal(size=(V, n_experts)) * 3
        self.calls = []

    def scores(self, docs):
        self.calls += [len(d) for d in docs]
        return np.stack([np.bincount(d, minlength=V) @ self.W / max(len(d), 1) for d in docs])


def test_windows_score_every_target_once():
    for T in [1, 2, 5, 16, 17, 40, 63]:
        seen = []
        for s, e, ft in windows(T, 16, 5):
            assert e - s <= 16 and s <= ft - 1 and ft < e
            seen += range(ft, e)
        assert seen == list(range(1, T))


def test_window_logprobs_match_direct_forward():
    m = expert(0)
    short, long = doc(1, 12), doc(2, 37)
    lp_short, lp_long = window_logprobs(m, [short, long], stride=8)
    np.testing.assert_allclose(lp_short, ref_logprobs(m, short), rtol=0, atol=1e-5)
    # targets 1..15 come from the first window; targets 16..23 from the window [8, 24)
    np.testing.assert_allclose(lp_long[:15], ref_logprobs(m, long[:16]), atol=1e-5)
    np.testing.assert_allclose(lp_long[15:23], ref_logprobs(m, long[8:24])[7:15], atol=1e-5)
    assert lp_long.shape == (36,) and np.all(lp_long < 0)


def test_k1_mixture_equals_the_expert_exactly():
    ms = [expert(s) for s in range(3)]
    docs = [doc(3, 30), doc(4, 9)]
    # one expert only
    for got, want in zip(from_models(ms[:1], cfg=MixtureConfig(k=1)).token_logprobs_many(docs),
                         SingleLM(ms[0]).token_logprobs_many(docs)):
        np.testing.assert_array_equal(got, want)
    # k=1 of three with a prior that picks expert 2
    mix = from_models(ms, cfg=MixtureConfig(k=1, reroute_every=0), base_prior=np.array([0.2, 0.3, 0.5]))
    for got, want in zip(mix.token_logprobs_many(docs), SingleLM(ms[2]).token_logprobs_many(docs)):
        np.testing.assert_array_equal(got, want)


def test_hand_computed_two_experts_three_tokens():
    a, b = expert(10), expert(11)
    x = np.array([3, 17, 5])
    pa, pb = np.exp(ref_logprobs(a, x)), np.exp(ref_logprobs(b, x))  # p_e(x1 | x0), p_e(x2 | x0 x1)
    prior, eta = np.array([0.3, 0.7]), 0.5
    mix = from_models([a, b], cfg=MixtureConfig(k=2, eta=eta), base_prior=prior)
    # t=1: weights are the prior; t=2: w_e ∝ prior_e · exp(-eta · (-log p_e(x1))) = prior_e · p_e(x1)^eta
    w2 = prior * np.array([pa[0], pb[0]]) ** eta
    w2 /= w2.sum()
    want = np.log([0.3 * pa[0] + 0.7 * pb[0], w2[0] * pa[1] + w2[1] * pb[1]])
    # (the scorer takes log-softmax in fp32, the reference in fp64: agreement to ~1e-7)
    np.testing.assert_allclose(mix.token_logprobs(x), want, rtol=1e-6)
    np.testing.assert_allclose(mix.weights(x), np.array([[0.3, w2[0]], [0.7, w2[1]]]), rtol=1e-6)
    # with a router and a known 2-token prefix: the prior is softmax(scores(x[:2]) / temperature)
    router = HashRouter(2, seed=1)
    s = router.scores([x[:2]])[0]
    p = np.exp(s / 0.5 - (s / 0.5).max())
    p /= p.sum()
    mix = from_models([a, b], router=router, cfg=MixtureConfig(k=2, eta=eta, temperature=0.5))
    w2 = p * np.array([pa[0], pb[0]]) ** eta
    w2 /= w2.sum()
    np.testing.assert_allclose(mix.token_logprobs(x, known=2)[1], np.log(w2 @ [pa[1], pb[1]]), rtol=1e-6)


def test_weights_stay_a_distribution_and_use_only_the_past():
    ms = [expert(s) for s in range(4)]
    router = HashRouter(4, seed=2)
    mix = from_models(ms, router=router, cfg=MixtureConfig(k=2, eta=1.0, reroute_every=5, route_from=2))
    x = doc(5, 40)  # longer than seq_len: sliding windows too
    w = mix.weights(x)
    assert w.shape == (4, 39)
    assert np.all(w >= 0) and np.allclose(w.sum(0), 1.0, atol=1e-12)
    assert np.all(w[:, 0] > 0) and np.all((w[:, 1:] > 0).sum(0) <= 2)  # target 1: every expert; then top-2
    assert len({tuple(np.flatnonzero(c)) for c in w.T}) > 1  # re-routing really changed the experts
    assert max(router.calls) < 40
    # honesty: changing token x_u changes nothing about p(x_t | x_<t) for t < u, nor w(t) for t <= u
    lp = mix.token_logprobs(x)
    for u in [3, 11, 26]:
        y = x.copy()
        y[u] = (y[u] + 7) % (V - 1) + 1
        np.testing.assert_array_equal(mix.token_logprobs(y)[:u - 1], lp[:u - 1])
        np.testing.assert_array_equal(mix.weights(y)[:, :u], w[:, :u])


def test_large_eta_follows_the_best_expert_so_far():
    ms = [expert(20), expert(21), expert(22)]
    x = doc(5, 15)  # on this text the best expert so far changes twice (0, then 1, then 2)
    mix = from_models(ms, cfg=MixtureConfig(k=3, eta=50.0))
    w = mix.weights(x)
    L = np.cumsum(-np.stack([ref_logprobs(m, x) for m in ms]), axis=1)  # L_e(<= t)
    leaders = []
    for t in range(1, len(x) - 1):  # weights for target t+1 follow the loss on targets 1..t
        gap = np.sort(L[:, t - 1])[1] - L[:, t - 1].min()
        if gap > 0.2:
            assert w[:, t].argmax() == L[:, t - 1].argmin() and w[:, t].max() > 0.99
            leaders.append(L[:, t - 1].argmin())
    assert len(set(leaders)) >= 2


@pytest.mark.parametrize("temperature,top_p", [(0.0, 1.0), (1.0, 1.0), (0.8, 0.9)])
def test_generation_with_cache_equals_without(temperature, top_p):
    ms = [expert(30), expert(31), expert(32)]
    single = SingleLM(ms[0])
    mix = from_models(ms, router=HashRouter(3), cfg=MixtureConfig(k=2, eta=1.0))
    for lm in (single, mix):
        for prompt, n in [([1, 5, 9], 8), ([1, 2, 3, 4, 5, 6], 20)]:  # the second overflows seq_len 16
            kw = dict(temperature=temperature, top_p=top_p, seed=7)
            cached = lm.generate(prompt, n, use_cache=True, **kw)
            assert cached == lm.generate(prompt, n, use_cache=False, **kw)
            assert cached == lm.generate(prompt, n, **kw)  # fixed seed: reproducible
            assert len(cached) == n and all(0 <= t < V for t in cached)


def test_greedy_generation_follows_the_mixture_distribution():
    """Greedy mixture generation picks argmax of sum_e w_e p_e, with w from the Hedge rule."""
    ms = [expert(40), expert(41)]
    mix = from_models(ms, cfg=MixtureConfig(k=2, eta=1.0))
    prompt = [1, 7, 3]
    out = mix.generate(prompt, 5, temperature=0.0)
    x = prompt + out
    for i in range(len(prompt), len(x)):
        # the mixture distribution over every candidate next token, from the scoring path
        cand = [lp[-1] for lp in mix.token_logprobs_many([np.array(x[:i] + [v]) for v in range(V)])]
        assert x[i] == int(np.argmax(cand))


def test_sample_respects_top_p_and_temperature():
    logp = np.log([0.5, 0.3, 0.2])
    rng = np.random.default_rng(0)
    assert {sample(logp, 0.0, 1.0, rng) for _ in range(20)} == {0}
    assert {sample(logp, 1.0, 0.5, rng) for _ in range(200)} == {0}
    assert {sample(logp, 1.0, 0.6, rng) for _ in range(200)} == {0, 1}
    draws = np.bincount([sample(logp, 1.0, 1.0, rng) for _ in range(20000)], minlength=3) / 20000
    np.testing.assert_allclose(draws, [0.5, 0.3, 0.2], atol=0.015)
    # temperature 0.5 squares the probabilities: 25:9:4
    draws = np.bincount([sample(logp, 0.5, 1.0, rng) for _ in range(20000)], minlength=3) / 20000
    np.testing.assert_allclose(draws, np.array([25, 9, 4]) / 38, atol=0.015)
    # a large vocabulary (the partial-sort path): the draws are exactly the reference nucleus
    for scale in (1.0, 2.0):  # nucleus of 294 tokens (full sort) and of 16 (partial sort)
        logp = np.random.default_rng(1).normal(size=5000) * scale
        p = np.exp(logp - logp.max()) / np.exp(logp - logp.max()).sum()
        order = np.argsort(-p)
        nucleus = set(order[:np.searchsorted(np.cumsum(p[order]), 0.3) + 1].tolist())
        draws = {sample(logp, 1.0, 0.3, rng) for _ in range(3000)}
        assert draws <= nucleus and (len(nucleus) > 100 or draws == nucleus)


def test_experts_are_loaded_only_when_needed():
    ms = [expert(s) for s in range(4)]
    loads = []
    mix = MixtureLM(lambda e: loads.append(e) or ms[e], 4, cfg=MixtureConfig(k=2, reroute_every=0),
                    base_prior=np.array([0.1, 0.4, 0.2, 0.3]), expert_n_params=CFG.n_params)
    mix.token_logprobs_many([doc(6, 20), doc(7, 10)])
    assert sorted(loads) == [1, 3]  # the top-2 of the prior, each loaded once for both documents
    loads.clear()
    mix.generate([1, 2], 3, temperature=0.0)
    assert sorted(loads) == [1, 3]
    assert mix.params_total == 4 * CFG.n_params and mix.params_active == 2 * CFG.n_params


def test_with_the_projects_router():
    """The mixture takes gmlib.router's routers as they are (prefix scores -> prior)."""
    from gmlib.router import make_router
    docs = [doc(100 + i, 30) for i in range(40)]
    router = make_router("local", 3, V, n_features=64, n_units=256, wta_k=16, epochs=1).fit(docs)
    mix = from_models([expert(s) for s in range(3)], router=router,
                      cfg=MixtureConfig(k=2, reroute_every=8, route_from=4))
    w = mix.weights(docs[0])
    assert np.allclose(w.sum(0), 1.0) and np.all((w[:, 3:] > 0).sum(0) <= 2)  # from target 4 (prefix of 4 tokens)
    assert np.all(w[:, :3] > 0)
    assert len(mix.generate(docs[1][:10], 5, temperature=0.0)) == 5


def test_a_remembered_router_scores_each_prefix_once_and_changes_nothing():
    from gmlib.mixture import ScoreMemo
    ms, docs = [expert(s) for s in range(3)], [doc(s, 30) for s in range(4)]
    plain, router = HashRouter(3, seed=3), HashRouter(3, seed=3)
    memo = ScoreMemo(router)
    for k, pool in ((1, "linear"), (2, "linear"), (2, "log-linear")):   # the mixtures 05 scores of one gm
        cfg = MixtureConfig(k=k, eta=1.0, reroute_every=8, route_from=4, pool=pool)
        want = from_models(ms, router=plain, cfg=cfg).token_logprobs_many(docs)
        got = from_models(ms, router=memo, cfg=cfg).token_logprobs_many(docs)
        assert all(np.array_equal(a, b) for a, b in zip(want, got))
    assert len(router.calls) == len(plain.calls) // 3 and len(memo.memo) == len(router.calls)


def test_shared_expert_passes_change_nothing_and_read_each_document_once():
    ms, docs = [expert(s) for s in range(3)], [doc(s, 40) for s in range(4)]
    calls = []

    def counting(e):
        calls.append(e)
        return ms[e]
    passes = {}
    for k, pool in ((1, "linear"), (2, "linear"), (3, "linear"), (2, "log-linear"), (3, "log-linear")):
        cfg = MixtureConfig(k=k, eta=1.0, reroute_every=8, route_from=4, pool=pool)
        want = from_models(ms, router=HashRouter(3, seed=4), cfg=cfg).token_logprobs_many(docs)
        shared = MixtureLM(counting, 3, HashRouter(3, seed=4), cfg, expert_n_params=1, passes=passes)
        got = shared.token_logprobs_many(docs)
        assert all(np.array_equal(a, b) for a, b in zip(want, got)), (k, pool)
    assert len(passes) == 3 * len(docs)   # every expert read every document once, in full
