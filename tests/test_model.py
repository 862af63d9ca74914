"""The GPT against independent references: hand-counted parameters, FLOPs counted by
torch's FlopCounterMode, and the full forward pass for the KV cache."""
import math

import pytest
import torch
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

from gmlib.model import GPT, GPTConfig, make_config

# vocab 100, 2 layers, 2 heads, width 8, MLP 4x, context 16
SMALL = dict(vocab_size=100, n_layer=2, n_head=2, n_embd=8, seq_len=16)
# by hand: embedding 100*8 = 800; per layer qkv 8*24 = 192, attn proj 8*8 = 64, mlp fc 8*32 = 256,
# mlp proj 32*8 = 256, two norm gains 2*8 = 16 -> 784; two layers 1568; final norm 8.
SMALL_PARAMS = 800 + 2 * 784 + 8                   # 2376
SMALL_FLOPS = 6 * SMALL_PARAMS + 12 * 2 * 8 * 16  # 6N + 12·L·d·T = 14256 + 3072 = 17328


def test_param_count_matches_hand_count_and_module():
    cfg = GPTConfig(**SMALL)
    assert cfg.n_params == SMALL_PARAMS
    assert sum(p.numel() for p in GPT(cfg).parameters()) == SMALL_PARAMS


# the gated MLP (swiglu) of the same SMALL config: width 2/3 of 4*8 = 21.3, to the nearest multiple of 64 = 64
# (at least 64); gate 8*64 + up 8*64 + down 64*8 = 1536, so per layer 192 + 64 + 1536 + 16 = 1808
SMALL_GATED_PARAMS = 800 + 2 * 1808 + 8            # 4424


def test_gated_mlp_param_and_flop_counts_by_hand():
    cfg = GPTConfig(**SMALL, activation="swiglu")
    assert cfg.mlp_width == 64 and cfg.n_params == SMALL_GATED_PARAMS
    assert sum(p.numel() for p in GPT(cfg).parameters()) == SMALL_GATED_PARAMS
    # the presets' widths: 2/3 of 4d to the nearest 64; at 124m exactly the non-gated MLP's parameters
    widths = {n: make_config(n, activation="swiglu").mlp_width for n in ("tiny", "30m", "124m", "350m")}
    assert widths == {"tiny": 192, "30m": 1344, "124m": 2048, "350m": 2752}
    assert make_config("124m", activation="swiglu").n_params == make_config("124m").n_params
    assert GPTConfig(**SMALL, activation="swiglu", mlp_hidden=40).mlp_width == 40  # an imported width kept
    with pytest.raises(ValueError, match="mlp_hidden"):
        GPTConfig(**SMALL, mlp_hidden=-1)


def test_preset_param_counts():
    # 124m at vocab 32000: 32000*768 + 12*(12*768^2 + 2*768) + 768
    assert make_config("124m", vocab_size=32000).n_params == 32000 * 768 + 12 * (12 * 768**2 + 2 * 768) + 768
    assert make_config("350m", vocab_size=32000).n_params == 32000 * 1024 + 24 * (12 * 1024**2 + 2 * 1024) + 1024


@pytest.mark.parametrize("activation", ["gelu", "swiglu"])
def test_flops_per_token_matches_flop_counter(activation):
    cfg = GPTConfig(**SMALL, activation=activation)
    assert cfg.flops_per_token() == (SMALL_FLOPS if activation == "gelu" else 6 * SMALL_GATED_PARAMS + 12 * 2 * 8 * 16)
    torch.manual_seed(0)
    model = GPT(cfg)
    B, T = 3, cfg.seq_len
    idx = torch.randint(0, cfg.vocab_size, (B, T))
    counter = FlopCounterMode(display=False)
    # the math backend decomposes attention into matmuls the counter sees; it counts the full
    # T x T score matrix, as flops_per_token does (no causal halving)
    with sdpa_kernel(SDPBackend.MATH), counter:
        _, loss = model(idx, idx)
        loss.backward()
    counted = counter.get_total_flops() / (B * T)
    # the counter sees matmuls only: norm gains (2·d per layer + d) do no matmul work
    norm_params = 2 * cfg.n_embd * cfg.n_layer + cfg.n_embd
    assert counted == cfg.flops_per_token() - 6 * norm_params


@pytest.mark.parametrize("bad, msg", [
    (dict(n_head=3, n_embd=64), "does not divide"),
    (dict(n_head=4, n_embd=12), "must be even"),
    (dict(vocab_size=0), "vocab_size"),
    (dict(activation="swish"), "activation"),
])
def test_bad_config_fails_clearly(bad, msg):
    with pytest.raises(ValueError, match=msg):
        GPTConfig(**{**SMALL, **bad})
    with pytest.raises(ValueError, match="unknown model size"):
        make_config("7b")


@pytest.mark.parametrize("activation", ["gelu", "relu2", "swiglu"])
def test_kv_cache_matches_full_forward(activation):
    torch.manual_seed(0)
    model = GPT(GPTConfig(**SMALL, activation=activation)).eval()
    idx = torch.randint(0, 100, (2, 12))
    with torch.no_grad():
        full, _ = model(idx)
        cache = model.new_cache(2)
        parts = [model(idx[:, :5], cache=cache)[0]]          # a prompt, then one token at a time
        parts += [model(idx[:, t:t + 1], cache=cache)[0] for t in range(5, 12)]
    torch.testing.assert_close(torch.cat(parts, dim=1), full, rtol=1e-5, atol=1e-5)
    assert cache.length == 12


def test_loss_is_cross_entropy_and_logits_optional():
    torch.manual_seed(0)
    model = GPT(GPTConfig(**SMALL))
    idx, tgt = torch.randint(0, 100, (2, 16)), torch.randint(0, 100, (2, 16))
    logits, loss = model(idx, tgt)
    # reference: mean negative log-softmax of the targets, written out
    ref = -(logits.log_softmax(-1).gather(-1, tgt[..., None])).mean()
    torch.testing.assert_close(loss, ref)
    none, loss2 = model(idx, tgt, return_logits=False)
    assert none is None and torch.equal(loss, loss2)
    # at initialisation the prediction is near uniform: loss about ln(V)
    assert abs(loss.item() - math.log(100)) < 0.1


def test_sequence_longer_than_context_fails():
    model = GPT(GPTConfig(**SMALL))
    with pytest.raises(ValueError, match="exceeds the model's seq_len"):
        model(torch.zeros(1, 17, dtype=torch.long))
