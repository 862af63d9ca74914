"""gmlib.fp8: the FP8 matmul and its gradients match the full-precision ones within FP8's precision,
for both scalings; per-row scales keep small rows; evaluation is untouched, and a tiny model still
learns with FP8 matmuls."""
import pytest
import torch
import torch.nn.functional as F

from gmlib import fp8
from gmlib.model import GPT, make_config
from gmlib.train import TrainConfig


def rel_err(a, b):
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


@pytest.mark.parametrize("scaling", fp8.SCALINGS)
def test_matmul_and_gradients_match_full_precision(scaling):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(4, 32, 64, generator=g).to(torch.bfloat16).requires_grad_()
    w = (0.05 * torch.randn(48, 64, generator=g)).requires_grad_()
    y = fp8.fp8_matmul(x, w, scaling)
    gy = torch.randn(y.shape, generator=g).to(torch.bfloat16)
    y.backward(gy)
    xr, wr = x.detach().float().requires_grad_(), w.detach().clone().requires_grad_()
    yr = F.linear(xr, wr)
    yr.backward(gy.float())
    assert y.dtype == torch.bfloat16 and y.shape == (4, 32, 48)
    assert x.grad.dtype == torch.bfloat16 and w.grad.dtype == torch.float32
    # e4m3 keeps 3 mantissa bits (relative step 1/8), e5m2 2 bits: errors of a few percent, not more
    assert rel_err(y, yr) < 0.06
    assert rel_err(x.grad, xr.grad) < 0.12 and rel_err(w.grad, wr.grad) < 0.12
    if scaling == "row":  # the weight gradient is a bf16 product: bf16's error (8 bits), not FP8's
        assert rel_err(w.grad, wr.grad) < 0.01


def test_row_scaling_keeps_small_rows_that_a_tensor_scale_flushes():
    """Tokens whose activations are 1e-5 of the largest token's fall into e4m3's subnormals under one
    scale per tensor; one scale per row keeps them at FP8's usual relative precision."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(32, 64, generator=g)
    x[:16] *= 1e-5
    w = 0.05 * torch.randn(48, 64, generator=g)
    ref = F.linear(x, w)
    err = {s: rel_err(fp8.fp8_matmul(x.requires_grad_(), w, s)[:16], ref[:16]) for s in fp8.SCALINGS}
    assert err["row"] < 0.06 and err["tensor"] > 0.2, err


def test_fp8_only_while_training_and_on_suitable_shapes():
    x, w = torch.randn(8, 64), torch.randn(32, 64)
    with torch.no_grad():  # evaluation: plain F.linear, bit for bit
        assert torch.equal(fp8.fp8_linear(x, w), F.linear(x, w))
    assert not torch.equal(fp8.fp8_linear(x, w), F.linear(x, w))  # training: the FP8 path
    x2, w2 = torch.randn(8, 60), torch.randn(32, 60)  # 60 is not a multiple of 16: falls back
    assert torch.equal(fp8.fp8_linear(x2, w2), F.linear(x2, w2))
    with pytest.raises(ValueError, match="fp8='bf8'"):
        fp8.convert(GPT(make_config("tiny", vocab_size=256)), "bf8")
    with pytest.raises(ValueError, match="fp8='bf8'"):
        TrainConfig(fp8="bf8")
    with pytest.raises(ValueError, match="fp8_scaling='column'"):
        fp8.convert(GPT(make_config("tiny", vocab_size=256)), "all", "column")
    with pytest.raises(ValueError, match="fp8_scaling='column'"):
        TrainConfig(fp8="all", fp8_scaling="column")


@pytest.mark.parametrize("scaling", fp8.SCALINGS)
def test_convert_keeps_parameters_and_a_tiny_model_learns(scaling):
    torch.manual_seed(0)
    cfg = make_config("tiny", vocab_size=256)
    model = GPT(cfg)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    fp8.convert(model, "all", scaling)
    assert model.state_dict().keys() == before.keys()
    assert type(model.blocks[0].mlp.fc) is fp8.FP8Linear and model.blocks[0].mlp.fc.fp8_scaling == scaling
    assert model.output_linear.func is fp8.fp8_linear and model.output_linear.keywords == {"scaling": scaling}
    head = model.output_linear
    assert fp8.convert(model, "all", scaling).output_linear is head  # converting again changes nothing
    idx = torch.randint(0, 256, (8, 65), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():  # evaluation: the full-precision path, exactly
        ref = GPT(cfg)
        ref.load_state_dict(before)
        assert torch.equal(model(idx[:, :-1], idx[:, 1:])[1], ref(idx[:, :-1], idx[:, 1:])[1])
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    losses = []
    for _ in range(40):  # memorise one batch
        _, loss = model(idx[:, :-1], idx[:, 1:], return_logits=False)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0] - 1.0, losses[::8]
