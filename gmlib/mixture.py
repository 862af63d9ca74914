"""gm's mixture of experts, behind the interface of gmlib.lm (token_logprobs, generate, params_*).

`MixtureLM` combines experts:

    p(x_t | x_<t) = sum_e w_e(t) p_e(x_t | x_<t),   w_e(t) ∝ prior_e(t) · exp(-eta · L_e(<t))

over the top-k experts of the prior, where L_e(<t) = sum_{s<t} -log p_e(x_s | x_<s) is expert e's
own cumulative loss on the tokens before t. This is the Hedge (exponential weights) rule; with
eta = 1 it is exactly the Bayesian posterior over experts. Each weight uses only the expert's
own loss: no gradient and no information passes between experts.

The prior is honest for perplexity: it only ever sees tokens BEFORE the scored position.
  prior = softmax(router.prefix_scores([prefix]) / temperature), top-k of it kept (the rest
  weight 0). prefix_scores is the score that assigned the training documents (the local
  router's balancing bias included) over the last max_tokens tokens of the prefix, so the
  features move with the prefix; a plain scorer with only `scores` is taken as it is.
  Route points: for perplexity (no known context) the router first reads the prefix of
  `route_from` tokens, then of twice as many, doubling up to reroute_every, then every
  reroute_every tokens (0: only the first point). Targets before the first point get the Bayes
  posterior over ALL experts from a uniform prior (Hedge with eta from a uniform start), not
  one fixed expert: a bos alone says nothing about the document. Why route_from = 32, measured
  by bench/route_start.py on the CPU demo's gm (4 experts, 50 test documents, reroute 256):
  bpb at k=1 / k=2 for route_from 1: 2.0587 / 2.0427, 8: 2.0582 / 2.0424, 32: 2.0539 / 2.0396,
  64: 2.0519 / 2.0386, 256: 2.0446 / 2.0382; the old rule (training shares, no bias, 256 tokens
  before the first route) 2.0720 / 2.0492; all 4 experts (k=4) 2.0336. Routing on fewer than
  32 tokens misleads the router; waiting longer is better still only because the k-mixture
  then becomes the all-expert ensemble on most documents (85% of the full test split's
  documents end before token 256), which params_active = k would no longer describe. 32 tokens of all experts per
  document is a small extra cost.
  With `known` = c context tokens (the PARus premise, the generation prompt), the first point
  is c (targets before it use that prior too: they are context, not scored honestly), then
  the points of the schedule after c.
  Without a router, `base_prior` (uniform, or a task prior) holds throughout.
Generation routes once on the prompt and keeps that top-k set (and their KV caches) while the
Hedge weights move after every generated token. Two engines give the same tokens: "static"
(the default, gmlib.decode: the k experts stacked into one batched model with a static KV cache,
a CUDA graph per token on a GPU, many prompts at once) and "reference" (the plain loop below, one
prompt and one expert at a time: the ground truth tests/test_decode.py holds the static one to).

Pooling (MixtureConfig.pool): "linear" is the mixture above, sum_e w_e p_e. "log-linear" is
the weighted geometric mean with the same weights, renormalised over the vocabulary:
    p(x_t) = exp(sum_e w_e log p_e(x_t)) / sum_v exp(sum_e w_e log p_e(v)).
The weights come from the experts' own losses exactly as in the linear case; only the
normaliser needs every expert's full distribution, so log-linear makes a second pass over the
same windows with all active experts (held together: load_expert must keep them, a pool of
n_experts modules) and accumulates sum_e w_e log_softmax(logits_e) per window batch.

Long documents are scored in gmlib.lm's sliding windows, the same for every expert.
"""
import hashlib
from dataclasses import dataclass, fields
from typing import Callable, Protocol, Sequence

import numpy as np
import torch

from . import decode
from .lm import Stream, choose_engine, device_of, generate_reference, window_batches, window_logprobs
from .model import GPT


class Router(Protocol):
    def scores(self, docs: list[np.ndarray]) -> np.ndarray:
        """(n_docs, n_experts) affinities, higher = better. A router may also offer
        prefix_scores(prefixes), the score it assigns training documents by; the mixture
        prefers it."""
        ...


POOLS = ("linear", "log-linear")


