"""Resumable stages: a stage's output counts as finished only when its marker file exists,
holds the hash of the parameters that produced it, and the size and hash of every output file
it vouches for still match the files on disk. Markers are written atomically and last, so a
killed run leaves either a finished stage or one that is redone on the next run; an output
deleted, emptied or changed since is found on the rerun, which says so and rebuilds the stage.
A later stage puts its inputs' recorded hashes into its own parameter hash (`output_hashes`),
so a rebuilt stage whose output changed rebuilds what depends on it too."""
import hashlib
import json
from contextlib import contextmanager
from dataclasses import asdict, is_dataclass
from pathlib import Path

from gmlib import atomic

VERSION = 3  # bump when a stage's code changes what it writes (3: markers vouch for their outputs)


def params_hash(*parts) -> str:
    """Stable hash of dataclasses / dicts / lists / scalars (JSON with sorted keys)."""
    def plain(x):
        if is_dataclass(x):
            return asdict(x)
        if isinstance(x, Path):
            return str(x)
        if isinstance(x, tuple):
            return list(x)
        return x
    blob = json.dumps([VERSION, *[plain(p) for p in parts]], sort_keys=True, default=plain, ensure_ascii=False)
    return hashlib.sha256(blob.encode("utf-8")).hexdigest()[:16]


def file_record(path) -> dict:
    """Size and SHA-256 (first 16 hex digits) of a file, read in blocks."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(1 << 20):
            h.update(block)
    return {"bytes": Path(path).stat().st_size, "sha256": h.hexdigest()[:16]}


def check_outputs(marker, outputs: dict) -> str | None:
    """None if every recorded output (paths relative to the marker's folder) still has its
    size and hash, else what is wrong with the first one that does not."""
    root = Path(marker).parent
    for rel, rec in outputs.items():
        p = root / rel
        if not p.is_file():
            return f"{p} is missing"
        size = p.stat().st_size
        if size != rec["bytes"]:
            return f"{p} has {size} bytes, {rec['bytes']} when written" + (" (empty)" if size == 0 else "")
        if file_record(p)["sha256"] != rec["sha256"]:
            return f"{p} changed since it was written (hash differs)"
    return None


def done(marker, phash: str, log=print) -> dict | None:
    """The marker's content if the stage finished with these parameters and its outputs are
    intact, else None (and, for damaged outputs, a line through `log` saying it is rebuilt)."""
    marker = Path(marker)
    if not marker.is_file():
        return None
    try:
        meta = json.loads(marker.read_text())
    except (OSError, json.JSONDecodeError, UnicodeDecodeError):
        log(f"{marker}: unreadable stage marker; rebuilding the stage")
        return None
    if not isinstance(meta, dict) or meta.get("params_hash") != phash:
        return None
    if (problem := check_outputs(marker, meta.get("outputs", {}))) is not None:
        log(f"{marker}: {problem}; rebuilding the stage")
        return None
    return meta


def finish(marker, phash: str, meta: dict, outputs=()) -> dict:
    """Record the stage as finished: `meta`, the parameter hash and the size and hash of each
    file in `outputs` (they must be inside the marker's folder or below it)."""
    root = Path(marker).parent
    recs = {Path(p).relative_to(root).as_posix(): file_record(p) for p in outputs}
    meta = {**meta, "params_hash": phash, "outputs": recs}
    atomic.write_json(marker, meta)
    return meta


def output_hashes(meta: dict) -> dict:
    """The recorded output hashes of a finished stage, for a later stage's parameter hash."""
    return {k: v["sha256"] for k, v in meta.get("outputs", {}).items()}


def ordered_map(pool, fn, tasks, depth: int = 4):
    """Yield (task, fn(task)) in task order, with at most `depth` tasks in flight, so a large
    source streams through the workers without being read into memory first. `pool` None:
    run in this process (tests, one core)."""
    from collections import deque
    if pool is None:
        for t in tasks:
            yield t, fn(t)
        return
    inflight = deque()
    for t in tasks:
        inflight.append((t, pool.apply_async(fn, (t,))))
        if len(inflight) >= depth:
            t0, r = inflight.popleft()
            yield t0, r.get()
    while inflight:
        t0, r = inflight.popleft()
        yield t0, r.get()


@contextmanager
def worker_pool(workers: int, initializer=None, initargs=()):
    """A process pool (fork where available: no re-import cost), closed and joined on exit;
    None for workers <= 1, in which case the initializer runs here."""
    import multiprocessing as mp
    if workers <= 1:
        if initializer:
            initializer(*initargs)
        yield None
        return
    ctx = mp.get_context("fork" if "fork" in mp.get_all_start_methods() else "spawn")
    pool = ctx.Pool(workers, initializer=initializer, initargs=initargs)
    try:
        yield pool
    finally:
        pool.close()
        pool.join()
