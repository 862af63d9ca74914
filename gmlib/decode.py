"""Static decoding: one GPT, or the k experts of a mixture, generating for many prompts without Python
in the token loop.

Why. gmlib.lm's reference generator feeds each model one token at a time through its modules, with a
KV cache that grows, and moves every distribution to the host for the Hedge weights and the draw: batch-1
decoding of a 124M model ran 144 tokens/s on an H100 and a k=2 mixture 75 (results/bench/infer_speed_h100.json),
where the GPU work of one token is a few hundred microseconds. The time was kernel launches and host syncs.

How.
- Experts stacked. The k experts' weights are copied into tensors with a leading expert dimension E (one
  model: E = 1), so each matmul of a block is one batched matmul over the experts, and the k experts of a
  mixture take one pass per token, not k.
- A static KV cache: keys and values of (E, B, H, S, D) per layer, S slots fixed for the whole call (prompt
  plus new tokens, rounded up so later calls reuse the buffers). Prompts are left-padded: row b's tokens sit
  in slots [start_b, t), every row writes slot t at each step, a token's RoPE position is its slot minus
  start_b, and attention reads only the row's valid slots (a mask), so padding changes nothing.
- One decode step of fixed shape (`_step`): feed `tok` (B,) at slot t, update each expert's cumulative loss
  with the distribution it gave for that token, run the stacked model, pool the experts' next-token
  log-probs with the Hedge weights exactly as gmlib.mixture does (linear: logsumexp_e(log w_e + log p_e);
  log-linear: log_softmax(sum_e w_e log p_e)) and write the greedy token back into `tok`. On CUDA the step
  is captured once into a CUDA graph and replayed; on CPU (or with graphs=False) it runs eagerly.
- compiled=True (not the default: its speed is not measured on a GPU yet) runs the step through
  torch.compile before the capture, so that the elementwise work around the matmuls (RoPE and its casts,
  the norms, the activation, the pooling) is fused into fewer kernels: at batch 1 the graph's time is
  about 175 small kernels a token, not arithmetic. A step that fails to compile falls back to the plain one.
- Sampling draws on the host with gmlib's own sampler and a generator seeded per row, the reference's
  rule, so a seed gives the same text as one-by-one generation; greedy decoding never leaves the GPU.
- Context overflow as in the reference: a row that would pass seq_len keeps its last seq_len/2 tokens and
  re-reads them (an eager prefill of that row alone, written into the slots that end at t).
Decoders are kept in a small LRU keyed by shape, so a graph is captured once per shape and pool; the
weights are copied in at every call (a store's pool module may hold another expert by then).
The reference generator stays in gmlib.lm (engine="reference"); tests/test_decode.py holds the two to
the same tokens.
"""
import warnings
from collections import OrderedDict
from dataclasses import astuple

import numpy as np
import torch
import torch.nn.functional as F

from .model import ACTIVATIONS, GATED, GPT

SLOT_ROUND = 128          # cache slots are rounded up to a multiple of this (fewer shapes, fewer graphs)
MAX_BATCH = 32            # prompts decoded together; more are done in chunks
PREFILL_LOGITS = 1 << 26  # prefill logits (E·rows·P·V floats) computed in row chunks of at most this


def sample(logp: np.ndarray, temperature: float, top_p: float, rng: np.random.Generator) -> int:
    """Draw a token from softmax(logp / temperature) cut to its top-p nucleus; temperature 0 is
    greedy. The draw walks the kept tokens in id order (not probability order), so a tiny
    change in the probabilities moves the outcome only when the uniform draw sits on a border."""
    if temperature <= 0:
        return int(np.argmax(logp))
    z = logp / temperature
    p = np.exp(z - z.max())
    p /= p.sum()
    if top_p < 1.0:
        # sort only the most likely few hundred tokens when they already hold top_p of the mass
        # (a full argsort of a 32k vocabulary costs more than a small model's forward pass)
        top = np.arange(len(p))
        for m in (256, 4096):
            if m < len(p):
                cand = np.sort(np.argpartition(-p, m - 1)[:m])
                if p[cand].sum() >= top_p:
                    top = cand
                    break
        order = top[np.argsort(-p[top], kind="stable")]  # by probability, ties by token id
        before = np.cumsum(p[order]) - p[order]          # mass of the tokens ranked above
        keep = np.zeros_like(p, dtype=bool)
        keep[order[before < top_p]] = True               # the smallest set reaching top_p
        p = np.where(keep, p, 0.0)
    c = np.cumsum(p)
    return int(min(np.searchsorted(c, rng.random() * c[-1], side="right"), len(p) - 1))


