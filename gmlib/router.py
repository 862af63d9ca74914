"""Document routing: which expert trains on a document, and how suited each expert is to a prefix.

Three routers behind one interface (`fit`, `scores`, `assign`, `refine`, `save`/`load`):
  local   the gm router. A document becomes a sparse binary code: hashed tf-idf of its token
          ids, a FlyHash-style random expansion, winner-take-all (gmlib.features). One
          prototype per expert is learned online by competitive Hebbian learning: the winning
          prototype moves toward the code, w += a (x - w). A homeostatic threshold per expert
          (each expert raises its own bias when it wins less than 1/E of the time and lowers it
          when it wins more; the integral form of DeSieno's conscience) keeps the shares fair.
          No gradients, no loss from the experts: pure numpy.
  random  BTM's weak case: documents dealt to experts by a keyed hash of their tokens.
  kmeans  c-BTM (Gururangan et al. 2023): L2-normalised tf-idf, spherical k-means with a
          balanced (capacity-constrained) assignment step.
Refinement by expert feedback moves each document to the expert with the lowest loss on it
(subject to balance) and the prototypes follow by the same rule. The balanced assignment and
`route_shards`, which writes the per-expert shard folders the trainer reads, are in
gmlib.assign; both are re-exported here.
"""
import hashlib
import json
import math
from dataclasses import asdict, dataclass, fields
from pathlib import Path

import numpy as np

from . import atomic
from .assign import balanced_assign, balanced_assign_top, route_shards  # noqa: F401  (route_shards: re-exported, part of this API)
from .features import (Features, FlyHash, csr_group_sums, csr_matmul, csr_row, doc_batches, doc_getter, doc_lengths,
                       hash_uniforms, map_batches)


@dataclass
class RouterConfig:
    kind: str = "local"            # local | random | kmeans
    n_experts: int | None = None   # the gm's (GMConfig.n_experts), set by make_router; None: features only
    vocab_size: int = 32000
    seed: int = 0
    # features: hashed tf-idf of token ids
    n_features: int = 2 ** 13      # hash buckets (a power of two)
    bigrams: bool = False          # also hash token bigrams
    max_tokens: int = 2048         # a document is judged by its first max_tokens tokens
    idf_docs: int = 20000          # documents sampled to fit idf
    fit_docs: int = 50000          # documents sampled to fit prototypes / centroids
    batch_docs: int = 256
    # FlyHash + winner-take-all (local)
    n_units: int = 2 ** 15         # expansion units (m = 4 n_features)
    unit_inputs: int = 4           # inputs each unit samples (so each input feeds ~16 units)
    wta_k: int = 512               # active units kept per document (~ its 32 strongest terms)
    # competitive Hebbian rule (local)
    epochs: int = 3
    min_rounds: int = 500          # at least this many competition rounds (more epochs on small data)
    lr: float = 0.001              # floor of the per-expert rate max(lr, 1 / wins)
    balance_rate: float = 0.01     # homeostatic threshold step per unit of share error
    hebb_batch: int = 64           # winners are picked for this many docs at once
    # balanced k-means (kmeans)
    kmeans_iters: int = 20
    # assignment: each expert takes at most (1 + slack) / E of the documents or tokens
    balance: str = "tokens"        # tokens | docs: what an expert's share counts
    slack: float = 0.05

    def __post_init__(self):
        if self.kind not in ("local", "random", "kmeans"):
            raise ValueError(f"unknown router kind {self.kind!r}; expected local, random or kmeans")
        if self.balance not in ("tokens", "docs"):
            raise ValueError(f"balance must be 'tokens' or 'docs', got {self.balance!r}")
        if self.n_experts is not None and self.n_experts < 1:
            raise ValueError(f"n_experts must be >= 1, got {self.n_experts}")
        if not 0 < self.wta_k <= self.n_units:
            raise ValueError(f"wta_k must be in [1, n_units={self.n_units}], got {self.wta_k}")


# ---------------------------------------------------------------- routers

