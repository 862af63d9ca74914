"""How a router sees a document: hashed tf-idf of its token ids, and FlyHash/WTA codes of that.

  Features  token ids (and optionally bigrams) hashed into n_features buckets, sublinear tf
            times an idf fitted on a sample, rows L2-normalised. The kmeans router clusters
            these vectors directly.
  FlyHash   a random sparse expansion (each of n_units units sums a few random input dims)
            followed by winner-take-all, which keeps the wta_k most active units as a sparse
            binary code (Dasgupta et al. 2017; FlyVec; BioHash). The local router's input.

Documents are a TokenShards or any sequence of 1-D token arrays. Sparse matrices are
(indptr, indices, data) numpy triples: scipy is not a dependency and the few operations needed
(row scatter, sparse @ dense via torch) are short to write. Settings come from a
gmlib.router.RouterConfig. The random router sees only a keyed hash of the tokens
(`hash_uniforms`).
"""
import hashlib
import os
import warnings
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import torch

from .data import TokenShards


def doc_getter(docs):
    """(n, get(i)) for a TokenShards or any sequence of 1-D token arrays."""
    if isinstance(docs, TokenShards):
        return len(docs), docs.doc
    return len(docs), lambda i: np.asarray(docs[i])


def doc_lengths(docs) -> np.ndarray:
    """Tokens per document (the whole document, not just the part the features read)."""
    if isinstance(docs, TokenShards):
        return (docs.doc_end - docs.doc_start).astype(np.int64)
    return np.array([len(d) for d in docs], np.int64)


def doc_batches(n, size):
    for s in range(0, n, size):
        yield np.arange(s, min(n, s + size))


def map_batches(fn, batches) -> list:
    """[fn(b) for b in batches], in order, on up to 8 threads. Each batch is independent and numpy's
    heavy parts (bincount, argpartition, sort) release the GIL, so this is the loop's result a few times
    faster: scoring the 197k training documents with the local router is minutes of one core."""
    workers = min(8, os.cpu_count() or 1)
    if workers == 1:
        return [fn(b) for b in batches]
    with ThreadPoolExecutor(workers) as pool:
        return list(pool.map(fn, batches))


_GOLDEN = np.uint64(0x9E3779B97F4A7C15)  # Fibonacci hashing: multiply, keep the top bits


class Features:
    """Hashed tf-idf: token ids (and bigrams) hashed into n_features buckets, sublinear tf,
    idf = log((1 + N) / (1 + df)) fitted on a sample (a bucket present in every document, such
    as bos, gets weight 0), rows L2-normalised."""

    def __init__(self, cfg):
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

    def fit_sample(self, docs, rng) -> np.ndarray:
        """Fit idf on cfg.idf_docs random documents and return the indices of cfg.fit_docs
        random documents (from the same permutation) for the router to fit on."""
        n, get = doc_getter(docs)
        perm = rng.permutation(n)
        self.fit([get(i) for i in perm[:self.cfg.idf_docs]])
        return np.sort(perm[:self.cfg.fit_docs])  # in corpus order: reads stream through the shards

    def rows(self, docs, idx):
        """tf-idf rows (CSR) of documents idx of docs."""
        _, get = doc_getter(docs)
        return self.transform([get(i) for i in idx])

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
        a = torch.sparse_csr_tensor(torch.from_numpy(np.asarray(indptr, np.int64)),
                                    torch.from_numpy(np.asarray(j, np.int64)),
                                    torch.from_numpy(np.asarray(x, np.float32)), size=(len(indptr) - 1, dense.shape[0]))
    with torch.no_grad():
        return (a @ torch.from_numpy(np.ascontiguousarray(dense, np.float32))).numpy()


def csr_row(X, i, d) -> np.ndarray:
    """Row i of CSR X as a dense (d,) vector."""
    indptr, j, x = X
    out = np.zeros(d, np.float32)
    out[j[indptr[i]:indptr[i + 1]]] = x[indptr[i]:indptr[i + 1]]
    return out


def csr_group_sums(X, labels, E, d) -> np.ndarray:
    """(E, d) sums of the rows of CSR X with each label."""
    indptr, j, x = X
    return np.bincount(np.repeat(labels, np.diff(indptr)) * d + j, x, minlength=E * d).reshape(E, d)


def _splitmix(z):
    """splitmix64's finaliser: uint64 -> well-mixed uint64."""
    with np.errstate(over="ignore"):
        z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
        return z ^ (z >> np.uint64(31))


def hash_uniforms(docs, seed: int, k: int) -> np.ndarray:
    """(n_docs, k) float64 in [0, 1) from a keyed hash of each document's tokens: the same for
    the same tokens and seed on every run, and unrelated to what the document is about."""
    n, get = doc_getter(docs)
    key = seed.to_bytes(8, "little", signed=True)
    h = np.array([int.from_bytes(hashlib.blake2b(np.asarray(get(i), np.int64).tobytes(), digest_size=8,
                                                 key=key).digest(), "little") for i in range(n)], np.uint64)
    with np.errstate(over="ignore"):
        z = h[:, None] + np.arange(1, k + 1, dtype=np.uint64) * _GOLDEN
    return (_splitmix(z) >> np.uint64(11)).astype(np.float64) / 2.0 ** 53


class FlyHash:
    """Random sparse expansion + winner-take-all: unit u sums the inputs listed in inputs[u]
    (unit_inputs random dims, binary weights); a document's code is its wta_k most active units."""

    def __init__(self, cfg, inputs=None):
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
