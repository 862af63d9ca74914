"""The static decoder against independent references: the model's full forward pass, and the reference
generator of gmlib.mixture (engine="reference"), one prompt at a time."""
import numpy as np
import pytest
import torch

from gmlib import decode
from gmlib.lm import SingleLM
from gmlib.mixture import MixtureConfig, from_models
from gmlib.model import GPTConfig
from helpers import peaked_gpt

V = 48
CFG = GPTConfig(vocab_size=V, seq_len=16, n_layer=2, n_head=2, n_embd=16)
PROMPTS = [[1, 5, 9], [1, 2, 3, 4, 5, 6, 7], [1], [1, 8, 8, 3, 2]]  # different lengths: left padding


class HashRouter:
    """Content-dependent scores, so that different prompts route to different top-k sets."""

    def __init__(self, n_experts, seed=0):
        self.W = np.random.default_rng(seed).normal(size=(V, n_experts)) * 3

    def scores(self, docs):
        return np.stack([np.bincount(d, minlength=V) @ self.W / max(len(d), 1) for d in docs])


def full_logprobs(model, ctx):
    """log p of the token after ctx from one plain forward pass over the whole context, no cache."""
    with torch.no_grad():
        logits, _ = model(torch.tensor([ctx]))
    return torch.log_softmax(logits[0, -1], -1)


@pytest.mark.parametrize("activation", ["gelu", "swiglu"])
def test_static_step_equals_the_full_forward(activation):
    cfg = GPTConfig(**{**CFG.__dict__, "activation": activation, "seq_len": 32})
    ms = [peaked_gpt(1, cfg), peaked_gpt(2, cfg)]
    feed = np.random.default_rng(0).integers(1, V, (len(PROMPTS), 6))
    with torch.inference_mode():
        for models in (ms[:1], ms):  # one model, and two experts stacked
            dec = decode.decoder(models, len(PROMPTS), 32)
            dec.prefill(PROMPTS)
            ctx = [list(p) for p in PROMPTS]
            for step in range(feed.shape[1] + 1):
                for e, m in enumerate(models):
                    for b, c in enumerate(ctx):
                        torch.testing.assert_close(dec.lps[e, b], full_logprobs(m, c), rtol=0, atol=1e-5)
                if step < feed.shape[1]:
                    dec.tok.copy_(torch.as_tensor(feed[:, step]))
                    dec._step()
                    for b, c in enumerate(ctx):
                        c.append(int(feed[b, step]))


def test_greedy_single_model_equals_the_reference_batched_or_not():
    lm = SingleLM(peaked_gpt(3, CFG))
    prompts = PROMPTS + [list(range(1, 20))]  # longer than seq_len: the reference keeps its last half
    want = [lm.generate(p, 30, temperature=0.0, engine="reference") for p in prompts]  # 30 tokens: overflows seq_len 16
    assert [lm.generate(p, 30, temperature=0.0) for p in prompts] == want
    assert lm.generate_many(prompts, 30, temperature=0.0) == want
    assert len(set(map(tuple, want))) > 1


def test_a_bf16_model_decodes_as_its_reference():
    """A bf16 model's RoPE buffers are bf16, which torch.complex refuses (the H200 decode bench crashed there);
    the decoder upcasts them, exactly, and greedy decoding follows the reference generator."""
    lm = SingleLM(peaked_gpt(3, CFG).to(torch.bfloat16))
    want = [lm.generate(p, 12, temperature=0.0, engine="reference") for p in PROMPTS]
    assert lm.generate_many(PROMPTS, 12, temperature=0.0) == want
    assert len(set(map(tuple, want))) > 1


@pytest.mark.parametrize("pool", ["linear", "log-linear"])
def test_greedy_mixture_equals_the_reference_batched_or_not(pool):
    ms = [peaked_gpt(s, CFG) for s in (10, 11, 12)]
    for router in (None, HashRouter(3)):  # with a router the prompts go to different expert pairs
        mix = from_models(ms, router=router, cfg=MixtureConfig(k=2, eta=1.0, pool=pool))
        want = [mix.generate(p, 24, temperature=0.0, engine="reference") for p in PROMPTS]
        assert [mix.generate(p, 24, temperature=0.0) for p in PROMPTS] == want
        assert mix.generate_many(PROMPTS, 24, temperature=0.0) == want
    groups = {tuple(np.flatnonzero(np.isfinite(r))) for r in mix._log_priors([np.array(p) for p in PROMPTS])}
    assert len(groups) > 1


def test_sampling_and_stopping_follow_the_reference():
    ms = [peaked_gpt(s, CFG) for s in (20, 21)]
    for lm in (SingleLM(ms[0]), from_models(ms, cfg=MixtureConfig(k=2, eta=1.0))):
        kw = dict(temperature=0.8, top_p=0.9, seed=5)
        want = [lm.generate(p, 20, engine="reference", **kw) for p in PROMPTS]
        assert lm.generate_many(PROMPTS, 20, **kw) == want
        stop = want[0][3]  # a token the first prompt generates: it ends there, the others maybe elsewhere
        for temperature in (0.0, 0.8):
            kw = dict(temperature=temperature, top_p=0.9, seed=5, stop_token=stop)
            want = [lm.generate(p, 20, engine="reference", **kw) for p in PROMPTS]
            assert lm.generate_many(PROMPTS, 20, **kw) == want
            assert all(len(w) == 20 or w[-1] == stop for w in want)


def test_decoders_are_reused_and_eager_on_cpu():
    m = peaked_gpt(30, CFG)
    a = decode.decoder([m], 2, 128)
    assert decode.decoder([m], 2, 128) is a and not a.use_graphs and a._graph() is None
    with torch.no_grad():
        m.wte.weight.mul_(0.5)  # new weights: the reused decoder sees them
    assert SingleLM(m).generate([1, 2], 8, temperature=0.0) == SingleLM(m).generate([1, 2], 8, temperature=0.0,
                                                                                  engine="reference")
    with pytest.raises(ValueError, match="empty prompt"):
        SingleLM(m).generate([], 3)
    with pytest.raises(ValueError, match="engine"):
        SingleLM(m).generate([1], 3, engine="fast")
    assert SingleLM(m).generate_many([[1], [1, 2]], 0) == [[], []]


def test_the_compiled_step_decodes_the_same_tokens():
    """compiled=True (torch.compile of the step, on the CPU through inductor's C++ backend): the same greedy
    tokens as the plain step, for one model and a mixture, with a prompt that overflows seq_len."""
    models = [peaked_gpt(s, CFG) for s in (3, 4)]
    prompts = PROMPTS + [list(range(1, 20))]
    for ms in (models[:1], models):
        want = decode.generate(ms, prompts, max_new_tokens=30, temperature=0.0)
        assert decode.generate(ms, prompts, max_new_tokens=30, temperature=0.0, compiled=True) == want
    dec = decode.decoder(models, len(prompts), 64, compiled=True)
    assert dec.step == dec._step_compiled  # it compiled, rather than fell back to the plain step