class Router:
    kind = "?"
    arrays: tuple = ()  # names of the numpy arrays that make up the learned state

    def __init__(self, cfg: RouterConfig):
        if cfg.n_experts is None:
            raise ValueError("RouterConfig.n_experts is unset: a router takes the gm's "
                             "(make_router(kind, n_experts, ...))")
        self.cfg = cfg
        self.n_experts = cfg.n_experts

    def fit(self, docs):
        return self

    def scores(self, docs) -> np.ndarray:
        """(n_docs, n_experts) float, higher = more suited; the mixture takes softmax(scores / T)."""
        raise NotImplementedError

    def assign(self, docs, slack: float | None = None, scores: np.ndarray | None = None) -> np.ndarray:
        """(n_docs,) expert per document for training: no expert's load (tokens or documents,
        cfg.balance) passes (1 + slack) / E of the total by more than one document; slack=inf
        gives the router's own argmax. scores: assign_scores(docs), when already computed (scoring
        a corpus is the slow part; gmlib.routing_cache keeps it)."""
        return balanced_assign(self.assign_scores(docs) if scores is None else scores,
                               self.cfg.slack if slack is None else slack, self._weights(docs))

    def prefix_scores(self, prefixes) -> np.ndarray:
        """(n, n_experts) the score the training documents were assigned by (`assign` with
        slack=inf is its argmax), of the LAST max_tokens tokens of each prefix: the mixture's
        prior at inference, features over a window that moves with the prefix. Up to max_tokens
        tokens this is the training score of the prefix exactly."""
        n, get = doc_getter(prefixes)
        return np.asarray(self.assign_scores([get(i)[-self.cfg.max_tokens:] for i in range(n)]), np.float64)

    def assign_top(self, docs, r: int, slack: float | None = None, scores: np.ndarray | None = None) -> np.ndarray:
        """(n_docs, r): each document to its r best experts, every round balanced like assign()
        (column 0 is assign()); r >= n_experts: every document to every expert. scores: as in assign."""
        if r >= self.n_experts:
            return balanced_assign_top(np.zeros((doc_getter(docs)[0], self.n_experts)), r)
        return balanced_assign_top(self.assign_scores(docs) if scores is None else scores, r,
                                   self.cfg.slack if slack is None else slack, self._weights(docs))

    def _weights(self, docs):
        return doc_lengths(docs) if self.cfg.balance == "tokens" else None

    def assign_scores(self, docs) -> np.ndarray:
        """(n_docs, n_experts) what assign and assign_top balance: scores, plus whatever a router adds
        for training only (the local router's thresholds, the random router's hash)."""
        return self.scores(docs)

    def refine(self, docs, losses: np.ndarray, slack: float | None = None) -> np.ndarray:
        """Move each document to the expert with the lowest loss on it (losses[i, e]: expert e's
        mean loss on doc i; each expert computes only its own column), subject to balance; the
        prototypes follow. Returns the new assignment."""
        n, _ = doc_getter(docs)
        if np.shape(losses) != (n, self.n_experts):
            raise ValueError(f"losses has shape {np.shape(losses)}, expected {(n, self.n_experts)}")
        # centred per document, so an easy document does not crowd out one that an expert is
        # relatively best at when capacity forces a choice
        losses = np.asarray(losses, np.float64)
        new = balanced_assign(losses.mean(axis=1, keepdims=True) - losses, self.cfg.slack if slack is None else slack,
                              self._weights(docs))
        self._follow(docs, new)
        return new

    def _follow(self, docs, labels):
        pass

    # -- persistence
    def state(self) -> dict:
        return {k: getattr(self, k) for k in self.arrays}

    def fingerprint(self) -> str:
        h = hashlib.sha256(json.dumps(asdict(self.cfg), sort_keys=True).encode())
        for k, v in self.state().items():
            h.update(k.encode())
            h.update(np.ascontiguousarray(v).tobytes())
        return h.hexdigest()[:16]

    def save(self, path):
        """A folder with state.npz and router.json (written last: a folder without it is incomplete)."""
        path = Path(path)
        (path / "router.json").unlink(missing_ok=True)  # an overwrite is not complete until the end
        with atomic.atomic_path(path / "state.npz") as tmp:
            with open(tmp, "wb") as f:
                np.savez(f, **self.state())
        atomic.write_json(path / "router.json", {"format": "gm-router-v1", "kind": self.kind,
                                                 "config": asdict(self.cfg), "fingerprint": self.fingerprint()})
        return path

    @staticmethod
    def load(path) -> "Router":
        path = Path(path)
        meta_path = path / "router.json"
        if not meta_path.is_file():
            raise FileNotFoundError(f"{path}: no router.json, so not a saved router (was the save killed?)")
        meta = json.loads(meta_path.read_text())
        if meta.get("format") != "gm-router-v1" or meta.get("kind") not in ROUTERS:
            raise ValueError(f"{meta_path}: unknown router format {meta.get('format')!r} / kind {meta.get('kind')!r}")
        router = ROUTERS[meta["kind"]](RouterConfig(**meta["config"]))
        with np.load(path / "state.npz") as z:
            for k in router.arrays:
                setattr(router, k, z[k])
        if router.fingerprint() != meta["fingerprint"]:
            raise ValueError(f"{path}: state.npz does not match router.json (fingerprint differs)")
        return router


