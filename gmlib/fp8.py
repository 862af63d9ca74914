"""FP8 matmuls for training (a speed option of gmlib.train, off by default).

An H100 multiplies FP8 matrices at twice its bf16 rate. During training, `fp8_linear(x, w)` computes
`x @ w.T` with both operands cast to float8_e4m3 and the output in bf16. The backward pass casts the
incoming gradient to float8_e5m2, which has more range and less precision, for both of its products.
The weights, the optimizer and every evaluation stay in full precision: outside autograd, `fp8_linear`
is plain `F.linear`.

Two ways to scale (the names of torchao's float8 recipes):
- "tensor": one scale per tensor, from its current absolute maximum, for all three products
  (forward, input gradient, weight gradient). The largest FP8 share, but every cast needs the amax
  of a whole activation first: a reduction over all tokens, then a second pass that casts. At
  d=768 these passes take back most of what the FP8 products save (results/bench/train_profile.json).
- "row": one scale per row, i.e. per token for activations and gradients (both float8_e4m3, which
  per-row scales make safe), for the forward and the input gradient; the weight gradient, whose
  rows would run across tokens, stays in bf16 ("rowwise_with_gw_hp"). A row's amax is a reduction
  over its own features, so the cast can fuse into the kernel that produces the row. The more
  accurate of the two (tests/test_fp8.py), but the slower: on an H200 the bf16 weight gradient and
  the bf16 copy of each input it keeps cost more than the fused casts save (results/bench/train_speed.json).

`convert(model, which)` switches a GPT's matmuls over: "head" is the tied output projection (at vocab
32k, 19% of a 124M model's FLOPs), and "all" adds every Linear of the blocks.
"""
from functools import partial

import torch
import torch.nn as nn
import torch.nn.functional as F

E4M3, E5M2 = torch.float8_e4m3fn, torch.float8_e5m2
CHOICES = ("", "head", "all")
SCALINGS = ("tensor", "row")


def _cast(t: torch.Tensor, dtype, rows: bool = False):
    """t as `dtype` scaled to use its range, and the scale that undoes it (for _scaled_mm): one scale
    for the tensor, or with rows=True one per row of t (M, K), as (M, 1)."""
    amax = (t.detach().abs().amax(dim=-1, keepdim=True) if rows else t.detach().abs().amax()).float().clamp(min=1e-12)
    scale = torch.finfo(dtype).max / amax
    t8 = (t.float() * scale).clamp(-torch.finfo(dtype).max, torch.finfo(dtype).max).to(dtype)
    return t8.contiguous(), scale.reciprocal()


def _mm(a8, sa, b8, sb, out_dtype):
    """a (M, K) row-major times b given as (N, K): _scaled_mm wants its second operand column-major."""
    return torch._scaled_mm(a8, b8.t(), scale_a=sa, scale_b=sb, out_dtype=out_dtype)


class _FP8Matmul(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, w):
        x8, sx = _cast(x, E4M3)
        w8, sw = _cast(w, E4M3)
        ctx.save_for_backward(x8, sx, w8, sw)
        ctx.dtypes = (x.dtype, w.dtype)
        return _mm(x8, sx, w8, sw, torch.bfloat16)

    @staticmethod
    def backward(ctx, gy):
        x8, sx, w8, sw = ctx.saved_tensors
        g8, sg = _cast(gy, E5M2)
        # dx = gy @ w: w (N, K) must be the column-major (N, K) operand, i.e. w.T row-major
        dx = _mm(g8, sg, w8.t().contiguous(), sw, torch.bfloat16)
        # dw = gy.T @ x: gy.T row-major (N, M) and x as the column-major (M, K) operand
        dw = _mm(g8.t().contiguous(), sg, x8.t().contiguous(), sx, torch.float32)
        return dx.to(ctx.dtypes[0]), dw.to(ctx.dtypes[1])


class _FP8RowwiseMatmul(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, w):
        x8, sx = _cast(x, E4M3, rows=True)    # (M, K), a scale per token
        w8, sw = _cast(w, E4M3, rows=True)    # (N, K), a scale per output feature
        xh = x.to(torch.bfloat16)       # kept for the bf16 weight gradient (the cast fuses with x8's)
        ctx.save_for_backward(xh, w)
        ctx.dtypes = (x.dtype, w.dtype)
        return _mm(x8, sx, w8, sw.t(), torch.bfloat16)

    @staticmethod
    def backward(ctx, gy):
        xh, w = ctx.saved_tensors
        g8, sg = _cast(gy, E4M3, rows=True)        # (M, N), a scale per token
        wt8, swt = _cast(w.t(), E4M3, rows=True)   # (K, N): w's columns, a scale per input feature
        dx = _mm(g8, sg, wt8, swt.t(), torch.bfloat16)  # gy @ w
        dw = gy.to(torch.bfloat16).t() @ xh        # bf16: its rows would run across tokens
        return dx.to(ctx.dtypes[0]), dw.to(ctx.dtypes[1])


MATMULS = {"tensor": _FP8Matmul, "row": _FP8RowwiseMatmul}


def fp8_matmul(x: torch.Tensor, w: torch.Tensor, scaling: str = "tensor") -> torch.Tensor:
    """x (..., K) @ w.T for w (N, K), in FP8 with bf16 output; K and N must be multiples of 16."""
    return MATMULS[scaling].apply(x.reshape(-1, x.shape[-1]), w).view(*x.shape[:-1], w.shape[0])


def fp8_linear(x: torch.Tensor, w: torch.Tensor, scaling: str = "tensor") -> torch.Tensor:
    """F.linear (no bias) in FP8 while gradients are being recorded; plain F.linear otherwise,
    or where the shapes do not suit the FP8 kernels (dimensions not multiples of 16)."""
    if torch.is_grad_enabled() and x.shape[-1] % 16 == 0 and w.shape[0] % 16 == 0:
        return fp8_matmul(x, w, scaling)
    return F.linear(x, w)


# one object per scaling: torch.compile guards on the model's output_linear, so a model converted
# again (a second gmlib.step.TrainStep around it) must find the same object, or it would recompile
HEAD_LINEARS = {s: partial(fp8_linear, scaling=s) for s in SCALINGS}


class FP8Linear(nn.Linear):
    """nn.Linear (no bias) whose training matmul is FP8; the same parameter, so optimizers,
    checkpoints and state dicts do not change."""
    fp8_scaling = "tensor"

    def forward(self, x):
        return fp8_linear(x, self.weight, self.fp8_scaling)


def convert(model, which: str, scaling: str = "tensor"):
    """Switch a gmlib.model.GPT's training matmuls to FP8: "" none, "head" the output projection,
    "all" the output projection and every Linear of the blocks; scaling "tensor" or "row" (see the
    module's docstring). Returns the model."""
    if which not in CHOICES:
        raise ValueError(f"fp8={which!r}; choose one of {CHOICES}")
    if scaling not in SCALINGS:
        raise ValueError(f"fp8_scaling={scaling!r}; choose one of {SCALINGS}")
    if which:
        model.output_linear = HEAD_LINEARS[scaling]
    if which == "all":
        for m in model.blocks.modules():
            if type(m) is nn.Linear and m.bias is None:
                m.__class__ = FP8Linear  # same module, same parameter: only forward changes
                m.fp8_scaling = scaling
    return model
