"""Scoring and generation for one model or for gm's mixture of experts, behind one interface.

Every language model the evaluation sees (a dense GPT, one gm expert alone, the gm mixture)
offers
  token_logprobs(doc)                 -> log p(x_t | x_<t) for t = 1..T-1 (float64, length T-1)
  token_logprobs_many(docs, known)    -> the same for a list of documents, batched
  generate(prompt, max_new_tokens, temperature, top_p, seed) -> the new token ids
  params_total, params_active         (parameters stored / used per token)
`SingleLM` wraps one gmlib.model.GPT (a dense baseline and a single expert are the same thing);
`MixtureLM` combines experts:

    p(x_t | x_<t) = sum_e w_e(t) p_e(x_t | x_<t),   w_e(t) ∝ prior_e(t) · exp(-eta · L_e(<t))

over the top-k experts of the prior, where L_e(<t) = sum_{s<t} -log p_e(x_s | x_<s) is expert e's
own cumulative loss on the tokens before t. This is the Hedge (exponential weights) rule; with
eta = 1 it is exactly the Bayesian posterior over experts. Each weight uses only the expert's
own loss: no gradient and no information passes between experts.

The prior is honest for perplexity: it only ever sees tokens BEFORE the scored position.
  prior = softmax(router.scores([prefix]) / temperature), top-k of it kept (the rest weight 0).
  For a document with `known` = c context tokens (0 for perplexity; the PARus premise, the
  generation prompt), targets t < c + r use the prior of doc[:c], and targets in
  [c + j·r, c + (j+1)·r) use the prior of doc[:c + j·r], r = reroute_every (0: never re-route).
  A prefix of at most one token (just the document's bos) gives `base_prior` instead
  (uniform, or each expert's share of the training data).
Generation routes once on the prompt and keeps that top-k set (and their KV caches) while the
Hedge weights move after every generated token.

Models run in their own dtype, without autocast: scoring an fp32 checkpoint is exact fp32
(bf16 logits would move bits per byte by rounding alone); an expert stored as bf16 runs in bf16.

Long documents are scored in sliding windows of the model's seq_len: the first window scores
its own targets, each later window moves by `stride` (default seq_len/2) and scores only its new
targets, so every token after the first window has at least seq_len - stride tokens of context.
The same rule applies to every model and every expert.
"""
from dataclasses import dataclass
from typing import Callable, Protocol, Sequence

import numpy as np
import torch

from .model import GPT


class Router(Protocol):
    def scores(self, docs: list[np.ndarray]) -> np.ndarray:
        """(n_docs, n_experts) affinities, higher = better."""
        ...


# ---------------------------------------------------------------------------------------------
# scoring one model


def _device(model) -> torch.device:
    return next(model.parameters()).device


def windows(T: int, seq_len: int, stride: int) -> list[tuple[int, int, int]]:
    """(start, end, first_target): the model reads tokens [start, end) and scores the targets
    [first_target, end). Together the windows score every target 1..T-1 exactly once."""
    if not 0 < stride <= seq_len:
        raise ValueError(f"stride {stride} must be in 1..seq_len={seq_len}")
    if T <= seq_len:
        return [(0, T, 1)] if T > 1 else []
    out, done = [(0, seq_len, 1)], seq_len
    while done < T:
        end = min(done + stride, T)
        out.append((end - seq_len, end, done))  # a full window; the last one has the most context
        done = end
    return out


