"""What the held-out evaluation claims, against hand computations: macro bpb, the per-document
table, the cap, the oracle, inference routing equal to training routing, BTM's random baseline,
log-linear pooling."""
import math

import numpy as np
import pytest
import torch

from gmlib import eval_docs
from gmlib import evaluate as ev
from gmlib.lm import SingleLM
from gmlib.mixture import MixtureConfig, from_models
from gmlib.model import GPT, GPTConfig
from pipeline import records
from helpers import peaked_gpt

V = 40
CFG = GPTConfig(vocab_size=V, seq_len=16, n_layer=1, n_head=2, n_embd=16)


def expert(seed):
    return peaked_gpt(seed, CFG)


class Fixed:
    """A rigged model: document i gets exactly bits[i] bits (all on its first target)."""

    def __init__(self, bits):
        self.bits, self.params_total, self.params_active = list(bits), 1, 1

    def token_logprobs_many(self, docs, known=None):
        out = []
        for d, b in zip(docs, self.bits):
            lp = np.zeros(len(d) - 1)
            lp[0] = -b * math.log(2)
            out.append(lp)
        return out


def two_source_docs():
    # source a: two documents of 10 and 30 bytes; source b: one document of 100 bytes
    toks = np.array([1, 2, 3])
    return [eval_docs.EvalDoc(toks, 10, 2, "a"), eval_docs.EvalDoc(toks, 30, 5, "a"),
            eval_docs.EvalDoc(toks, 100, 9, "b")]


def test_macro_bpb_on_two_sources_equals_the_hand_computation():
    docs = two_source_docs()
    models = {"ref": Fixed([20, 40, 150]), "m": Fixed([10, 30, 200])}
    dt = ev.doc_table(models, docs)
    q = ev.quality_from_docs(dt, ev.model_info(models), n_boot=200).set_index("model")
    # ref: a = (20 + 40) / 40 = 1.5, b = 150 / 100 = 1.5 -> macro 1.5; micro 210 / 140 = 1.5
    # m:   a = 40 / 40 = 1.0,  b = 2.0 -> macro 1.5; micro 240 / 140
    assert q.loc["ref", "bpb_macro"] == pytest.approx(1.5, rel=1e-12) == q.loc["m", "bpb_macro"]
    assert q.loc["m", "bpb"] == pytest.approx(240 / 140, rel=1e-12)
    assert q.loc["m", "bpb_macro_delta"] == pytest.approx(0.0, abs=1e-12)  # -0.5 on a, +0.5 on b
    assert q.loc["m", "bpb_delta"] == pytest.approx(30 / 140, rel=1e-12)
    # source b has one document: every resample of it is the same, so b's bpb never moves;
    # source a's resamples give a in {1.5 (both), 2.0 (doc 1 twice), 4/3 (doc 2 twice)} for ref
    lo, hi = q.loc["ref", "bpb_macro_lo"], q.loc["ref", "bpb_macro_hi"]
    assert (4 / 3 + 1.5) / 2 <= lo <= 1.5 <= hi <= (2.0 + 1.5) / 2
    st = ev.source_table(dt, n_boot=200).set_index(["model", "source"])
    assert st.loc[("m", "a"), "bpb"] == pytest.approx(1.0) and st.loc[("m", "b"), "bpb"] == pytest.approx(2.0)
    assert st.loc[("m", "b"), "bpb_lo"] == st.loc[("m", "b"), "bpb_hi"] == pytest.approx(2.0)
    rec = records.metrics_record(q.reset_index(), {})
    assert rec["reference"] == "ref" and \
        rec["models"]["m"]["bpb_macro_ci"] == [q.loc["m", "bpb_macro_lo"], q.loc["m", "bpb_macro_hi"]]
    assert rec["models"]["m"]["bpb_macro_delta"]["vs"] == "ref" and rec["models"]["m"]["max_doc_tokens"] is None


class CharTok:
    def __init__(self):
        self.chars = ["<unk>", "<s>"] + [chr(c) for c in range(ord("а"), ord("я") + 1)] + [" ", "."]

    def encode(self, t):
        return [self.chars.index(c) if c in self.chars else 0 for c in t]

    def decode(self, ids):
        return "".join(self.chars[i] for i in ids)

    def bos_id(self):
        return 1


def test_doc_table_sums_to_micro_and_the_cap_is_the_same_for_every_model(tmp_path):
    tok = CharTok()
    texts = ["мама мыла раму и пела весь день." * 2, "кот спит.", "дождь идёт всю ночь и весь день без конца."]
    path = tmp_path / "c.jsonl"
    path.write_text("".join(f'{{"text": "{t}", "source": "s{i % 2}"}}\n' for i, t in enumerate(texts)),
                    encoding="utf-8")
    docs = eval_docs.docs_from_jsonl(path, tok, max_doc_tokens=20)
    assert [len(d.tokens) - 1 for d in docs] == [20, 9, 20]            # capped, the short one whole
    assert docs[0].nbytes == len(texts[0][:20].encode()) and docs[1].nbytes == len(texts[1].encode())
    vocab = len(tok.chars)
    models = {"a": SingleLM(GPT(GPTConfig(vocab_size=vocab, seq_len=16, n_layer=1, n_head=2, n_embd=16)).eval()),
              "b": SingleLM(GPT(GPTConfig(vocab_size=vocab, seq_len=8, n_layer=1, n_head=2, n_embd=16)).eval())}
    dt = ev.doc_table(models, docs)
    q = ev.quality_from_docs(dt, ev.model_info(models), n_boot=50)
    for r in q.itertuples():
        d = dt[dt["model"] == r.model]
        assert d["bits"].sum() / d["n_bytes"].sum() == pytest.approx(r.bpb, rel=1e-12)  # exactly micro
        assert list(d["n_tokens"]) == [20, 9, 20] and r.max_doc_tokens == 20 and r.n_tokens == 49
    assert set(q["n_bytes"]) == {sum(d.nbytes for d in docs)}


