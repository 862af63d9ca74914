"""Atomic file writes: write to a temporary file in the same folder, fsync, then rename.
A reader (or a rerun after a crash) sees either the old file or the new one, never half.
And a lock for a read-modify-write that two processes may do at once (two plans sharing a ledger or a
routing cache on one machine)."""
import fcntl
import json
import os
import re
import tempfile
from contextlib import contextmanager
from pathlib import Path

_UMASK = os.umask(0)
os.umask(_UMASK)  # read the process umask once (os.umask can only be read by setting it)


@contextmanager
def atomic_path(path):
    """Yield a temporary path beside `path` (.<name>.<pid>.<random>.tmp); on success rename it
    over `path`. The writer's pid in the name lets remove_stale tell a killed writer's leftovers
    from a live writer's file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.{os.getpid()}.", suffix=".tmp")
    os.close(fd)
    os.chmod(tmp, 0o666 & ~_UMASK)  # mkstemp makes 0600; give the file the mode open() would
    try:
        yield Path(tmp)
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


@contextmanager
def file_lock(path):
    """Hold an exclusive lock on `path` (created if missing) for the block; another process asking for
    the same lock waits. An advisory flock: the lock goes with the process, so a killed holder frees it."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


_WRITER = re.compile(r"\.(\d+)\.[A-Za-z0-9_]+\.tmp$")


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process: alive
        return True
    return True


def remove_stale(folder, recursive: bool = True) -> list[Path]:
    """Delete the temporary files that atomic_path leaves when its process is killed (SIGKILL,
    power loss: no `except` runs), keeping those of writers still alive (stages that share a
    folder may run at the same time). Returns what it removed."""
    folder = Path(folder)
    if not folder.is_dir():
        return []
    stale = []
    for p in (folder.rglob if recursive else folder.glob)(".*.tmp"):
        m = _WRITER.search(p.name)
        if p.is_file() and not (m and _alive(int(m.group(1)))):
            p.unlink(missing_ok=True)
            stale.append(p)
    return stale


def write_bytes(path, data: bytes):
    with atomic_path(path) as tmp:
        Path(tmp).write_bytes(data)


def write_text(path, text: str):
    write_bytes(path, text.encode("utf-8"))


def write_json(path, obj, indent=2):
    write_text(path, json.dumps(obj, ensure_ascii=False, indent=indent, default=_jsonable) + "\n")


def _jsonable(x):
    # numpy scalars and arrays, Paths: the usual suspects in metrics dicts
    if hasattr(x, "item") and getattr(x, "ndim", 1) == 0:
        return x.item()
    if hasattr(x, "tolist"):
        return x.tolist()
    if isinstance(x, Path):
        return str(x)
    raise TypeError(f"not JSON serialisable: {type(x).__name__}")