@torch.inference_mode()
def window_logprobs(model: GPT, docs: Sequence[np.ndarray], stride: int | None = None,
                    batch_tokens: int = 16384) -> list[np.ndarray]:
    """log p(x_t | x_<t), t = 1..T-1, for each document under one model (float64 arrays)."""
    L = model.cfg.seq_len
    stride = stride or max(1, L // 2)
    dev = _device(model)
    out = [np.zeros(max(len(d) - 1, 0)) for d in docs]
    jobs = [(i, *w) for i, d in enumerate(docs) for w in windows(len(d), L, stride)]
    jobs.sort(key=lambda j: j[2] - j[1], reverse=True)  # similar lengths together: less padding
    per_batch = max(1, batch_tokens // L)
    for b in range(0, len(jobs), per_batch):
        batch = jobs[b:b + per_batch]
        width = max(e - s for _, s, e, _ in batch)
        x = torch.zeros(len(batch), width, dtype=torch.long)
        for r, (i, s, e, _) in enumerate(batch):
            x[r, :e - s] = torch.as_tensor(np.asarray(docs[i][s:e], dtype=np.int64))
        x = x.to(dev)
        logits, _ = model(x)
        # log-softmax at the target only: logit[target] - logsumexp(logits); right padding is
        # harmless because attention is causal
        lp = logits[:, :-1].gather(-1, x[:, 1:, None])[..., 0] - torch.logsumexp(logits[:, :-1], dim=-1)
        lp = lp.double().cpu().numpy()
        for r, (i, s, e, ft) in enumerate(batch):
            out[i][ft - 1:e - 1] = lp[r, ft - s - 1:e - s - 1]
    return out


# ---------------------------------------------------------------------------------------------
# generation (shared by SingleLM and MixtureLM)


class _Stream:
    """One model reading a growing token sequence, giving next-token log-probs. Its context is
    the last tokens up to seq_len; on overflow it keeps the last seq_len/2 and re-reads them.
    With use_cache=False it recomputes the whole context each step: the reference that the
    cached path must match."""

    def __init__(self, model: GPT, use_cache: bool = True):
        self.model, self.use_cache, self.L = model, use_cache, model.cfg.seq_len
        self.dev, self.ctx, self.cache = _device(model), [], None

    @torch.inference_mode()
    def feed(self, tokens: list[int]) -> torch.Tensor:
        """Append tokens; return log-probs (n, V) for the last n fed tokens' successors
        (n = len(tokens), fewer if the context overflowed)."""
        self.ctx += list(tokens)
        fresh = len(tokens)
        if len(self.ctx) > self.L:
            self.ctx = self.ctx[-max(1, self.L // 2):]
            self.cache, fresh = None, len(self.ctx)  # re-read the kept context
        if self.use_cache:
            if self.cache is None:
                self.cache, fresh = self.model.new_cache(1), len(self.ctx)
            logits, _ = self.model(torch.tensor([self.ctx[-fresh:]], device=self.dev), cache=self.cache)
        else:
            logits, _ = self.model(torch.tensor([self.ctx], device=self.dev))
        n = min(len(tokens), len(self.ctx))
        return torch.log_softmax(logits[0, -n:].float(), dim=-1)


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


def _generate(streams: list[_Stream], log_prior: np.ndarray, eta: float, prompt, max_new_tokens: int,
              temperature: float, top_p: float, seed: int, stop_token: int | None) -> list[int]:
    """Mixture generation; a single model is the case of one stream with log_prior [0]."""
    prompt = [int(t) for t in prompt]
    if not prompt:
        raise ValueError("generate: empty prompt (start it with the bos token)")
    rng = np.random.default_rng(seed)
    loss = np.zeros(len(streams))  # each expert's cumulative loss on the text so far
    nxt = []
    for i, s in enumerate(streams):
        lp = s.feed(prompt)
        tgt = torch.tensor(prompt[len(prompt) - lp.shape[0] + 1:], device=lp.device)
        loss[i] = -lp[:-1].gather(-1, tgt[:, None]).sum().item()
        nxt.append(lp[-1])
    out = []
    for _ in range(max_new_tokens):
        logw = log_prior - eta * loss
        logw -= np.logaddexp.reduce(logw)
        lps = torch.stack(nxt)                                   # (k, V) on the experts' device
        mix = torch.logsumexp(torch.as_tensor(logw, device=lps.device, dtype=lps.dtype)[:, None] + lps, 0)
        tok = sample(mix.double().cpu().numpy(), temperature, top_p, rng)
        out.append(tok)
        if tok == stop_token:
            break
        loss -= lps[:, tok].double().cpu().numpy()  # Hedge update from each expert's own loss (untempered)
        nxt = [s.feed([tok])[-1] for s in streams]
    return out


# ---------------------------------------------------------------------------------------------
# the two kinds of model


class SingleLM:
    """One GPT: a dense baseline, or one gm expert alone."""

    def __init__(self, model: GPT, stride: int | None = None, batch_tokens: int = 16384):
        self.model, self.stride, self.batch_tokens = model.eval(), stride, batch_tokens
        self.seq_len = model.cfg.seq_len
        self.params_total = self.params_active = model.cfg.n_params

    def token_logprobs_many(self, docs: Sequence[np.ndarray], known=None) -> list[np.ndarray]:
        return window_logprobs(self.model, docs, self.stride, self.batch_tokens)

    def token_logprobs(self, doc: np.ndarray, known: int = 0) -> np.ndarray:
        return self.token_logprobs_many([doc])[0]

    def generate(self, prompt, max_new_tokens: int = 50, temperature: float = 1.0, top_p: float = 1.0,
                 seed: int = 0, stop_token: int | None = None, use_cache: bool = True) -> list[int]:
        return _generate([_Stream(self.model, use_cache)], np.zeros(1), 0.0, prompt, max_new_tokens,
                         temperature, top_p, seed, stop_token)


@dataclass
class MixtureConfig:
    k: int = 2                # experts in the mixture at any position (top-k of the prior)
    eta: float = 1.0          # Hedge learning rate; 1 = Bayesian posterior, 0 = the prior alone
    temperature: float = 1.0  # prior = softmax(router scores / temperature)
    reroute_every: int = 256  # recompute the prior from the prefix every this many tokens; 0 = once


def _log_softmax(x: np.ndarray) -> np.ndarray:
    x = np.asarray(x, dtype=np.float64)
    return x - np.logaddexp.reduce(x, axis=-1, keepdims=True)


def _topk_mask(logp: np.ndarray, k: int) -> np.ndarray:
    """Keep the k largest entries of each row (ties to the lower expert id); -inf elsewhere."""
    idx = np.argsort(-logp, axis=-1, kind="stable")[..., :k]
    out = np.full_like(logp, -np.inf)
    np.put_along_axis(out, idx, np.take_along_axis(logp, idx, -1), -1)
    return out


class MixtureLM:
    """gm's experts working together: top-k of the router's prior, Hedge weights along the text.

    load_expert(e) returns expert e as a GPT on the compute device (the expert store's GPU LRU
    in gm, or `list_of_models.__getitem__`); the mixture holds at most k experts at once while
    generating and one at a time while scoring (each needed expert scores every document that
    needs it, then is released), so it works when all experts don't fit. The k models held for
    generation are used together, so load_expert must return k distinct modules (a store-backed
    loader copies each expert into its own GPT of a pool of k)."""

    def __init__(self, load_expert: Callable[[int], GPT], n_experts: int, router: Router | None = None,
                 cfg: MixtureConfig | None = None, base_prior: np.ndarray | None = None,
                 expert_n_params: int | None = None, stride: int | None = None, batch_tokens: int = 16384):
        self.load_expert, self.n_experts, self.router = load_expert, n_experts, router
        self.cfg = cfg or MixtureConfig()
        if not 1 <= self.cfg.k <= n_experts:
            raise ValueError(f"MixtureConfig.k={self.cfg.k} must be in 1..n_experts={n_experts}")
        if self.cfg.temperature <= 0 or self.cfg.eta < 0 or self.cfg.reroute_every < 0:
            raise ValueError(f"bad MixtureConfig {self.cfg}: need temperature > 0, eta >= 0, reroute_every >= 0")
        base = np.full(n_experts, 1.0 / n_experts) if base_prior is None else np.asarray(base_prior, np.float64)
        if base.shape != (n_experts,) or (base < 0).any() or base.sum() <= 0:
            raise ValueError(f"base_prior must be {n_experts} non-negative numbers, not all zero")
        with np.errstate(divide="ignore"):
            self.log_base = np.log(base / base.sum())
        self.stride, self.batch_tokens = stride, batch_tokens
        if expert_n_params is None:
            expert_n_params = load_expert(0).cfg.n_params  # gm's experts all share one config
        self.params_total = n_experts * expert_n_params
        self.params_active = self.cfg.k * expert_n_params

    # ---- the prior

    def _log_priors(self, prefixes: list[np.ndarray]) -> np.ndarray:
        """Top-k-masked log prior for each prefix (n, n_experts); <= 1 token: the base prior."""
        out = np.tile(self.log_base, (len(prefixes), 1))
        routed = [i for i, p in enumerate(prefixes) if len(p) > 1]
        if routed and self.router is not None:
            s = np.asarray(self.router.scores([np.asarray(prefixes[i]) for i in routed]), np.float64)
            if s.shape != (len(routed), self.n_experts):
                raise ValueError(f"router.scores returned shape {s.shape}, expected ({len(routed)}, {self.n_experts})")
            out[routed] = _log_softmax(s / self.cfg.temperature)
        return _topk_mask(out, self.cfg.k)

    def _segments(self, T: int, known: int) -> list[int]:
        """Route points: segment j uses the prefix doc[:points[j]] and scores the targets from
        max(points[j], 1) (the first segment from 1) up to the next point."""
        r, c = self.cfg.reroute_every, max(known, 0)
        pts = [c]
        while r and pts[-1] + r < T:
            pts.append(pts[-1] + r)
        return pts

    # ---- scoring

    def _score(self, docs: Sequence[np.ndarray], known=None):
        known = [0] * len(docs) if known is None else list(known)
        segs = [self._segments(len(d), c) for d, c in zip(docs, known)]
        flat = [np.asarray(d[:p]) for d, pts in zip(docs, segs) for p in pts]
        logp_flat = self._log_priors(flat)
        priors, at = [], 0
        for pts in segs:
            priors.append(logp_flat[at:at + len(pts)])
            at += len(pts)
        need = [np.flatnonzero(np.isfinite(p).any(0)) for p in priors]  # experts used anywhere
        lps = [dict() for _ in docs]
        for e in range(self.n_experts):
            who = [i for i, n in enumerate(need) if e in n and len(docs[i]) > 1]
            if not who:
                continue
            model = self.load_expert(e)  # one expert resident at a time while scoring
            for i, lp in zip(who, window_logprobs(model, [docs[i] for i in who], self.stride, self.batch_tokens)):
                lps[i][e] = lp
            del model
        return [self._combine(len(d), pts, pr, lp) for d, pts, pr, lp in zip(docs, segs, priors, lps)]

    def _combine(self, T, pts, log_prior_seg, lp_by_expert):
        """Mixture log-probs (T-1,) and weights (n_experts, T-1) for one document."""
        N = max(T - 1, 0)
        weights = np.zeros((self.n_experts, N))
        if N == 0:
            return np.zeros(0), weights
        experts = sorted(lp_by_expert)
        LP = np.stack([lp_by_expert[e] for e in experts])               # (C, N): log p_e(x_t)
        cum = np.cumsum(-LP, axis=1) - (-LP)                             # L_e(<t), exclusive
        t = np.arange(1, T)                                              # target positions
        seg = np.searchsorted(np.asarray(pts), t, side="right") - 1      # segment of each target
        seg = np.maximum(seg, 0)
        logprior = log_prior_seg[seg][:, experts].T                      # (C, N)
        logw = logprior - self.cfg.eta * cum
        logw = logw - np.logaddexp.reduce(logw, axis=0)
        mix = np.logaddexp.reduce(logw + LP, axis=0)
        weights[experts] = np.exp(logw)
        return mix, weights

    def token_logprobs_many(self, docs: Sequence[np.ndarray], known=None) -> list[np.ndarray]:
        """`known[i]` tokens of doc i are given context (0 for perplexity): the first prior may
        read them. The log-probs of those context positions themselves are not honest."""
        return [m for m, _ in self._score(docs, known)]

    def token_logprobs(self, doc: np.ndarray, known: int = 0) -> np.ndarray:
        return self._score([doc], [known])[0][0]

    def weights(self, doc: np.ndarray, known: int = 0) -> np.ndarray:
        """w_e(t) for every expert and target position: (n_experts, T-1)."""
        return self._score([doc], [known])[0][1]

    # ---- generation

    def generate(self, prompt, max_new_tokens: int = 50, temperature: float = 1.0, top_p: float = 1.0,
                 seed: int = 0, stop_token: int | None = None, use_cache: bool = True) -> list[int]:
        logp = self._log_priors([np.asarray(prompt, dtype=np.int64)])[0]
        active = np.flatnonzero(np.isfinite(logp))
        streams = [_Stream(self.load_expert(int(e)), use_cache) for e in active]  # k resident
        return _generate(streams, logp[active], self.cfg.eta, prompt, max_new_tokens,
                         temperature, top_p, seed, stop_token)


def from_models(models: list[GPT], **kw) -> MixtureLM:
    """A mixture over experts already in memory (tests, small runs)."""
    return MixtureLM(models.__getitem__, len(models), **kw)