@dataclass
class MixtureConfig:
    k: int = 2                # experts in the mixture at any position (top-k of the prior)
    eta: float = 1.0          # Hedge learning rate; 1 = Bayesian posterior, 0 = the prior alone
    temperature: float = 1.0  # prior = softmax(router scores / temperature)
    reroute_every: int = 256  # recompute the prior from the prefix every this many tokens; 0 = once
    route_from: int = 32      # the first prefix the router reads (then doubling up to reroute_every);
    #                           before it every expert, uniform prior (see the module docstring)
    pool: str = "linear"      # linear: sum_e w_e p_e; log-linear: normalised prod_e p_e^w_e

    @classmethod
    def from_spec(cls, spec: dict) -> "MixtureConfig":
        """The fields of a model spec (gmlib.registry.load_models) that are ours; the rest is not."""
        return cls(**{f.name: spec[f.name] for f in fields(cls) if f.name in spec})

    def experts_held(self, n_experts: int, at_least: int = 1) -> int:
        """Experts a loader keeps in memory for this mixture: the k it uses together, every one of
        the n_experts under log-linear pooling (which weighs them all on each window batch)."""
        return n_experts if self.pool == "log-linear" else max(at_least, self.k)


def _log_softmax(x: np.ndarray) -> np.ndarray:
    x = np.asarray(x, dtype=np.float64)
    return x - np.logaddexp.reduce(x, axis=-1, keepdims=True)


def _topk_mask(logp: np.ndarray, k: int) -> np.ndarray:
    """Keep the k largest entries of each row (ties to the lower expert id); -inf elsewhere."""
    idx = np.argsort(-logp, axis=-1, kind="stable")[..., :k]
    out = np.full_like(logp, -np.inf)
    np.put_along_axis(out, idx, np.take_along_axis(logp, idx, -1), -1)
    return out


def doc_key(tokens) -> tuple:
    """A token sequence's identity for the memos below: its length and a hash of its tokens."""
    return len(tokens), hashlib.blake2b(np.ascontiguousarray(tokens, np.int64).tobytes(), digest_size=16).digest()


