"""Token shards: the on-disk format every stage reads and writes, and the window sampler.

A shard set is a folder (one per split, e.g. shards/train/) holding
  shard_00000.bin        the tokens of many documents back to back (uint16, or uint32 for vocabularies >= 65536)
  shard_00000.idx.npz    per document: `offsets` (n_docs+1 token offsets), `sources` (source id),
                         `nbytes` (UTF-8 bytes of the document's text, for bits per byte)
  meta.json              the shard list, dtype, vocabulary size, source names, totals
Each document is stored as [bos] + tokens, so a window that crosses a document boundary
sees where the next document starts. The .bin files are memory-mapped: a corpus larger than
RAM streams. Every file is written atomically and meta.json last, so a folder with a
meta.json is complete and a killed writer leaves no half-shard that looks finished.
"""
import json
from pathlib import Path

import numpy as np

from . import atomic

SHARD_TOKENS = 64 * 1024 * 1024  # about 128 MB of uint16 per shard


class ShardWriter:
    """Append documents, get a finished shard folder. Use as a context manager; the folder
    counts as done (meta.json) only if the `with` block exits without an exception."""

    def __init__(self, root, vocab_size: int, sources: list[str], shard_tokens: int = SHARD_TOKENS):
        self.root = Path(root)
        self.root.mkdir(parents=True, exist_ok=True)
        (self.root / "meta.json").unlink(missing_ok=True)  # a rewrite is not complete until closed
        self.vocab_size, self.sources, self.shard_tokens = vocab_size, list(sources), shard_tokens
        self.dtype = np.uint16 if vocab_size < 2**16 else np.uint32
        self.shards, self.n_tokens, self.n_docs, self.n_bytes = [], 0, 0, 0
        self._open()

    def _open(self):
        self._buf, self._offsets, self._sources, self._nbytes, self._len = [], [0], [], [], 0

    def add(self, tokens, source: int = 0, nbytes: int = 0):
        tokens = np.asarray(tokens)
        if tokens.size and (tokens.min() < 0 or tokens.max() >= self.vocab_size):
            raise ValueError(f"{self.root}: token id outside [0, {self.vocab_size})")
        self._buf.append(tokens.astype(self.dtype, copy=False))
        self._len += tokens.size
        self._offsets.append(self._len)
        self._sources.append(source)
        self._nbytes.append(nbytes)
        if self._len >= self.shard_tokens:
            self._flush()

    def _flush(self):
        if len(self._offsets) == 1:
            return
        name = f"shard_{len(self.shards):05d}"
        with atomic.atomic_path(self.root / f"{name}.bin") as tmp:
            np.concatenate(self._buf).tofile(tmp)
        with atomic.atomic_path(self.root / f"{name}.idx.npz") as tmp:
            with open(tmp, "wb") as f:
                np.savez(f, offsets=np.array(self._offsets, np.int64), sources=np.array(self._sources, np.int16),
                         nbytes=np.array(self._nbytes, np.int64))
        self.shards.append({"name": name, "n_tokens": self._len, "n_docs": len(self._sources)})
        self.n_tokens += self._len
        self.n_docs += len(self._sources)
        self.n_bytes += int(sum(self._nbytes))
        self._open()

    def close(self):
        self._flush()
        atomic.write_json(self.root / "meta.json", {
            "format": "gm-shards-v1", "dtype": np.dtype(self.dtype).name, "vocab_size": self.vocab_size,
            "sources": self.sources, "n_tokens": self.n_tokens, "n_docs": self.n_docs, "n_bytes": self.n_bytes,
            "shards": self.shards})

    def __enter__(self):
        return self

    def __exit__(self, exc_type, *_):
        if exc_type is None:
            self.close()


def is_complete(root) -> bool:
    return (Path(root) / "meta.json").is_file()


