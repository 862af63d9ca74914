"""Resumable stages: a stage's output counts as finished only when its marker file exists and
holds the hash of the parameters that produced it. Markers are written atomically and last,
so a killed run leaves either a finished stage or one that is redone on the next run."""
import hashlib
import json
from contextlib import contextmanager
from dataclasses import asdict, is_dataclass
from pathlib import Path

from gmlib import atomic

VERSION = 2  # bump when a stage's code changes what it writes


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


def done(marker, phash: str) -> dict | None:
    """The marker's content if the stage finished with these parameters, else None."""
    marker = Path(marker)
    if not marker.is_file():
        return None
    try:
        meta = json.loads(marker.read_text())
    except (OSError, json.JSONDecodeError):
        return None
    return meta if meta.get("params_hash") == phash else None


def finish(marker, phash: str, meta: dict) -> dict:
    meta = {**meta, "params_hash": phash}
    atomic.write_json(marker, meta)
    return meta


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