class ScoreMemo:
    """A router whose prefix scores are remembered. The mixtures of one gm that differ only in k,
    pooling or eta route the same prefixes of the same documents, and scoring a prefix (features of
    up to max_tokens tokens, on the CPU) costs more than looking it up: the frontier's evaluation
    scores six mixtures of each gm. Exact: a prefix is known by its length and a hash of its tokens.
    Every other attribute is the router's."""

    def __init__(self, router: Router):
        self.router, self.memo = router, {}
        self._score = getattr(router, "prefix_scores", None) or router.scores

    def prefix_scores(self, prefixes) -> np.ndarray:
        keys = [doc_key(p) for p in prefixes]
        todo = [i for i, k in enumerate(keys) if k not in self.memo]
        if todo:
            for i, row in zip(todo, np.asarray(self._score([prefixes[i] for i in todo]), np.float64)):
                self.memo[keys[i]] = row
        return np.stack([self.memo[k] for k in keys]) if keys else np.zeros((0, self.router.n_experts))

    def __getattr__(self, name):
        return getattr(self.router, name)


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
                 expert_n_params: int | None = None, stride: int | None = None, batch_tokens: int = 16384,
                 passes: dict | None = None):
        self.load_expert, self.n_experts, self.router = load_expert, n_experts, router
        # passes: a memo {(expert, doc_key): log p_e of the whole document} shared by mixtures of the same
        # experts (05 scores k = 1, 2, K and two pools of one gm): each expert then reads each document once,
        # in full, instead of once per mixture up to its last weighted target. Exact: an expert's log-probs
        # past that target get weight 0, and the full document's windows are the ones scored either way (on a GPU
        # the batching of windows may differ, so the last bits of rounding may too).
        self.passes = passes
        self.cfg = cfg or MixtureConfig()
        if not 1 <= self.cfg.k <= n_experts:
            raise ValueError(f"MixtureConfig.k={self.cfg.k} must be in 1..n_experts={n_experts}")
        if self.cfg.temperature <= 0 or self.cfg.eta < 0 or self.cfg.reroute_every < 0 or self.cfg.route_from < 1:
            raise ValueError(f"bad MixtureConfig {self.cfg}: need temperature > 0, eta >= 0, reroute_every >= 0, "
                             "route_from >= 1")
        if self.cfg.pool not in POOLS:
            raise ValueError(f"MixtureConfig.pool={self.cfg.pool!r}; choose one of {POOLS}")
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

    def _scores(self, prefixes: list[np.ndarray]) -> np.ndarray:
        """Router scores (n, n_experts) of each prefix: the training score when the router has one."""
        score = getattr(self.router, "prefix_scores", None) or self.router.scores
        s = np.asarray(score([np.asarray(p) for p in prefixes]), np.float64)
        if s.shape != (len(prefixes), self.n_experts):
            raise ValueError(f"router scores have shape {s.shape}, expected ({len(prefixes)}, {self.n_experts})")
        return s

    def _log_priors(self, prefixes: list[np.ndarray]) -> np.ndarray:
        """Top-k-masked log prior for each prefix (n, n_experts); without a router, the base prior."""
        out = np.tile(self.log_base, (len(prefixes), 1))
        if prefixes and self.router is not None:
            out = _log_softmax(self._scores(prefixes) / self.cfg.temperature)
        return _topk_mask(out, self.cfg.k)

    def _segments(self, T: int, known: int) -> list[int]:
        """Route points: segment j uses the prefix doc[:points[j]] and scores the targets from
        points[j] up to the next point. Targets before the first point use every expert with a
        uniform prior, unless there is known context (or no router: the base prior throughout)."""
        if self.router is None:
            return [0]
        r, c = self.cfg.reroute_every, max(known, 0)
        sched, p = [], self.cfg.route_from
        while p < T and (not sched or (r and p < r)):  # route_from, doubling up to r
            sched.append(p)
            p *= 2
        if r:
            sched += [q for q in range(r, T, r) if q > self.cfg.route_from]
        return [c] + [q for q in sched if q > c] if c else sorted(set(sched))

    def routed(self, docs: Sequence[np.ndarray]) -> list[list[int]]:
        """The top-k experts of the prior at each document's last route point (what the mixture
        uses at the end of it, read from the most context); [] for a document never routed."""
        pts = [self._segments(len(d), 0) for d in docs]
        last = [(i, p[-1]) for i, p in enumerate(pts) if p and (self.router is None or p[-1] > 0)]
        out = [[] for _ in docs]
        if last:
            lp = self._log_priors([np.asarray(docs[i][:q]) for i, q in last])
            for (i, _), row in zip(last, lp):
                out[i] = [int(e) for e in np.argsort(-row, kind="stable")[:self.cfg.k]]
        return out

    # ---- scoring

    def _score(self, docs: Sequence[np.ndarray], known=None):
        known = [0] * len(docs) if known is None else list(known)
        segs = [self._segments(len(d), c) for d, c in zip(docs, known)]
        flat = [np.asarray(d[:p]) for d, pts in zip(docs, segs) for p in pts]
        logp_flat = self._log_priors(flat)
        uniform = np.full((1, self.n_experts), -np.log(self.n_experts))
        priors, at = [], 0
        for pts, c in zip(segs, known):
            p = logp_flat[at:at + len(pts)]
            # row 0: targets before the first route point (every expert, uniform); segment j is row j + 1
            priors.append(np.concatenate([p[:1] if (c or self.router is None) else uniform, p]))
            at += len(pts)
        # an expert is scored up to the last target where it has weight (Hedge needs its loss from the start)
        upto = [self._active_until(len(d), pts, pr) for d, pts, pr in zip(docs, segs, priors)]
        lps = [dict() for _ in docs]
        for e in range(self.n_experts):
            who = [i for i, u in enumerate(upto) if u[e] > 0 and len(docs[i]) > 1]
            if not who:
                continue
            if self.passes is not None:
                keys = {i: (e, doc_key(docs[i])) for i in who}
                if need := [i for i in who if keys[i] not in self.passes]:
                    got = window_logprobs(self.load_expert(e), [docs[i] for i in need], self.stride, self.batch_tokens)
                    self.passes.update((keys[i], lp) for i, lp in zip(need, got))
                for i in who:
                    lps[i][e] = self.passes[keys[i]]
                continue
            model = self.load_expert(e)  # one expert resident at a time while scoring
            got = window_logprobs(model, [docs[i] for i in who], self.stride, self.batch_tokens,
                                  upto=[upto[i][e] for i in who])
            for i, lp in zip(who, got):
                lps[i][e] = lp
            del model
        out = [self._combine(len(d), pts, pr, lp) for d, pts, pr, lp in zip(docs, segs, priors, lps)]
        if self.cfg.pool == "log-linear":
            out = self._log_linear(docs, out, lps)
        return out

    @staticmethod
    def _seg_of(T: int, pts) -> np.ndarray:
        """Prior row of each target 1..T-1: 0 before the first route point, j + 1 in segment j."""
        return np.searchsorted(np.asarray(pts), np.arange(1, T), side="right")

    def _active_until(self, T, pts, log_prior_rows) -> np.ndarray:
        """(n_experts,) one past the last target each expert has weight at (0: none)."""
        if T < 2:
            return np.zeros(self.n_experts, np.int64)
        rows = self._seg_of(T, pts)
        finite = np.isfinite(log_prior_rows[rows])                        # (T-1, E)
        last = (T - 1) - np.argmax(finite[::-1], axis=0)                  # last target index + 1, as t
        return np.where(finite.any(0), last + 1, 0)

    def _combine(self, T, pts, log_prior_rows, lp_by_expert):
        """Mixture log-probs (T-1,) and weights (n_experts, T-1) for one document."""
        N = max(T - 1, 0)
        weights = np.zeros((self.n_experts, N))
        if N == 0:
            return np.zeros(0), weights
        experts = sorted(lp_by_expert)
        LP = np.stack([lp_by_expert[e] for e in experts])               # (C, N): log p_e(x_t)
        cum = np.cumsum(-LP, axis=1) - (-LP)                             # L_e(<t), exclusive
        logprior = log_prior_rows[self._seg_of(T, pts)][:, experts].T    # (C, N)
        with np.errstate(invalid="ignore"):  # an expert past its last active target: -inf, not scored (0)
            logw = logprior - self.cfg.eta * cum
        logw = np.where(np.isfinite(logprior), logw, -np.inf)
        logw = logw - np.logaddexp.reduce(logw, axis=0)
        w = np.exp(logw)
        mix = np.logaddexp.reduce(logw + np.where(w > 0, LP, 0.0), axis=0)
        weights[experts] = w
        return mix, weights

    @torch.inference_mode()
    def _log_linear(self, docs, linear, lps):
        """Log-linear pooling: sum_e w_e log p_e(x_t) minus the log normaliser, which one more
        pass over the same windows accumulates from every weighted expert's full distribution."""
        W = [w for _, w in linear]
        norm = [np.zeros(max(len(d) - 1, 0)) for d in docs]
        model0 = self.load_expert(min(e for lp in lps for e in lp) if any(lps) else 0)
        L, dev = model0.cfg.seq_len, device_of(model0)
        stride = self.stride or max(1, L // 2)
        for batch, x in window_batches(docs, L, stride, self.batch_tokens):
            x = x.to(dev)
            wb = np.zeros((self.n_experts, len(batch), x.shape[1] - 1))  # weight of each expert at each target
            for r, (i, s, e, ft) in enumerate(batch):
                wb[:, r, ft - s - 1:e - s - 1] = W[i][:, ft - 1:e - 1]
            acc = None
            for ex in np.flatnonzero(wb.any(axis=(1, 2))):
                logits, _ = self.load_expert(int(ex))(x)
                term = torch.as_tensor(wb[ex], device=dev, dtype=torch.float32)[..., None] * \
                    torch.log_softmax(logits[:, :-1].float(), -1)
                acc = term if acc is None else acc + term
            z = torch.logsumexp(acc, -1).double().cpu().numpy()
            for r, (i, s, e, ft) in enumerate(batch):
                norm[i][ft - 1:e - 1] = z[r, ft - s - 1:e - s - 1]
        out = []
        for (_, w), lp, z in zip(linear, lps, norm):
            tgt = sum(w[e] * lp[e] for e in lp) if lp else np.zeros(len(z))
            out.append((tgt - z, w))
        return out

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
                 seed: int = 0, stop_token: int | None = None, use_cache: bool = True,
                 engine: str = "static") -> list[int]:
        return self.generate_many([prompt], max_new_tokens, temperature, top_p, seed, stop_token, use_cache, engine)[0]

    def generate_many(self, prompts, max_new_tokens: int = 50, temperature: float = 1.0, top_p: float = 1.0,
                      seed: int = 0, stop_token: int | None = None, use_cache: bool = True,
                      engine: str = "static") -> list[list[int]]:
        """generate() for each prompt, every one with the same seed. Prompts routed to the same top-k
        experts are decoded together by the static engine (those k resident, one group after another)."""
        engine = choose_engine(engine, use_cache)
        if not prompts:
            return []
        logp = self._log_priors([np.asarray(p, dtype=np.int64) for p in prompts])
        groups: dict = {}
        for i, row in enumerate(logp):
            groups.setdefault(tuple(np.flatnonzero(np.isfinite(row))), []).append(i)
        out = [None] * len(prompts)
        for active, who in groups.items():
            models = [self.load_expert(int(e)) for e in active]  # k resident
            if engine == "static":
                got = decode.generate(models, [prompts[i] for i in who], logp[np.ix_(who, active)], self.cfg.eta,
                                      self.cfg.pool, max_new_tokens, temperature, top_p, seed, stop_token)
            else:
                got = [generate_reference([Stream(m, use_cache) for m in models], logp[i, list(active)],
                                          self.cfg.eta, prompts[i], max_new_tokens, temperature, top_p, seed,
                                          stop_token, self.cfg.pool)
                       for i in who]
            for i, g in zip(who, got):
                out[i] = g
        return out


def from_models(models: list[GPT], **kw) -> MixtureLM:
    """A mixture over experts already in memory (tests, small runs)."""
    return MixtureLM(models.__getitem__, len(models), **kw)