def test_oracle_is_never_worse_than_any_expert():
    rng = np.random.default_rng(0)
    docs = [eval_docs.EvalDoc(np.array([1, 2]), int(n), 1, s) for n, s in zip(rng.integers(5, 50, 12), "aabbbcccaabc")]
    models = {f"g-expert{e}": Fixed(rng.uniform(1, 100, 12)) for e in range(3)}
    dt = ev.doc_table(models, docs)
    orc = ev.oracle_rows(dt, "g-oracle", list(models))
    for m in models:
        assert (orc["bits"].to_numpy() <= dt[dt["model"] == m]["bits"].to_numpy()).all()
    assert sorted(set(orc["expert"])) == [0, 1, 2]


def test_random_router_k_equals_K_is_the_uniform_bayes_ensemble():
    """BTM's random baseline: the mixture with the random router's (zero) prefix scores and k=K
    equals sum_e (1/K) prod_t p_e(x_t | x_<t) over the whole document, computed by hand."""
    from gmlib.router import make_router
    ms = [expert(s) for s in range(3)]
    docs = [np.random.default_rng(i).integers(1, V, 25) for i in range(4)]
    router = make_router("random", 3, V)
    mix = from_models(ms, router=router, cfg=MixtureConfig(k=3, eta=1.0, reroute_every=4, route_from=2))
    got = [lp.sum() for lp in mix.token_logprobs_many(docs)]
    per_expert = np.stack([[lp.sum() for lp in SingleLM(m).token_logprobs_many(docs)] for m in ms])
    want = np.logaddexp.reduce(per_expert + np.log(1 / 3), axis=0)  # the Bayes marginal, uniform prior
    np.testing.assert_allclose(got, want, rtol=1e-10)


def test_log_linear_pooling_one_expert_and_equal_experts():
    ms = [expert(s) for s in range(3)]
    docs = [np.random.default_rng(i).integers(1, V, T) for i, T in enumerate([30, 9])]  # 30 > seq_len
    single = SingleLM(ms[1]).token_logprobs_many(docs)
    one = from_models(ms[1:2], cfg=MixtureConfig(k=1, pool="log-linear")).token_logprobs_many(docs)
    same = from_models([ms[1]] * 3, cfg=MixtureConfig(k=3, pool="log-linear")).token_logprobs_many(docs)
    for s, a, b in zip(single, one, same):
        np.testing.assert_allclose(a, s, atol=1e-5)  # the normaliser is computed in fp32
        np.testing.assert_allclose(b, s, atol=1e-5)
    # two different experts: the hand formula at one position (full distributions of both)
    x = docs[1]
    mix = from_models(ms[:2], cfg=MixtureConfig(k=2, eta=1.0, pool="log-linear"))
    w = mix.weights(x)
    with torch.no_grad():
        lsm = [torch.log_softmax(m(torch.tensor([x]))[0][0].double(), -1).numpy() for m in ms[:2]]
    t = 5
    s = w[0, t - 1] * lsm[0][t - 1] + w[1, t - 1] * lsm[1][t - 1]
    np.testing.assert_allclose(mix.token_logprobs(x)[t - 1], s[x[t]] - np.logaddexp.reduce(s), atol=1e-5)
    # linear pooling unchanged by the option: the same numbers as the default config
    lin = from_models(ms, cfg=MixtureConfig(k=2)).token_logprobs_many(docs)
    lin2 = from_models(ms, cfg=MixtureConfig(k=2, pool="linear")).token_logprobs_many(docs)
    for a, b in zip(lin, lin2):
        np.testing.assert_array_equal(a, b)
    with pytest.raises(ValueError, match="pool"):
        from_models(ms, cfg=MixtureConfig(pool="geometric"))


def test_inference_routing_equals_training_routing(tiny_shards):
    """Each training document routed both ways: the trainer's assignment without the balance
    cap (argmax of similarity + bias) and the k=1 mixture's prior on the whole document (its
    first max_tokens tokens, as the trainer reads it). They must agree except where the top two
    scores tie within 1e-6 (float32 scores)."""
    from gmlib.data import TokenShards
    from gmlib.router import make_router
    train = TokenShards(tiny_shards / "train")
    docs = [train.doc(i) for i in range(len(train))]
    for kind in ("local", "kmeans"):
        router = make_router(kind, 4, train.vocab_size, n_features=256, n_units=1024, wta_k=32, epochs=1,
                             max_tokens=512).fit(docs)
        training = router.assign(docs, slack=math.inf)
        mix = from_models([None] * 4, router=router, cfg=MixtureConfig(k=1), expert_n_params=1)
        prefixes = [d[:512] for d in docs]
        prior = mix._log_priors(prefixes)
        inference = np.argmax(prior, axis=1)
        s = np.sort(router.prefix_scores(prefixes), axis=1)
        tie = s[:, -1] - s[:, -2] < 1e-6
        assert (inference == training)[~tie].all(), kind
        assert tie.mean() < 0.02 and len(docs) > 100
        if kind == "local":  # the bias matters: without it some documents would go elsewhere
            assert (np.argmax(router.scores(prefixes), axis=1) != training).any()
