"""The expert: a plain GPT (RoPE, RMSNorm, SDPA attention, tied embeddings), and its sizes.

Every gm expert and every dense baseline is this model; only the config differs.
"""
import math
from dataclasses import asdict, dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F


@dataclass
class GPTConfig:
    vocab_size: int = 32000
    seq_len: int = 1024      # longest context the model is trained for (RoPE tables are built to this length)
    n_layer: int = 12
    n_head: int = 12
    n_embd: int = 768
    mlp_ratio: int = 4
    rope_base: float = 10000.0
    # "gelu" (tanh approximation), "relu2" (squared ReLU, Primer / modded-nanogpt), or "swiglu" (gated, as Llama:
    # silu(gate(x)) * up(x); the only one a Llama checkpoint can hold, see gmlib.hf). The presets' default is
    # this one line.
    activation: str = "gelu"
    mlp_hidden: int = 0      # width of the MLP's hidden layer; 0: mlp_ratio·d, or for swiglu 2/3 of it (mlp_width)

    def __post_init__(self):
        if self.n_embd % self.n_head:
            raise ValueError(f"GPTConfig: n_head={self.n_head} does not divide n_embd={self.n_embd}")
        if (self.n_embd // self.n_head) % 2:
            raise ValueError(f"GPTConfig: head size {self.n_embd // self.n_head} must be even for RoPE")
        for k in ("vocab_size", "seq_len", "n_layer", "n_head", "n_embd", "mlp_ratio"):
            if getattr(self, k) < 1:
                raise ValueError(f"GPTConfig: {k}={getattr(self, k)} must be positive")
        if self.mlp_hidden < 0:
            raise ValueError(f"GPTConfig: mlp_hidden={self.mlp_hidden} must be >= 0 (0: derived from mlp_ratio)")
        if self.activation not in ACTIVATIONS and self.activation not in GATED:
            raise ValueError(f"GPTConfig: activation={self.activation!r}; "
                             f"choose one of {sorted(ACTIVATIONS) + sorted(GATED)}")

    @property
    def gated(self) -> bool:
        return self.activation in GATED

    @property
    def mlp_width(self) -> int:
        """The MLP's hidden width. A gated MLP has three matrices instead of two, so it takes 2/3 of
        mlp_ratio·d, rounded to the nearest multiple of 64 (Llama rounds 2/3·4d up to a multiple of 256;
        the nearest 64 keeps params and FLOPs closer: 124m 2048, exactly 4d's; 30m 1344, -1.6%; 10m 704, +3.1%;
        350m 2752, +0.8%; tiny 192, +12.5%)."""
        if self.mlp_hidden:
            return self.mlp_hidden
        h = self.mlp_ratio * self.n_embd
        return max(64, 64 * round(2 * h / 3 / 64)) if self.gated else h

    @property
    def n_params(self) -> int:
        """Parameters, from the config alone (the tied embedding counted once)."""
        d, L = self.n_embd, self.n_layer
        mlp = (3 if self.gated else 2) * d * self.mlp_width         # gate+up+down, or fc+proj
        per_layer = 4 * d * d + mlp + 2 * d                          # qkv+proj, mlp, two RMSNorm gains
        return self.vocab_size * d + L * per_layer + d               # embedding, blocks, final norm

    def flops_per_token(self, seq_len: int | None = None) -> int:
        """Training FLOPs per token (forward + backward): 6N for the weights (the tied embedding
        counts as the output projection) plus 12·L·d·T for attention scores and values
        (PaLM appendix B; nanoGPT's estimate_mfu). Norm gains and softmax are negligible."""
        T = seq_len or self.seq_len
        return 6 * self.n_params + 12 * self.n_layer * self.n_embd * T


# Named sizes (GPT-2 names; parameter counts at vocab 32000, no position table): tiny 2.1M, 30m 35M,
# 124m 110M, 350m 335M.
PRESETS = {
    "tiny": dict(n_layer=2, n_head=2, n_embd=64, seq_len=128),
    "10m": dict(n_layer=4, n_head=4, n_embd=256, seq_len=512),   # the frontier's small dense size
    "30m": dict(n_layer=6, n_head=8, n_embd=512, seq_len=512),
    "124m": dict(n_layer=12, n_head=12, n_embd=768, seq_len=1024),
    "350m": dict(n_layer=24, n_head=16, n_embd=1024, seq_len=1024),
}


def make_config(name: str, **overrides) -> GPTConfig:
    if name not in PRESETS:
        raise ValueError(f"unknown model size {name!r}; choose one of {sorted(PRESETS)}")
    return GPTConfig(**{**PRESETS[name], **overrides})


def rope_tables(head_dim: int, length: int, base: float, device=None):
    inv_freq = 1.0 / (base ** (torch.arange(0, head_dim, 2, device=device, dtype=torch.float32) / head_dim))
    angles = torch.outer(torch.arange(length, device=device, dtype=torch.float32), inv_freq)
    return angles.cos(), angles.sin()  # (length, head_dim/2) each


def apply_rope(x, cos, sin):
    # x: (B, H, T, D); rotate pairs (first half, second half) of each head
    x1, x2 = x.float().chunk(2, dim=-1)
    out = torch.cat([x1 * cos - x2 * sin, x1 * sin + x2 * cos], dim=-1)
    return out.type_as(x)


class KVCache:
    """Keys and values of the tokens seen so far, one (B, H, T_max, D) buffer per layer."""

    def __init__(self, cfg: GPTConfig, batch_size: int, max_len: int, device, dtype):
        shape = (batch_size, cfg.n_head, max_len, cfg.n_embd // cfg.n_head)
        self.k = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(cfg.n_layer)]
        self.v = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(cfg.n_layer)]
        self.length, self.max_len = 0, max_len