def _mm(a, w, add=None):
    """a (E, B, T, K) times each expert's w (E, N, K) transposed -> (E, B, T, N), one batched matmul;
    plus `add` (E, B, T, N) in the same kernel (a residual connection)."""
    E, B, T, K = a.shape
    a, wt = a.reshape(E, B * T, K), w.transpose(1, 2)
    out = torch.bmm(a, wt) if add is None else torch.baddbmm(add.reshape(E, B * T, -1), a, wt)
    return out.view(E, B, T, -1)


def _norm(x, g):
    """nn.RMSNorm(eps=1e-6) with one gain per expert; one model: the same fused call as nn.RMSNorm."""
    if g.shape[0] == 1:
        return F.rms_norm(x, (x.shape[-1],), g[0], eps=1e-6)
    return F.rms_norm(x, (x.shape[-1],), eps=1e-6) * g[:, None, None, :]


def _interleave(n_head: int, head_dim: int) -> torch.Tensor:
    """Row order of a q or k projection that puts the rotated pairs (i, i + D/2) of every head side by
    side, so RoPE is one complex multiply. Attention scores are dot products of q and k over a head's
    dimensions, unchanged when both are permuted alike; v and the cache's readers never see the order."""
    half = head_dim // 2
    within = torch.stack([torch.arange(half), torch.arange(half) + half], dim=-1).flatten()
    return (torch.arange(n_head)[:, None] * head_dim + within).flatten()


