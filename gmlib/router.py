"""Document routing: which expert trains on a document, and how suited each expert is to a prefix.

Three routers behind one interface (`fit`, `scores`, `assign`, `refine`, `save`/`load`):
  local   the gm router. A document becomes a hashed tf-idf vector of its token ids; a
          FlyHash-style random sparse expansion (each of n_units units sums a few random
          input dims) followed by winner-take-all keeps the wta_k most active units as a
          sparse binary code (Dasgupta et al. 2017; FlyVec; BioHash). One prototype per
          expert is learned online by competitive Hebbian learning: the winning prototype
          moves toward the code, w += a (x - w). A homeostatic threshold per expert (each
          expert raises its own bias when it wins less than 1/E of the time and lowers it
          when it wins more; the integral form of DeSieno's conscience) keeps the shares fair.
          No gradients, no loss from the experts: pure numpy.
  random  BTM's weak case: documents dealt to experts by a keyed hash of their tokens.
  kmeans  c-BTM (Gururangan et al. 2023): L2-normalised tf-idf, spherical k-means with a
          balanced (capacity-constrained) assignment step.
Refinement by expert feedback moves each document to the expert with the lowest loss on it
(subject to balance) and the prototypes follow by the same rule. `route_shards` writes the
per-expert shard folders the trainer reads.

Sparse matrices are (indptr, indices, data) numpy triples: scipy is not a dependency and the
few operations needed (row scatter, sparse @ dense via torch) are short to write.
"""
import hashlib
import json
import math
import warnings
from contextlib import ExitStack
from dataclasses import asdict, dataclass, fields
from pathlib import Path

import numpy as np
import torch

from . import atomic
from .data import SHARD_TOKENS, ShardWriter, TokenShards, is_complete


@dataclass
class RouterConfig:
    kind: str = "local"            # local | random | kmeans
    n_experts: int = 8
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
        if self.n_experts < 1:
            raise ValueError(f"n_experts must be >= 1, got {self.n_experts}")
        if not 0 < self.wta_k <= self.n_units:
            raise ValueError(f"wta_k must be in [1, n_units={self.n_units}], got {self.wta_k}")


# ---------------------------------------------------------------- documents and features

def _getter(docs):
    """(n, get(i)) for a TokenShards or any sequence of 1-D token arrays."""
    if isinstance(docs, TokenShards):
        return len(docs), docs.doc
    return len(docs), lambda i: np.asarray(docs[i])


def doc_lengths(docs) -> np.ndarray:
    """Tokens per document (the whole document, not just the part the features read)."""
    if isinstance(docs, TokenShards):
        return (docs.doc_end - docs.doc_start).astype(np.int64)
    return np.array([len(d) for d in docs], np.int64)


def _batches(n, size):
    for s in range(0, n, size):
        yield np.arange(s, min(n, s + size))


_GOLDEN = np.uint64(0x9E3779B97F4A7C15)  # Fibonacci hashing: multiply, keep the top bits