class Attention(nn.Module):
    def __init__(self, cfg: GPTConfig):
        super().__init__()
        self.n_head, self.head_dim = cfg.n_head, cfg.n_embd // cfg.n_head
        self.qkv = nn.Linear(cfg.n_embd, 3 * cfg.n_embd, bias=False)
        self.proj = nn.Linear(cfg.n_embd, cfg.n_embd, bias=False)

    def forward(self, x, cos, sin, cache: KVCache | None = None, layer: int = 0):
        B, T, C = x.shape
        q, k, v = self.qkv(x).view(B, T, 3, self.n_head, self.head_dim).permute(2, 0, 3, 1, 4)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        if cache is None:
            y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        else:
            start = cache.length
            cache.k[layer][:, :, start:start + T] = k
            cache.v[layer][:, :, start:start + T] = v
            k, v = cache.k[layer][:, :, :start + T], cache.v[layer][:, :, :start + T]
            # new token i (at absolute position start+i) sees keys 0..start+i; SDPA's is_causal
            # aligns to the top-left corner, so with a non-empty cache the mask is explicit.
            mask = torch.ones(T, start + T, dtype=torch.bool, device=x.device).tril(diagonal=start)
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        return self.proj(y.transpose(1, 2).reshape(B, T, C))


def gelu(x):
    return F.gelu(x, approximate="tanh")


def relu2(x):
    # cheaper than GELU and slightly better per step at small scale (So et al. 2021, "Primer")
    return F.relu(x).square()


ACTIVATIONS = {"gelu": gelu, "relu2": relu2}
GATED = {"swiglu": F.silu}  # act(gate) * up (Shazeer 2020, "GLU variants"; Llama)


class MLP(nn.Module):
    def __init__(self, cfg: GPTConfig):
        super().__init__()
        h = cfg.mlp_width
        self.gated = cfg.gated
        # gated: fc holds [gate; up] stacked (one matmul instead of two; gmlib.hf splits it into
        # Llama's gate_proj and up_proj), proj is down_proj
        self.fc = nn.Linear(cfg.n_embd, (2 if self.gated else 1) * h, bias=False)
        self.proj = nn.Linear(h, cfg.n_embd, bias=False)
        self.act = GATED[cfg.activation] if self.gated else ACTIVATIONS[cfg.activation]

    def forward(self, x):
        if self.gated:
            gate, up = self.fc(x).chunk(2, dim=-1)
            return self.proj(self.act(gate) * up)
        return self.proj(self.act(self.fc(x)))