class RandomRouter(Router):
    """Each (document, expert) pair gets a pseudo-random score from a keyed hash of the
    document's tokens, then the usual balanced assignment: a random split that is balanced and
    the same on every run. Its `scores` and `prefix_scores` are all zero: a hash says nothing
    about which expert suits a new prefix, so the mixture prior is uniform (use k = n_experts:
    BTM's posterior-weighted ensemble; a smaller k keeps experts 0..k-1 by the tie rule)."""
    kind = "random"

    def scores(self, docs):
        return np.zeros((doc_getter(docs)[0], self.n_experts), np.float32)

    def assign_scores(self, docs):
        return hash_uniforms(docs, self.cfg.seed, self.n_experts)

    def prefix_scores(self, prefixes):
        """Uniform: BTM's random-split baseline ensembles every expert by its posterior (the
        hash that dealt the training documents carries no information about a new text)."""
        return np.zeros((doc_getter(prefixes)[0], self.n_experts))


# both feature-based routers keep the idf in their Features; as an attribute it is saved and loaded
_idf = property(lambda self: self.feat.idf, lambda self, v: setattr(self.feat, "idf", np.asarray(v, np.float32)))


class KMeansRouter(Router):
    """c-BTM: spherical k-means on L2-normalised tf-idf with balanced assignment; scores are
    cosine similarities to the centres (c-BTM ensembles with softmax(-dist / 0.1))."""
    kind = "kmeans"
    arrays = ("idf", "centres")

    def __init__(self, cfg):
        super().__init__(cfg)
        self.feat = Features(cfg)
        self.centres = np.zeros((cfg.n_experts, cfg.n_features), np.float32)

    idf = _idf

    def fit(self, docs):
        rng = np.random.default_rng([self.cfg.seed, 2])
        idx = self.feat.fit_sample(docs, rng)
        X = self.feat.rows(docs, idx)
        E, N, w = self.n_experts, len(idx), self._weights(docs)
        # k-means++ seeding on cosine distance
        first = rng.integers(N)
        C = [csr_row(X, first, self.cfg.n_features)]
        best = csr_matmul(X, C[0][:, None])[:, 0]
        for _ in range(1, E):
            d2 = np.maximum(1 - best, 0) ** 2
            pick = rng.choice(N, p=d2 / d2.sum()) if d2.sum() > 0 else rng.integers(N)
            C.append(csr_row(X, pick, self.cfg.n_features))
            best = np.maximum(best, csr_matmul(X, C[-1][:, None])[:, 0])
        self.centres = np.stack(C)
        labels = None
        for _ in range(self.cfg.kmeans_iters):
            new = balanced_assign(csr_matmul(X, self.centres.T), 0.0, None if w is None else w[idx])
            if labels is not None and np.array_equal(new, labels):
                break
            labels = new
            self.centres = _normalise(csr_group_sums(X, labels, E, self.cfg.n_features), self.centres)
        return self

    def scores(self, docs):
        n, _ = doc_getter(docs)
        return np.concatenate([csr_matmul(self.feat.rows(docs, b), self.centres.T)
                               for b in doc_batches(n, self.cfg.batch_docs)]
                              or [np.zeros((0, self.n_experts), np.float32)])

    def _follow(self, docs, labels):
        if len(labels) == 0:
            return
        sums = sum(csr_group_sums(self.feat.rows(docs, b), labels[b], self.n_experts, self.cfg.n_features)
                   for b in doc_batches(len(labels), self.cfg.batch_docs))
        # like the local rule: halfway between the old centre and the new documents' mean direction
        self.centres = _normalise(_normalise(sums, self.centres) + self.centres, self.centres)