class Decoder:
    """Stacked weights, static cache and the decode step for E models of one config, B rows, S slots."""

    def __init__(self, template: GPT, n_models: int, batch: int, slots: int, graphs: bool = True,
                 compiled: bool = False):
        cfg, p0 = template.cfg, template.wte.weight
        self.cfg, self.E, self.B, self.S, self.dev = cfg, n_models, batch, slots, p0.device
        self.H, self.D = cfg.n_head, cfg.n_embd // cfg.n_head
        self.residual_dtype = template.residual_dtype
        z = lambda *shape, dtype=p0.dtype: torch.zeros(*shape, dtype=dtype, device=self.dev)  # noqa: E731
        self.w = {name: z(n_models, *p.shape, dtype=p.dtype) for name, p in template.named_parameters()}
        qk = _interleave(self.H, self.D)
        self.qkv_rows = torch.cat([qk, qk + cfg.n_embd, torch.arange(2 * cfg.n_embd, 3 * cfg.n_embd)]).to(self.dev)
        # (seq_len, D/2): e^(i·pos·freq); complex needs fp32 parts, and a bf16 model's buffers upcast exactly
        # inductor generates no complex arithmetic: the compiled step gets (cos, sin) pairs in a last dimension
        self.rope = torch.complex(template.rope_cos.float(), template.rope_sin.float())
        if compiled:
            self.rope = torch.view_as_real(self.rope)
        self.act = GATED[cfg.activation] if cfg.gated else ACTIVATIONS[cfg.activation]
        cache = (n_models, batch, self.H, slots, self.D)
        self.k = [z(*cache) for _ in range(cfg.n_layer)]
        self.v = [z(*cache) for _ in range(cfg.n_layer)]
        self.valid = z(batch, slots, dtype=torch.bool)     # slot s of row b holds one of b's tokens
        self.hist = z(batch, slots, dtype=torch.long)      # ... and this is that token
        self.start = z(batch, dtype=torch.long)            # row b's first slot (its RoPE position 0)
        self.t = z(1, dtype=torch.long)                    # the slot the next step writes
        self.tok = z(batch, dtype=torch.long)              # the token the next step feeds
        self.lps = z(n_models, batch, cfg.vocab_size, dtype=torch.float32)  # each expert's next-token log p
        self.mix = z(batch, cfg.vocab_size, dtype=torch.float32)            # the pooled next-token log p
        self.loss = z(n_models, batch, dtype=torch.float64)                 # each expert's cumulative loss
        self.log_prior = z(n_models, batch, dtype=torch.float64)
        self.eta = z(1, dtype=torch.float64)
        self.pool = "linear"
        self.use_graphs = graphs and self.dev.type == "cuda"
        self.graphs: dict = {}  # pool -> captured CUDA graph of step
        # the step every caller runs: _step itself, or its torch.compile'd version (fixed shapes: no recompiles)
        self._compiled = torch.compile(self._step, dynamic=False) if compiled else None
        self.step = self._step_compiled if compiled else self._step

    def load(self, models: list[GPT]):
        for e, m in enumerate(models):
            if m.cfg != self.cfg:
                raise ValueError(f"decode: expert {e} has config {m.cfg}, the others {self.cfg}")
            for name, p in m.named_parameters():
                self.w[name][e].copy_(p[self.qkv_rows] if name.endswith("attn.qkv.weight") else p)

    # ---- the model, stacked

    def _forward(self, x, pos, mask, write, kc, vc):
        """x (b, T) tokens at RoPE positions pos (b, T); mask (b, T, S') the slots each query reads;
        write(cache, new) puts the new keys/values into the caches kc, vc (lists of (E, b, H, S', D)).
        Returns the final normed hidden states (E, b, T, C)."""
        E, (b, T), w, H, D, C = self.E, x.shape, self.w, self.H, self.D, self.cfg.n_embd
        rope = self.rope[pos][None, :, :, None, None]       # (1, b, T, 1, 1, D/2), complex or (cos, sin) pairs
        h = w["wte.weight"][:, x]                                            # (E, b, T, C)
        if self.residual_dtype is not None:  # a bf16 stream of training (gmlib.train): the reference rounds the
            h = h.to(self.residual_dtype).to(h.dtype)  # embedding to it, and the first block's sums are fp32 again
        bias = torch.zeros(mask.shape, dtype=h.dtype, device=self.dev).masked_fill_(~mask, float("-inf"))
        bias = bias[None, :, None].expand(E, -1, -1, -1, -1).reshape(E * b, 1, T, -1)  # once for every layer
        for i in range(self.cfg.n_layer):
            p = f"blocks.{i}."
            qkv = _mm(_norm(h, w[p + "norm1.weight"]), w[p + "attn.qkv.weight"])      # (E, b, T, 3C)
            # RoPE on q and k together: the pairs sit side by side (see _interleave), one complex multiply
            pairs = qkv[..., :2 * C].float().reshape(E, b, T, 2, H, D // 2, 2)
            if rope.is_complex():
                qk = torch.view_as_real(torch.view_as_complex(pairs) * rope)
            else:  # the compiled step: the same product written out in reals, which inductor fuses
                re, im, c, s = pairs[..., 0], pairs[..., 1], rope[..., 0], rope[..., 1]
                qk = torch.stack([re * c - im * s, re * s + im * c], dim=-1)
            q, k = qk.reshape(E, b, T, 2, H, D).to(h.dtype).permute(3, 0, 1, 4, 2, 5)
            v = qkv[..., 2 * C:].view(E, b, T, H, D).transpose(2, 3)             # (E, b, H, T, D) each
            write(kc[i], k)
            write(vc[i], v)
            S = kc[i].shape[3]
            y = F.scaled_dot_product_attention(q.reshape(E * b, H, T, D), kc[i].view(E * b, H, S, D),
                                               vc[i].view(E * b, H, S, D), attn_mask=bias)
            h = _mm(y.view(E, b, H, T, D).transpose(2, 3).reshape(E, b, T, C), w[p + "attn.proj.weight"], add=h)
            u = _mm(_norm(h, w[p + "norm2.weight"]), w[p + "mlp.fc.weight"])
            if self.cfg.gated:
                gate, up = u.chunk(2, dim=-1)
                u = self.act(gate) * up
            else:
                u = self.act(u)
            h = _mm(u, w[p + "mlp.proj.weight"], add=h)
        return _norm(h, w["norm.weight"])

    def _logits(self, h):
        return _mm(h, self.w["wte.weight"]).float()  # the tied output projection

    def _pool(self, lps):
        """Each expert's log p (E, B, V) into lps, the mixture's into mix, the greedy token into tok."""
        self.lps.copy_(lps)
        if self.E == 1:
            mix = lps[0]  # one model: its own distribution (what the reference's pooling of one gives exactly)
        else:
            logw = self.log_prior - self.eta * self.loss
            logw = logw - torch.logsumexp(logw, dim=0)
            w = logw.to(lps.dtype)[..., None]                                  # (E, B, 1)
            if self.pool == "linear":
                mix = torch.logsumexp(w + lps, dim=0)
            else:  # log-linear: the weighted geometric mean, renormalised
                mix = torch.log_softmax((w.exp() * lps).sum(0), dim=-1)
        self.mix.copy_(mix)
        self.tok.copy_(mix.argmax(dim=-1))

    def _step(self):
        """Feed tok at slot t: fixed shapes, no host sync (what the CUDA graph holds)."""
        tok = self.tok
        self.hist.index_copy_(1, self.t, tok[:, None])
        self.valid.index_fill_(1, self.t, True)
        if self.E > 1:  # the Hedge update from each expert's own loss on the fed token
            self.loss -= self.lps.gather(-1, tok[None, :, None].expand(self.E, -1, 1))[..., 0].double()
        pos = (self.t - self.start).clamp(max=self.cfg.seq_len - 1)[:, None]  # clamp: a row that overflows is redone
        h = self._forward(tok[:, None], pos, self.valid[:, None, :], lambda c, new: c.index_copy_(3, self.t, new),
                          self.k, self.v)
        self._pool(torch.log_softmax(self._logits(h)[:, :, 0], dim=-1))
        self.t += 1

    def _step_compiled(self):
        try:
            self._compiled()
        except Exception as err:  # noqa: BLE001 (compiling fails before the step changes anything: run it plainly)
            warnings.warn(f"decode: torch.compile of the decode step failed ({err!r}); running it uncompiled")
            self.step = self._step
            self._step()

    def _graph(self):
        """The captured step for the current pool (captured on first use, before any prefill: the
        warm-up steps write slot 0, which the prefill overwrites)."""
        if not self.use_graphs:
            return None
        if self.pool not in self.graphs:
            try:
                side = torch.cuda.Stream()
                side.wait_stream(torch.cuda.current_stream())
                with torch.cuda.stream(side):
                    for _ in range(2):
                        self.step()
                torch.cuda.current_stream().wait_stream(side)
                g = torch.cuda.CUDAGraph()
                # thread_local: a store's prefetch thread may copy on its own stream meanwhile
                with torch.cuda.graph(g, capture_error_mode="thread_local"):
                    self.step()
                self.graphs[self.pool] = g
            except Exception as err:  # noqa: BLE001 (a capture that fails leaves the eager step, which is correct)
                warnings.warn(f"decode: CUDA graph capture failed ({err!r}); decoding eagerly")
                self.use_graphs = False
                return None
            finally:
                self.t.zero_()
        return self.graphs[self.pool]

    # ---- prefill and overflow

    def prefill(self, prompts: list[list[int]]):
        B, S, P = self.B, self.S, max(len(p) for p in prompts)
        x = torch.zeros(B, P, dtype=torch.long)
        for r, p in enumerate(prompts):
            x[r, P - len(p):] = torch.as_tensor(p)
        x = x.to(self.dev)
        start = torch.tensor([P - len(p) for p in prompts], device=self.dev)
        slot = torch.arange(S, device=self.dev)
        q = slot[:P, None]
        real = slot[None, None, :] >= start[:, None, None]
        # a query reads its row's slots up to itself; a padding query reads only itself (finite, never read)
        mask = ((slot[None, None, :] <= q) & real) | ((slot[None, None, :] == q) & (q < start[:, None, None]))
        self.start.copy_(start)
        self.valid.copy_(real[:, 0] & (slot[None] < P))
        self.hist.zero_()
        self.hist[:, :P] = x
        self.t.fill_(P)

        def write(c, new):
            c[:, :, :, :P] = new
        h = self._forward(x, (slot[None, :P] - start[:, None]).clamp(min=0), mask, write, self.k, self.v)
        self.loss.zero_()
        self._pool(self._prompt_logprobs(h, x, start))

    def _prompt_logprobs(self, h, x, start):
        """Last-position log-probs (E, B, V) of h (E, B, P, C); for a mixture also each expert's loss on
        each row's own tokens after its first (into self.loss), which the Hedge weights start from."""
        E, b, P = self.E, x.shape[0], x.shape[1]
        if E == 1:
            return torch.log_softmax(self._logits(h[:, :, -1:])[:, :, 0], dim=-1)
        last = []
        chunk = max(1, PREFILL_LOGITS // (E * P * self.cfg.vocab_size))
        for a in range(0, b, chunk):
            lp = torch.log_softmax(self._logits(h[:, a:a + chunk]), dim=-1)           # (E, c, P, V)
            tgt = lp[:, :, :-1].gather(-1, x[None, a:a + chunk, 1:, None].expand(E, -1, -1, 1))[..., 0]
            own = torch.arange(P - 1, device=self.dev)[None] >= start[a:a + chunk, None]  # targets after a real token
            self.loss[:, a:a + chunk] = -torch.where(own, tgt, 0.0).sum(-1).double()
            last.append(lp[:, :, -1])
        return torch.cat(last, dim=1)

    def reread(self, rows: list[int], keep: int):
        """Rows that overflowed (after a step): keep their last `keep` tokens, re-read them into the slots that
        end at t, and pool again. The losses are kept (the reference keeps them too)."""
        t = int(self.t.item())
        r = torch.tensor(rows, device=self.dev)
        x = self.hist[r, t - keep:t]
        cache = (self.E, len(rows), self.H, keep, self.D)
        kc = [torch.zeros(cache, dtype=self.k[0].dtype, device=self.dev) for _ in self.k]
        vc = [torch.zeros(cache, dtype=self.k[0].dtype, device=self.dev) for _ in self.k]

        def write(c, new):
            c.copy_(new)
        causal = torch.ones(keep, keep, dtype=torch.bool, device=self.dev).tril()[None].expand(len(rows), -1, -1)
        pos = torch.arange(keep, device=self.dev)[None].expand(len(rows), -1)
        h = self._forward(x, pos, causal, write, kc, vc)
        for i in range(self.cfg.n_layer):
            self.k[i][:, r, :, t - keep:t] = kc[i]
            self.v[i][:, r, :, t - keep:t] = vc[i]
        self.valid[r] = False
        self.valid[r, t - keep:t] = True
        self.start[r] = t - keep
        lps = self.lps.clone()
        lps[:, r] = torch.log_softmax(self._logits(h[:, :, -1:])[:, :, 0], dim=-1)
        self._pool(lps)


_DECODERS: OrderedDict = OrderedDict()
KEEP_DECODERS = 4


@torch.inference_mode()
def decoder(models: list[GPT], batch: int, slots: int, graphs: bool = True, compiled: bool = False) -> Decoder:
    """A Decoder for these models' shape (reused: at most KEEP_DECODERS are kept), their weights loaded."""
    m0, p0 = models[0], models[0].wte.weight
    key = (astuple(m0.cfg), len(models), batch, slots, str(p0.device), p0.dtype, m0.residual_dtype, graphs, compiled)
    if key in _DECODERS:
        _DECODERS.move_to_end(key)
    else:
        while len(_DECODERS) >= KEEP_DECODERS:
            _DECODERS.popitem(last=False)
        _DECODERS[key] = Decoder(m0, len(models), batch, slots, graphs, compiled)
    dec = _DECODERS[key]
    dec.load(models)
    return dec


@torch.inference_mode()
def generate(models: list[GPT], prompts: list, log_prior=None, eta: float = 1.0, pool: str = "linear",
             max_new_tokens: int = 50, temperature: float = 1.0, top_p: float = 1.0, seed: int = 0,
             stop_token: int | None = None, graphs: bool = True, batch_size: int = MAX_BATCH,
             compiled: bool = False) -> list[list[int]]:
    """New tokens for each prompt from the mixture of `models` (one model: itself), as gmlib.mixture's
    reference generator gives them one prompt at a time with the same seed. log_prior: (n_prompts, E) or
    (E,) log prior weights of the models (the routed top-k); eta: Hedge rate; pool: linear or log-linear."""
    prompts = [[int(t) for t in p] for p in prompts]
    if any(not p for p in prompts):
        raise ValueError("generate: empty prompt (start it with the bos token)")
    E, L = len(models), models[0].cfg.seq_len
    lp = np.zeros((len(prompts), E)) if log_prior is None else np.broadcast_to(np.asarray(log_prior, np.float64),
                                                                                (len(prompts), E))
    keep = max(1, L // 2)
    prompts = [p if len(p) <= L else p[-keep:] for p in prompts]  # the reference re-reads an overlong prompt's tail
    out = []
    for a in range(0, len(prompts), batch_size):
        out += _generate_batch(models, prompts[a:a + batch_size], lp[a:a + batch_size], eta, pool, max_new_tokens,
                               temperature, top_p, seed, stop_token, graphs, compiled)
    return out


def _generate_batch(models, prompts, log_prior, eta, pool, n, temperature, top_p, seed, stop_token, graphs,
                    compiled):
    B, L = len(prompts), models[0].cfg.seq_len
    if n <= 0:
        return [[] for _ in prompts]
    P = max(len(p) for p in prompts)
    slots = -(-(P + n) // SLOT_ROUND) * SLOT_ROUND
    dec = decoder(models, B, slots, graphs, compiled)
    dec.pool = pool
    dec.eta.fill_(eta)
    dec.log_prior.copy_(torch.tensor(np.array(log_prior.T), device=dec.dev))
    graph = dec._graph()
    dec.prefill(prompts)
    length = np.array([len(p) for p in prompts])     # each row's context, as the reference counts it
    keep = max(1, L // 2)
    greedy = temperature <= 0
    rngs = [np.random.default_rng(seed) for _ in prompts]
    done = np.zeros(B, bool)
    for i in range(n):
        if i:
            length += 1
            over = np.flatnonzero(length > L)
            if len(over):  # eager step, then the overflowing rows re-read their last `keep` tokens
                dec.step()
                dec.reread(over.tolist(), keep)
                length[over] = keep
            elif graph is not None:
                graph.replay()
            else:
                dec.step()
        if not greedy:
            mix = dec.mix.double().cpu().numpy()
            toks = [0 if done[b] else sample(mix[b], temperature, top_p, rngs[b]) for b in range(B)]
            dec.tok.copy_(torch.tensor(toks))
            done |= np.array(toks) == stop_token
            if done.all():
                break
        elif stop_token is not None and i % 32 == 31:
            t = int(dec.t.item())
            if bool((torch.cat([dec.hist[:, P:t], dec.tok[:, None]], 1) == stop_token).any(1).all()):
                break
    t = int(dec.t.item())
    gen = torch.cat([dec.hist[:, P:t], dec.tok[:, None]], 1).cpu().tolist()
    out = []
    for g in gen:
        if stop_token is not None and stop_token in g:
            g = g[:g.index(stop_token) + 1]
        out.append(g)
    return out