class Block(nn.Module):
    def __init__(self, cfg: GPTConfig):
        super().__init__()
        self.norm1, self.attn = nn.RMSNorm(cfg.n_embd, eps=1e-6), Attention(cfg)
        self.norm2, self.mlp = nn.RMSNorm(cfg.n_embd, eps=1e-6), MLP(cfg)

    def forward(self, x, cos, sin, cache=None, layer=0):
        x = x + self.attn(self.norm1(x), cos, sin, cache, layer)
        return x + self.mlp(self.norm2(x))


class GPT(nn.Module):
    def __init__(self, cfg: GPTConfig):
        super().__init__()
        self.cfg = cfg
        self.wte = nn.Embedding(cfg.vocab_size, cfg.n_embd)
        self.blocks = nn.ModuleList(Block(cfg) for _ in range(cfg.n_layer))
        self.norm = nn.RMSNorm(cfg.n_embd, eps=1e-6)
        cos, sin = rope_tables(cfg.n_embd // cfg.n_head, cfg.seq_len, cfg.rope_base)
        # not parameters and not saved: rebuilt from the config, so checkpoints hold weights only
        self.register_buffer("rope_cos", cos, persistent=False)
        self.register_buffer("rope_sin", sin, persistent=False)
        self.output_linear = F.linear  # the tied output projection's matmul (gmlib.fp8.convert may swap it)
        # dtype of the residual stream; None: the embedding's (fp32). Under bf16 autocast every block's
        # output is bf16 anyway, and an fp32 stream only doubles the bytes that norms and adds move.
        self.residual_dtype: torch.dtype | None = None
        self.apply(self._init)
        for name, p in self.named_parameters():
            if name.endswith("proj.weight"):  # residual projections: GPT-2's 1/sqrt(2L) scaling
                nn.init.normal_(p, 0.0, 0.02 / math.sqrt(2 * cfg.n_layer))

    @staticmethod
    def _init(m):
        if isinstance(m, (nn.Linear, nn.Embedding)):
            nn.init.normal_(m.weight, 0.0, 0.02)

    def forward(self, idx, targets=None, cache: KVCache | None = None, return_logits: bool = True):
        """idx (B, T) token ids -> logits (B, T, V) in fp32, and the mean cross-entropy if targets
        are given. With a cache, idx continues the cached tokens and the cache grows by T.
        Training passes return_logits=False: the loss is then computed from the logits in the
        autocast dtype (the fp32 upcast fuses into the loss under torch.compile) and the full
        (B, T, V) fp32 logits, the largest activation of a small model, are never materialised."""
        B, T = idx.shape
        start = cache.length if cache is not None else 0
        if start + T > self.cfg.seq_len:
            raise ValueError(f"sequence of {start + T} tokens exceeds the model's seq_len {self.cfg.seq_len}")
        cos, sin = self.rope_cos[start:start + T], self.rope_sin[start:start + T]
        x = self.wte(idx)
        if self.residual_dtype is not None:
            x = x.to(self.residual_dtype)
        for i, block in enumerate(self.blocks):
            x = block(x, cos, sin, cache, i)
        if cache is not None:
            cache.length += T
        logits = self.output_linear(self.norm(x), self.wte.weight)  # tied output projection
        loss = None
        if targets is not None:
            loss = F.cross_entropy(logits.view(-1, logits.size(-1)).float(), targets.reshape(-1), ignore_index=-1)
        return (logits.float() if return_logits else None), loss

    def new_cache(self, batch_size: int, max_len: int | None = None) -> KVCache:
        p = self.wte.weight
        return KVCache(self.cfg, batch_size, max_len or self.cfg.seq_len, p.device, p.dtype)

    def config_dict(self) -> dict:
        return asdict(self.cfg)