class TokenShards:
    """Read-only view of a shard folder: documents by global index, or raw token ranges."""

    def __init__(self, root):
        self.root = Path(root)
        meta_path = self.root / "meta.json"
        if not meta_path.is_file():
            raise FileNotFoundError(f"{self.root}: no meta.json, so not a finished shard folder "
                                    "(was the writer killed?)")
        try:
            self.meta = json.loads(meta_path.read_text())
        except (OSError, ValueError) as e:
            raise ValueError(f"{meta_path}: unreadable ({e}); rerun 02_tokenizer to rebuild the shards") from e
        if not isinstance(self.meta, dict) or self.meta.get("format") != "gm-shards-v1":
            raise ValueError(f"{meta_path}: unknown shard format {self.meta.get('format')!r}")
        self.vocab_size, self.sources = self.meta["vocab_size"], self.meta["sources"]
        self.n_tokens, self.n_docs = self.meta["n_tokens"], self.meta["n_docs"]
        dtype = np.dtype(self.meta["dtype"])
        self.tokens, offs, srcs, nbs = [], [], [], []
        for s in self.meta["shards"]:
            path = self.root / f"{s['name']}.bin"
            expect = s["n_tokens"] * dtype.itemsize
            if not path.is_file() or path.stat().st_size != expect:
                raise ValueError(f"{path}: missing or truncated (expected {expect} bytes)")
            self.tokens.append(np.memmap(path, dtype=dtype, mode="r", shape=(s["n_tokens"],)))
            idx_path = self.root / f"{s['name']}.idx.npz"
            try:
                with np.load(idx_path) as idx:
                    offs.append(idx["offsets"])
                    srcs.append(idx["sources"])
                    nbs.append(idx["nbytes"])
            except (OSError, ValueError, EOFError, KeyError) as e:
                raise ValueError(f"{idx_path}: missing or damaged document index ({type(e).__name__}: {e}); "
                                 f"rerun 02_tokenizer to rebuild the shards") from e
        # global document table: (shard, start, end) for every document
        self.doc_shard = (np.concatenate([np.full(len(o) - 1, i, np.int32) for i, o in enumerate(offs)])
                          if offs else np.zeros(0, np.int32))
        self.doc_start = np.concatenate([o[:-1] for o in offs]) if offs else np.zeros(0, np.int64)
        self.doc_end = np.concatenate([o[1:] for o in offs]) if offs else np.zeros(0, np.int64)
        self.doc_source = np.concatenate(srcs) if srcs else np.zeros(0, np.int16)
        self.doc_nbytes = np.concatenate(nbs) if nbs else np.zeros(0, np.int64)

    def __len__(self):
        return self.n_docs

    def doc(self, i: int) -> np.ndarray:
        """Tokens of document i ([bos] + text tokens) as int64."""
        return np.asarray(self.tokens[self.doc_shard[i]][self.doc_start[i]:self.doc_end[i]], dtype=np.int64)

    def iter_docs(self):
        for i in range(self.n_docs):
            yield self.doc(i)


class WindowSampler:
    """Random fixed-length training windows (x, y = x shifted by one), reproducible by step.

    The batch for step k depends only on (seed, k), so a resumed run that restarts at step k
    sees exactly the batches an uninterrupted run would have seen: the sampler's whole state
    is the step counter. Shards are chosen in proportion to their size.

    Data parallelism: batch_size is the global batch; with world_size > 1 each rank reads only
    its rows [rank * b, (rank + 1) * b) of it (b = batch_size / world_size). The ranks' rows
    are disjoint and together exactly the single-process batch, so a data-parallel run sees the
    same windows as a run on one device."""

    def __init__(self, shards: TokenShards, seq_len: int, batch_size: int, seed: int = 0, rank: int = 0,
                 world_size: int = 1):
        if world_size < 1 or not 0 <= rank < world_size or batch_size % world_size:
            raise ValueError(f"WindowSampler: rank {rank} of {world_size} needs a batch_size ({batch_size}) "
                             f"divisible by world_size")
        self.shards, self.seq_len, self.batch_size, self.seed = shards, seq_len, batch_size, seed
        self.rank, self.world_size = rank, world_size
        self.local_batch = batch_size // world_size
        sizes = np.array([len(t) for t in shards.tokens], dtype=np.float64)
        self.usable = np.maximum(sizes - seq_len - 1, 0)
        if self.usable.sum() <= 0:
            raise ValueError(f"{shards.root}: {int(sizes.sum())} tokens, too few for windows of {seq_len + 1}")
        self.p = self.usable / self.usable.sum()

    def batch(self, step: int):
        """Return (x, y) as int64 numpy arrays of shape (local_batch, seq_len): this rank's rows."""
        rng = np.random.default_rng([self.seed, step])
        which = rng.choice(len(self.p), size=self.batch_size, p=self.p)
        starts = (rng.random(self.batch_size) * self.usable[which]).astype(np.int64)
        mine = slice(self.rank * self.local_batch, (self.rank + 1) * self.local_batch)
        which, starts = which[mine], starts[mine]
        buf = np.stack([np.asarray(self.shards.tokens[w][s:s + self.seq_len + 1], dtype=np.int64)
                        for w, s in zip(which, starts)])
        return buf[:, :-1], buf[:, 1:]