class Features:
    """Hashed tf-idf: token ids (and bigrams) hashed into n_features buckets, sublinear tf,
    idf = log((1 + N) / (1 + df)) fitted on a sample (a bucket present in every document, such
    as bos, gets weight 0), rows L2-normalised."""

    def __init__(self, cfg: RouterConfig):
        if cfg.n_features & (cfg.n_features - 1):
            raise ValueError(f"n_features must be a power of two, got {cfg.n_features}")
        self.cfg, self.bits = cfg, cfg.n_features.bit_length() - 1
        self.idf = np.ones(cfg.n_features, np.float32)

    def _bucket(self, keys):
        with np.errstate(over="ignore"):
            return ((keys + np.uint64(self.cfg.seed)) * _GOLDEN >> np.uint64(64 - self.bits)).astype(np.int64)

    def counts(self, toks):
        """Term counts of a list of token arrays as CSR (indptr, bucket, count)."""
        toks = [np.asarray(t)[:self.cfg.max_tokens].astype(np.uint64) for t in toks]
        lens = np.array([len(t) for t in toks], np.int64)
        rows = np.repeat(np.arange(len(toks)), lens)
        flat = np.concatenate(toks) if toks else np.zeros(0, np.uint64)
        keys = self._bucket(flat)
        if self.cfg.bigrams and len(flat) > 1:
            same = rows[1:] == rows[:-1]  # bigrams never cross documents
            V = np.uint64(self.cfg.vocab_size)
            keys = np.concatenate([keys, self._bucket(V + flat[:-1][same] * V + flat[1:][same])])
            rows = np.concatenate([rows, rows[1:][same]])
        d = self.cfg.n_features
        u, c = np.unique(rows * d + keys, return_counts=True)
        return np.searchsorted(u // d, np.arange(len(toks) + 1)), u % d, c

    def fit(self, toks):
        indptr, j, _ = self.counts(toks)
        df = np.bincount(j, minlength=self.cfg.n_features)
        self.idf = np.log((1 + len(toks)) / (1 + df)).astype(np.float32)
        return self

    def transform(self, toks):
        indptr, j, c = self.counts(toks)
        x = ((1 + np.log(c)) * self.idf[j]).astype(np.float32)
        rows = np.repeat(np.arange(len(indptr) - 1), np.diff(indptr))
        norm = np.sqrt(np.bincount(rows, x.astype(np.float64) ** 2, minlength=len(indptr) - 1))
        return indptr, j, x / np.maximum(norm[rows], 1e-12).astype(np.float32)


def csr_matmul(csr, dense: np.ndarray) -> np.ndarray:
    """(n, d) CSR times dense (d, k) -> dense (n, k), through torch's sparse kernels (no autograd)."""
    indptr, j, x = csr
    with warnings.catch_warnings():  # "sparse CSR support is in beta": the product below is long-standing
        warnings.simplefilter("ignore", UserWarning)
        a = torch.sparse_csr_tensor(torch.from_numpy(np.asarray(indptr, np.int64)), torch.from_numpy(np.asarray(j, np.int64)),
                                    torch.from_numpy(np.asarray(x, np.float32)), size=(len(indptr) - 1, dense.shape[0]))
    with torch.no_grad():
        return (a @ torch.from_numpy(np.ascontiguousarray(dense, np.float32))).numpy()


class FlyHash:
    """Random sparse expansion + winner-take-all: unit u sums the inputs listed in inputs[u]
    (unit_inputs random dims, binary weights); a document's code is its wta_k most active units."""

    def __init__(self, cfg: RouterConfig, inputs=None):
        self.cfg = cfg
        if inputs is None:
            rng = np.random.default_rng([cfg.seed, 1])
            inputs = rng.integers(0, cfg.n_features, size=(cfg.n_units, cfg.unit_inputs), dtype=np.int32)
        self.inputs = inputs
        # the same wiring seen from the inputs: which units each input dim feeds
        flat = inputs.ravel()
        order = np.argsort(flat, kind="stable")
        self.units_of = (order // cfg.unit_inputs).astype(np.int64)
        self.ptr = np.concatenate([[0], np.cumsum(np.bincount(flat, minlength=cfg.n_features))])

    def activations(self, csr):
        indptr, j, x = csr
        n, m = len(indptr) - 1, self.cfg.n_units
        fan = self.ptr[j + 1] - self.ptr[j]
        rows = np.repeat(np.repeat(np.arange(n), np.diff(indptr)), fan)
        starts = np.repeat(self.ptr[j] - np.cumsum(fan) + fan, fan)  # offset of each edge in units_of
        units = self.units_of[starts + np.arange(len(starts))]
        return np.bincount(rows * m + units, np.repeat(x, fan), minlength=n * m).reshape(n, m)

    def codes(self, csr):
        """(n, wta_k) int32 indices of the winning units, sorted. Units fed by the same single
        term tie exactly; a fixed tiny per-unit offset breaks ties the same way everywhere."""
        act = self.activations(csr)
        act += 1e-9 * ((np.arange(self.cfg.n_units) * 0.6180339887498949) % 1.0)
        k = self.cfg.wta_k
        return np.sort(np.argpartition(-act, k - 1, axis=1)[:, :k], axis=1).astype(np.int32)


# ---------------------------------------------------------------- balanced assignment

def balanced_assign(scores: np.ndarray, slack: float = 0.0, weights=None) -> np.ndarray:
    """Each row (document) to one column (expert), high scores first, no column loaded past
    cap = (1 + slack) * total / E, where a row weighs 1 or weights[i] (its tokens). Greedy
    rounds: every unassigned row proposes to its best open column; a column accepts its best
    proposers while its load is below cap (so it overshoots by at most one row) and then
    closes. An approximation of the balanced linear assignment that c-BTM solves; the plain
    argmax when no column overflows; slack=inf is the plain argmax."""
    n, E = scores.shape
    w = np.ones(n) if weights is None else np.asarray(weights, np.float64)
    if w.shape != (n,) or (w < 0).any():
        raise ValueError(f"weights must be {n} non-negative numbers")
    if not slack >= 0:
        raise ValueError(f"slack must be >= 0, got {slack}")
    s = np.array(scores, np.float64)
    if math.isinf(slack):
        return np.argmax(s, axis=1)
    cap = w.sum() / E * (1 + slack)
    # whole documents: exactly ceil(n / E) when slack = 0; weights: a hair over, against rounding
    cap = math.ceil(cap - 1e-9) if weights is None else cap * (1 + 1e-12)
    labels, load = np.full(n, -1, np.int64), np.zeros(E)
    while (free := np.flatnonzero(labels < 0)).size:
        if np.all(s[0] == -np.inf):  # cannot happen with cap * E >= total; never loop forever
            raise RuntimeError("balanced_assign: every expert is full but documents remain")
        best = np.argmax(s[free], axis=1)
        for e in np.unique(best):
            cand = free[best == e]
            cand = cand[np.argsort(-s[cand, e], kind="stable")]
            before = load[e] + np.cumsum(w[cand]) - w[cand]  # load just before each would join
            take = cand[before < cap]
            labels[take] = e
            load[e] += w[take].sum()
            if len(take) < len(cand) or load[e] >= cap:
                s[:, e] = -np.inf
    return labels


def _centred(losses):
    """Per-document centring, so an easy document does not crowd out one that an expert is
    relatively best at when capacity forces a choice."""
    losses = np.asarray(losses, np.float64)
    return -(losses - losses.mean(axis=1, keepdims=True))


# ---------------------------------------------------------------- routers

class Router:
    kind = "?"
    arrays: tuple = ()  # names of the numpy arrays that make up the learned state

    def __init__(self, cfg: RouterConfig):
        self.cfg = cfg
        self.n_experts = cfg.n_experts

    def fit(self, docs):
        return self

    def scores(self, docs) -> np.ndarray:
        """(n_docs, n_experts) float, higher = more suited; the mixture takes softmax(scores / T)."""
        raise NotImplementedError

    def assign(self, docs, slack: float | None = None) -> np.ndarray:
        """(n_docs,) expert per document for training: no expert's load (tokens or documents,
        cfg.balance) passes (1 + slack) / E of the total by more than one document; slack=inf
        gives the router's own argmax."""
        return balanced_assign(self._assign_scores(docs), self.cfg.slack if slack is None else slack, self._weights(docs))

    def _weights(self, docs):
        return doc_lengths(docs) if self.cfg.balance == "tokens" else None

    def _assign_scores(self, docs):
        return self.scores(docs)

    def refine(self, docs, losses: np.ndarray, slack: float | None = None) -> np.ndarray:
        """Move each document to the expert with the lowest loss on it (losses[i, e]: expert e's
        mean loss on doc i; each expert computes only its own column), subject to balance; the
        prototypes follow. Returns the new assignment."""
        n, _ = _getter(docs)
        if np.shape(losses) != (n, self.n_experts):
            raise ValueError(f"losses has shape {np.shape(losses)}, expected {(n, self.n_experts)}")
        new = balanced_assign(_centred(losses), self.cfg.slack if slack is None else slack, self._weights(docs))
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
            router._set_state({k: z[k] for k in router.arrays})
        if router.fingerprint() != meta["fingerprint"]:
            raise ValueError(f"{path}: state.npz does not match router.json (fingerprint differs)")
        return router

    def _set_state(self, st):
        for k, v in st.items():
            setattr(self, k, v)


def _splitmix(z):
    """splitmix64's finaliser: uint64 -> well-mixed uint64."""
    with np.errstate(over="ignore"):
        z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
        return z ^ (z >> np.uint64(31))


class RandomRouter(Router):
    """Each (document, expert) pair gets a pseudo-random score from a keyed hash of the
    document's tokens, then the usual balanced assignment: a random split that is balanced and
    the same on every run. Its `scores` are all zero: a hash says nothing about which expert
    suits a new prefix, so the mixture prior is uniform."""
    kind = "random"

    def scores(self, docs):
        return np.zeros((_getter(docs)[0], self.n_experts), np.float32)

    def _assign_scores(self, docs):
        n, get = _getter(docs)
        key = self.cfg.seed.to_bytes(8, "little", signed=True)
        h = np.array([int.from_bytes(hashlib.blake2b(np.asarray(get(i), np.int64).tobytes(), digest_size=8,
                                                     key=key).digest(), "little") for i in range(n)], np.uint64)
        with np.errstate(over="ignore"):
            z = h[:, None] + np.arange(1, self.n_experts + 1, dtype=np.uint64) * _GOLDEN
        return (_splitmix(z) >> np.uint64(11)).astype(np.float64) / 2.0 ** 53


class KMeansRouter(Router):
    """c-BTM: spherical k-means on L2-normalised tf-idf with balanced assignment; scores are
    cosine similarities to the centres (c-BTM ensembles with softmax(-dist / 0.1))."""
    kind = "kmeans"
    arrays = ("idf", "centres")

    def __init__(self, cfg):
        super().__init__(cfg)
        self.feat = Features(cfg)
        self.centres = np.zeros((cfg.n_experts, cfg.n_features), np.float32)

    idf = property(lambda self: self.feat.idf, lambda self, v: setattr(self.feat, "idf", np.asarray(v, np.float32)))

    def _csr(self, docs, idx):
        _, get = _getter(docs)
        return self.feat.transform([get(i) for i in idx])

    def fit(self, docs):
        n, get = _getter(docs)
        rng = np.random.default_rng([self.cfg.seed, 2])
        perm = rng.permutation(n)
        self.feat.fit([get(i) for i in perm[:self.cfg.idf_docs]])
        idx = np.sort(perm[:self.cfg.fit_docs])  # in corpus order: reads stream through the shards
        X = self._csr(docs, idx)
        E, N, w = self.n_experts, len(idx), self._weights(docs)
        # k-means++ seeding on cosine distance
        first = rng.integers(N)
        C = [_row_dense(X, first, self.cfg.n_features)]
        best = csr_matmul(X, C[0][:, None])[:, 0]
        for _ in range(1, E):
            d2 = np.maximum(1 - best, 0) ** 2
            pick = rng.choice(N, p=d2 / d2.sum()) if d2.sum() > 0 else rng.integers(N)
            C.append(_row_dense(X, pick, self.cfg.n_features))
            best = np.maximum(best, csr_matmul(X, C[-1][:, None])[:, 0])
        self.centres = np.stack(C)
        labels = None
        for _ in range(self.cfg.kmeans_iters):
            new = balanced_assign(csr_matmul(X, self.centres.T), 0.0, None if w is None else w[idx])
            if labels is not None and np.array_equal(new, labels):
                break
            labels = new
            self.centres = _normalise(_cluster_sums(X, labels, E, self.cfg.n_features), self.centres)
        return self

    def scores(self, docs):
        n, _ = _getter(docs)
        return np.concatenate([csr_matmul(self._csr(docs, b), self.centres.T) for b in _batches(n, self.cfg.batch_docs)]
                              or [np.zeros((0, self.n_experts), np.float32)])

    def _follow(self, docs, labels):
        if len(labels) == 0:
            return
        sums = sum(_cluster_sums(self._csr(docs, b), labels[b], self.n_experts, self.cfg.n_features)
                   for b in _batches(len(labels), self.cfg.batch_docs))
        # like the local rule: halfway between the old centre and the new documents' mean direction
        self.centres = _normalise(_normalise(sums, self.centres) + self.centres, self.centres)


def _row_dense(X, i, d):
    indptr, j, x = X
    out = np.zeros(d, np.float32)
    out[j[indptr[i]:indptr[i + 1]]] = x[indptr[i]:indptr[i + 1]]
    return out


def _cluster_sums(X, labels, E, d):
    indptr, j, x = X
    return np.bincount(np.repeat(labels, np.diff(indptr)) * d + j, x, minlength=E * d).reshape(E, d)


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

    idf = KMeansRouter.idf
    inputs = property(lambda self: self.fly.inputs,
                      lambda self, v: setattr(self, "fly", FlyHash(self.cfg, np.asarray(v, np.int32))))

    def codes(self, docs, idx=None):
        n, get = _getter(docs)
        idx = np.arange(n) if idx is None else idx
        out = [self.fly.codes(self.feat.transform([get(i) for i in b])) for b in np.array_split(
            idx, max(1, math.ceil(len(idx) / self.cfg.batch_docs)))]
        return np.concatenate(out) if out else np.zeros((0, self.cfg.wta_k), np.int32)

    def similarity(self, codes):
        """Cosine between each binary code (k ones, normalised) and each prototype: (n, E)."""
        dots = self.protos[:, codes].sum(-1).T / math.sqrt(self.cfg.wta_k)
        return dots / np.maximum(np.linalg.norm(self.protos, axis=1), 1e-12)

    def fit(self, docs):
        n, get = _getter(docs)
        rng = np.random.default_rng([self.cfg.seed, 3])
        perm = rng.permutation(n)
        self.feat.fit([get(i) for i in perm[:self.cfg.idf_docs]])
        idx = np.sort(perm[:self.cfg.fit_docs])  # in corpus order: reads stream through the shards
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
        self.settle(np.concatenate([self.similarity(codes[b]) for b in _batches(len(idx), self.cfg.batch_docs)]), w)
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
        n, _ = _getter(docs)
        out = [self.similarity(self.codes(docs, b)) for b in _batches(n, self.cfg.batch_docs)]
        return np.concatenate(out).astype(np.float32) if out else np.zeros((0, self.n_experts), np.float32)

    def _assign_scores(self, docs):
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


# ---------------------------------------------------------------- per-expert shards

def route_shards(router: Router, shards: TokenShards, out_root, assign: np.ndarray | None = None,
                 ram_tokens: int = 2 ** 27) -> list[Path]:
    """Write each expert's documents to out_root/expert_XXX/ (gmlib.data format, same sources).
    Documents stream from the memory-mapped shards; each writer buffers at most
    ram_tokens / E tokens. A finished routing (route.json, written last) for the same router
    state, source shards and assignment is reused."""
    out_root, E = Path(out_root), router.n_experts
    paths = [out_root / f"expert_{e:03d}" for e in range(E)]
    key = {"router": router.fingerprint(), "n_experts": E, "source": str(Path(shards.root).resolve()),
           "n_docs": shards.n_docs, "n_tokens": shards.n_tokens,
           "assign": None if assign is None else hashlib.sha256(np.asarray(assign, np.int64).tobytes()).hexdigest()[:16]}
    manifest = out_root / "route.json"
    if manifest.is_file() and json.loads(manifest.read_text()).get("key") == key and all(map(is_complete, paths)):
        return paths
    manifest.unlink(missing_ok=True)
    labels = router.assign(shards) if assign is None else np.asarray(assign, np.int64)
    if labels.shape != (shards.n_docs,) or (labels.size and (labels.min() < 0 or labels.max() >= E)):
        raise ValueError(f"{shards.root}: assignment must be {shards.n_docs} expert ids in [0, {E})")
    per = max(2 ** 20, min(SHARD_TOKENS, ram_tokens // E))
    with ExitStack() as stack:
        writers = [stack.enter_context(ShardWriter(p, shards.vocab_size, shards.sources, shard_tokens=per)) for p in paths]
        for i in range(shards.n_docs):
            writers[labels[i]].add(shards.doc(i), int(shards.doc_source[i]), int(shards.doc_nbytes[i]))
    with atomic.atomic_path(out_root / "assign.npy") as tmp:
        with open(tmp, "wb") as f:
            np.save(f, labels)
    atomic.write_json(manifest, {"key": key, "docs": np.bincount(labels, minlength=E).tolist()})
    return paths
