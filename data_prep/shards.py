"""Stage 02b: cleaned JSONL splits -> token shards (gmlib.data format) in work/<data>/shards/.

The main process streams documents, worker processes encode batches with SentencePiece, and
one ShardWriter per split appends [bos] + ids with the document's UTF-8 byte count and source
id, in document order (so the output does not depend on the number of workers). A split is
finished when its ShardWriter wrote meta.json and our marker <split>.done.json holds the hash
of (tokenizer model, cleaned data, shard size); a rerun skips finished splits.
"""
import hashlib
import json
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from gmlib import atomic, checks
from gmlib.data import SHARD_TOKENS, ShardWriter, is_complete
from . import stages, tokenizer
from .split import SPLITS


@dataclass
class ShardConfig:
    workers: int = 2
    batch_bytes: int = 1_000_000
    shard_tokens: int = SHARD_TOKENS

    def __post_init__(self):
        checks.check_types(self, "ShardConfig")
        checks.at_least(self, "ShardConfig", workers=1, batch_bytes=1, shard_tokens=1)


_worker = {}


def _init_worker(model_path):
    _worker["sp"] = tokenizer.load(model_path)


def _encode_batch(texts):
    t0 = time.process_time()
    ids = _worker["sp"].encode(texts)
    return [np.asarray(x, np.int32) for x in ids], time.process_time() - t0


def file_hash(path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()[:16]


def _batches(docs, batch_bytes):
    batch, size = [], 0
    for d in docs:
        batch.append(d)
        size += len(d["text"])
        if size >= batch_bytes:
            yield batch
            batch, size = [], 0
    if batch:
        yield batch


def tokenize_split(clean_dir, split: str, model_path, out_root, cfg: ShardConfig | None = None, pool=None) -> dict:
    """Write out_root/<split>/ from clean_dir/<split>/*.jsonl; return per-source token/byte counts."""
    from .prepare import iter_split
    cfg = cfg or ShardConfig()
    clean_dir, out_root = Path(clean_dir), Path(out_root)
    cmeta = json.loads((clean_dir / "meta.json").read_text())
    inputs = {k: h for k, h in stages.output_hashes(cmeta).items() if k.startswith(f"{split}/")}
    phash = stages.params_hash("shards", split, file_hash(model_path), cmeta["params_hash"], inputs, cfg.shard_tokens)
    marker = out_root / f"{split}.done.json"
    if (meta := stages.done(marker, phash)) is not None and is_complete(out_root / split):
        return meta
    marker.unlink(missing_ok=True)
    if stale := atomic.remove_stale(out_root / split):
        print(f"removed {len(stale)} temporary file(s) left by a killed run, e.g. {stale[0]}")
    if pool is None:
        _init_worker(model_path)
    sp = tokenizer.load(model_path)
    names = cmeta["sources"]
    src_id = {s: i for i, s in enumerate(names)}
    per = {s: {"docs": 0, "bytes": 0, "tokens": 0} for s in names}  # tokens without the [bos]
    cpu, t0 = 0.0, time.time()
    with ShardWriter(out_root / split, vocab_size=sp.get_piece_size(), sources=names,
                     shard_tokens=cfg.shard_tokens) as w:
        tasks = _batches(iter_split(clean_dir, split), cfg.batch_bytes)
        for batch, (ids, c) in stages.ordered_map(pool, _encode_batch_docs, tasks):
            cpu += c
            for d, x in zip(batch, ids):
                nb = len(d["text"].encode("utf-8"))
                w.add(np.concatenate([[sp.bos_id()], x]), source=src_id[d["source"]], nbytes=nb)
                p = per[d["source"]]
                p["docs"] += 1
                p["bytes"] += nb
                p["tokens"] += len(x)
    meta = {"split": split, "n_tokens": w.n_tokens, "n_docs": w.n_docs, "n_bytes": w.n_bytes, "per_source": per,
            "cpu_seconds": round(cpu, 3), "seconds": round(time.time() - t0, 2)}
    files = [f"{sh['name']}{ext}" for sh in w.shards for ext in (".bin", ".idx.npz")] + ["meta.json"]
    return stages.finish(marker, phash, meta, outputs=[out_root / split / f for f in files])


def _encode_batch_docs(batch):
    return _encode_batch([d["text"] for d in batch])


def tokenize_all(clean_dir, model_path, out_root, cfg: ShardConfig | None = None, log=print) -> dict:
    cfg = cfg or ShardConfig()
    out = {}
    with stages.worker_pool(cfg.workers, _init_worker, (str(model_path),)) as pool:
        for split in SPLITS:
            out[split] = tokenize_split(clean_dir, split, model_path, out_root, cfg, pool)
            m = out[split]
            log(f"shards {split:5s}: {m['n_docs']} docs, {m['n_tokens']} tokens, {m['n_bytes'] / 1e6:.2f} MB "
                f"({m['seconds']:.0f} s)")
    return out