def _normalise(C, old):
    """Spherical k-means centres: L2-normalised sums; an empty cluster keeps its old centre."""
    norm = np.linalg.norm(C, axis=1, keepdims=True)
    return np.where(norm > 0, C / np.maximum(norm, 1e-12), old).astype(np.float32)


class LocalRouter(Router):
    """FlyHash/WTA codes + prototypes learned by a local competitive rule (see module docstring)."""
    kind = "local"
    arrays = ("idf", "inputs", "protos", "wins", "bias")

    def __init__(self, cfg):
        super().__init__(cfg)
        self.feat, self.fly = Features(cfg), FlyHash(cfg)
        self.protos = np.zeros((cfg.n_experts, cfg.n_units), np.float64)
        self.wins = np.zeros(cfg.n_experts, np.float64)   # documents won so far (sets the rate)
        self.bias = np.zeros(cfg.n_experts, np.float64)   # homeostatic thresholds

    idf = _idf
    inputs = property(lambda self: self.fly.inputs,
                      lambda self, v: setattr(self, "fly", FlyHash(self.cfg, np.asarray(v, np.int32))))

    def codes(self, docs, idx=None):
        idx = np.arange(doc_getter(docs)[0]) if idx is None else idx
        out = map_batches(lambda b: self.fly.codes(self.feat.rows(docs, b)),
                          np.array_split(idx, max(1, math.ceil(len(idx) / self.cfg.batch_docs))))
        return np.concatenate(out) if out else np.zeros((0, self.cfg.wta_k), np.int32)

    def similarity(self, codes):
        """Cosine between each binary code (k ones, normalised) and each prototype: (n, E)."""
        dots = self.protos[:, codes].sum(-1).T / math.sqrt(self.cfg.wta_k)
        return dots / np.maximum(np.linalg.norm(self.protos, axis=1), 1e-12)

    def fit(self, docs):
        rng = np.random.default_rng([self.cfg.seed, 3])
        idx = self.feat.fit_sample(docs, rng)
        codes = self.codes(docs, idx)
        w = self._weights(docs)
        w = np.ones(len(idx)) if w is None else w[idx].astype(np.float64)
        E = self.n_experts
        # each prototype starts as the code of a document (counted as its first win), chosen
        # k-means++ style: far from the codes already chosen, so no two start on one topic
        self.protos[:] = 0
        best = np.full(len(idx), -np.inf)
        for e in range(E):
            d2 = np.maximum(1 - best, 0) ** 2 if e else np.ones(len(idx))
            i = rng.choice(len(idx), p=d2 / d2.sum()) if d2.sum() > 0 else rng.integers(len(idx))
            self.protos[e, codes[i]] = 1 / math.sqrt(self.cfg.wta_k)
            best = np.maximum(best, self.protos[e, codes].sum(1) / math.sqrt(self.cfg.wta_k))
        self.wins[:], self.bias[:] = 1, 0
        B = self.cfg.hebb_batch
        for _ in range(max(self.cfg.epochs, math.ceil(self.cfg.min_rounds / math.ceil(len(idx) / B)))):
            order = rng.permutation(len(idx))
            for s in range(0, len(order), B):
                b = order[s:s + B]
                self.step(codes[b], w[b])
        self.settle(np.concatenate([self.similarity(codes[b]) for b in doc_batches(len(idx), self.cfg.batch_docs)]), w)
        return self

    def settle(self, sims, weights, iters: int = 200):
        """With the prototypes fixed, let the thresholds settle on the whole sample: each expert
        still moves only its own threshold by its own share error, with a shrinking step. The
        online rounds leave the thresholds noisy (a share counted over a few documents of very
        different lengths); this removes that noise."""
        step = sims.std() + 1e-12
        for t in range(iters):
            share = np.bincount(np.argmax(sims + self.bias, axis=1), weights, minlength=self.n_experts)
            self.bias += step * 0.98 ** t * (1 / self.n_experts - share / weights.sum())

    def step(self, codes, weights=None):
        """One round of competition and learning on a few documents: each goes to the argmax of
        similarity + threshold; each expert nudges its own threshold by how far its share of
        this round (of documents, or of their tokens: `weights`) is from 1/E; each winning
        prototype takes the Hebbian update for its documents."""
        winners = np.argmax(self.similarity(codes) + self.bias, axis=1)
        frac = np.bincount(winners, weights, minlength=self.n_experts)
        self.bias += self.cfg.balance_rate * (1 / self.n_experts - frac / max(frac.sum(), 1e-12))
        self.hebb(codes, winners)
        return winners

    def hebb(self, codes, winners):
        """w_e <- (1 - a) w_e + a x for each document won by e, in order, with the rate
        a = max(lr, 1 / wins_e) (a running mean at first, then a slow drift). The updates of
        one expert's documents are composed in closed form:
            w <- prod_t (1 - a_t) w + sum_t a_t prod_{s > t} (1 - a_s) x_t."""
        k = self.cfg.wta_k
        for e in np.unique(winners):
            js = np.flatnonzero(winners == e)
            a = np.maximum(self.cfg.lr, 1 / (self.wins[e] + 1 + np.arange(len(js))))
            keep = np.cumprod((1 - a)[::-1])[::-1]             # keep[t] = prod_{s >= t} (1 - a_s)
            coef = a * np.append(keep[1:], 1.0)
            self.protos[e] *= keep[0]
            self.protos[e] += np.bincount(codes[js].ravel(), np.repeat(coef / math.sqrt(k), k),
                                          minlength=self.cfg.n_units)
            self.wins[e] += len(js)

    def scores(self, docs):
        n, _ = doc_getter(docs)
        out = map_batches(lambda b: self.similarity(self.fly.codes(self.feat.rows(docs, b))),
                          doc_batches(n, self.cfg.batch_docs))
        return np.concatenate(out).astype(np.float32) if out else np.zeros((0, self.n_experts), np.float32)

    def assign_scores(self, docs):
        return self.scores(docs) + self.bias

    def _follow(self, docs, labels):
        """The same Hebbian update, with each document's expert given by the refinement. The
        win counters restart at the number of documents each expert receives, so the old
        prototype counts as much as the new evidence (refinement often sees a small sample):
        each prototype ends halfway between where it was and the mean of its new documents.
        Then the thresholds settle again."""
        order = np.random.default_rng([self.cfg.seed, 4]).permutation(len(labels))
        self.wins[:] = np.maximum(np.bincount(labels, minlength=self.n_experts), 1)
        sims = np.zeros((len(labels), self.n_experts))
        chunks = np.array_split(order, max(1, len(order) // 8192))  # codes of a chunk at a time
        for chunk in chunks:
            codes = self.codes(docs, chunk)
            for s in range(0, len(chunk), self.cfg.hebb_batch):
                self.hebb(codes[s:s + self.cfg.hebb_batch], labels[chunk[s:s + self.cfg.hebb_batch]])
        for chunk in chunks:
            sims[chunk] = self.similarity(self.codes(docs, chunk))
        w = self._weights(docs)
        self.settle(sims, np.ones(len(labels)) if w is None else w.astype(np.float64))


ROUTERS = {"local": LocalRouter, "random": RandomRouter, "kmeans": KMeansRouter}


def make_router(kind: str, n_experts: int, vocab_size: int, **cfg) -> Router:
    known = {f.name for f in fields(RouterConfig)}
    if bad := sorted(set(cfg) - known):
        raise ValueError(f"unknown router settings {bad}; known: {sorted(known)}")
    cfg = RouterConfig(kind=kind, n_experts=n_experts, vocab_size=vocab_size, **cfg)  # validates kind
    return ROUTERS[kind](cfg)


load_router = Router.load

