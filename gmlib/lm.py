"""The interface every language model the evaluation sees offers, and its one-model case.


Every language model the evaluation sees (a dense GPT, one gm expert alone, the gm mixture)
offers
  token_logprobs(doc)                 -> log p(x_t | x_<t) for t = 1..T-1 (float64, length T-1)
  token_logprobs_many(docs, known)    -> the same for a list of documents, batched
  generate(prompt, max_new_tokens, temperature, top_p, seed) -> the new token ids
  params_total, params_active         (parameters stored / used per token)
`SingleLM` wraps one gmlib.model.GPT (a dense baseline and a single expert are the same thing);
gmlib.mixture's MixtureLM offers the same interface over many experts.

Models run in their own dtype, without autocast: scoring an fp32 checkpoint is exact fp32
(bf16 logits would move bits per byte by rounding alone); an expert stored as bf16 runs in bf16.

Long documents are scored in sliding windows of the model's seq_len: the first window scores
its own targets, each later window moves by `stride` (default seq_len/2) and scores only its new
targets, so every token after the first window has at least seq_len - stride tokens of context.
The same rule applies to every model and every expert.

Generation has two engines that give the same tokens: "static" (gmlib.decode, the default) and
"reference" (generate_reference below, one prompt and one stream per expert at a time: the ground
truth tests/test_decode.py holds the static one to).
"""
from typing import Sequence

import numpy as np
import torch

from . import decode
from .decode import sample  # noqa: F401 (the sampler of both generators; tests import it from here)
from .model import GPT


# ---------------------------------------------------------------------------------------------
# scoring one model


def device_of(model) -> torch.device:
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


def window_batches(docs: Sequence[np.ndarray], L: int, stride: int, batch_tokens: int, upto=None):
    """Batches of (doc index, start, end, first_target) windows, similar lengths together (less
    padding), with their right-padded token tensors. upto[i]: only the windows of doc i that
    score a target below upto[i] (the windows are those of the whole document, so a target's
    context does not depend on upto)."""
    jobs = [(i, *w) for i, d in enumerate(docs) for w in windows(len(d), L, stride)
            if upto is None or w[2] < upto[i]]
    jobs.sort(key=lambda j: j[2] - j[1], reverse=True)
    per_batch = max(1, batch_tokens // L)
    for b in range(0, len(jobs), per_batch):
        batch = jobs[b:b + per_batch]
        width = max(e - s for _, s, e, _ in batch)
        x = torch.zeros(len(batch), width, dtype=torch.long)
        for r, (i, s, e, _) in enumerate(batch):
            x[r, :e - s] = torch.as_tensor(np.asarray(docs[i][s:e], dtype=np.int64))
        yield batch, x


@torch.inference_mode()
def window_logprobs(model: GPT, docs: Sequence[np.ndarray], stride: int | None = None,
                    batch_tokens: int = 16384, upto=None) -> list[np.ndarray]:
    """log p(x_t | x_<t), t = 1..T-1, for each document under one model (float64 arrays).
    With upto (one int per document) only targets below upto[i] are scored (at least those;
    the rest of the array may stay 0), each exactly as in the full scoring."""
    L = model.cfg.seq_len
    stride = stride or max(1, L // 2)
    dev = device_of(model)
    out = [np.zeros(max(len(d) - 1, 0)) for d in docs]
    for batch, x in window_batches(docs, L, stride, batch_tokens, upto):
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
# generation: the reference engine (shared by SingleLM and MixtureLM)


class Stream:
    """One model reading a growing token sequence, giving next-token log-probs. Its context is
    the last tokens up to seq_len; on overflow it keeps the last seq_len/2 and re-reads them.
    With use_cache=False it recomputes the whole context each step: the reference that the
    cached path must match."""

    def __init__(self, model: GPT, use_cache: bool = True):
        self.model, self.use_cache, self.L = model, use_cache, model.cfg.seq_len
        self.dev, self.ctx, self.cache = device_of(model), [], None

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


def generate_reference(streams: list[Stream], log_prior: np.ndarray, eta: float, prompt, max_new_tokens: int,
                       temperature: float, top_p: float, seed: int, stop_token: int | None,
                       pool: str = "linear") -> list[int]:
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
        w = torch.as_tensor(logw, device=lps.device, dtype=lps.dtype)[:, None]
        if pool == "linear":
            mix = torch.logsumexp(w + lps, 0)
        else:  # log-linear: the weighted geometric mean, renormalised
            mix = torch.log_softmax((w.exp() * lps).sum(0), -1)
        tok = sample(mix.double().cpu().numpy(), temperature, top_p, rng)
        out.append(tok)
        if tok == stop_token:
            break
        loss -= lps[:, tok].double().cpu().numpy()  # Hedge update from each expert's own loss (untempered)
        nxt = [s.feed([tok])[-1] for s in streams]
    return out


ENGINES = ("static", "reference")


def choose_engine(engine: str, use_cache: bool) -> str:
    """static: gmlib.decode (stacked experts, static cache, CUDA graphs); reference: the Stream generator
    above (use_cache=False: the reference recomputing the whole context every token)."""
    if engine not in ENGINES:
        raise ValueError(f"generation engine {engine!r}; choose one of {ENGINES}")
    return engine if use_cache else "reference"


# ---------------------------------------------------------------------------------------------
# one model


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
                 seed: int = 0, stop_token: int | None = None, use_cache: bool = True,
                 engine: str = "static") -> list[int]:
        return self.generate_many([prompt], max_new_tokens, temperature, top_p, seed, stop_token, use_cache, engine)[0]

    def generate_many(self, prompts, max_new_tokens: int = 50, temperature: float = 1.0, top_p: float = 1.0,
                      seed: int = 0, stop_token: int | None = None, use_cache: bool = True,
                      engine: str = "static") -> list[list[int]]:
        """generate() for each prompt, every one with the same seed; the static engine decodes them together."""
        if choose_engine(engine, use_cache) == "static":
            return decode.generate([self.model], prompts, None, 0.0, "linear", max_new_tokens, temperature, top_p,
                                   seed, stop_token)
        return [generate_reference([Stream(self.model, use_cache)], np.zeros(1), 0.0, p, max_new_tokens,
                                   temperature, top_p, seed, stop_token) for p in prompts]


