"""The expert store's disk format: one folder per expert,

    root/<name>/v000007.safetensors   one file per version, written atomically
    root/<name>/manifest.json         the newest `keep_versions` versions, newest first, each
                                      with size, CRC-32, tensor layout and meta

The manifest is rewritten only after the version file is complete, so a save killed midway
leaves the previous version current. A file that is missing, truncated or fails its checksum
raises CorruptFile naming it, and read_newest() falls back to the previous good version.
The files are plain safetensors (any safetensors reader opens them); the expert's meta is a
JSON string under the header's `__metadata__`."""
import json
import re
import struct
import time
import zlib
from pathlib import Path

import torch

from . import atomic
from .expert_buffers import Layout, StoreError

FORMAT = "gm-store-v1"
CHUNK = 16 << 20                # disk I/O and checksum granularity
_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,127}")


class CorruptFile(Exception):
    def __init__(self, path, problem):
        super().__init__(f"{path}: {problem}")
        self.path = str(path)


def check_name(name):
    """Names become folder names: no path separators, no hidden folders."""
    if not isinstance(name, str) or not _NAME.fullmatch(name):
        raise StoreError(f"bad expert name {name!r}: use 1-128 letters, digits, '_', '.', '-' (not starting with '.')")


def check_meta(name, meta) -> dict:
    """A JSON round trip of `meta`: the copy that the manifest and the file header will hold."""
    meta = {} if meta is None else meta
    try:
        return json.loads(json.dumps(meta, default=atomic._jsonable))
    except (TypeError, ValueError) as err:
        raise StoreError(f"expert {name!r}: meta must be JSON-serialisable: {err}") from err


def read_manifest(folder: Path) -> dict | None:
    """The expert's manifest, or None if it has none."""
    path = folder / "manifest.json"
    if not path.is_file():
        return None
    try:
        man = json.loads(path.read_text())
        if man.get("format") != FORMAT or not isinstance(man.get("versions"), list):
            raise ValueError(f"format {man.get('format')!r}, expected {FORMAT!r}")
    except ValueError as err:
        files = sorted(p.name for p in folder.glob("v*.safetensors"))
        raise StoreError(f"{path}: unreadable store manifest ({err}); version files beside it: {files}") from err
    return man


def write_version(folder: Path, version: int, layout: Layout, meta: dict, data: torch.Tensor,
                  keep_versions: int, bad=()) -> float:
    """Write `data` (a flat buffer in `layout`) as version `version`: the file atomically, then
    the manifest, then prune the files beyond `keep_versions`. Files whose paths are in `bad`
    (found damaged) leave the manifest and are kept as *.corrupt for inspection. Returns seconds."""
    folder.mkdir(parents=True, exist_ok=True)
    for stale in folder.glob(".*.tmp"):  # left by a save that was killed
        stale.unlink(missing_ok=True)
    t0 = time.perf_counter()
    fname = f"v{version:06d}.safetensors"
    with atomic.atomic_path(folder / fname) as tmp:
        size, crc = _write_file(tmp, layout, meta, data)
    rec = {"version": version, "file": fname, "bytes": size, "crc32": crc, "layout": layout.to_json(),
           "meta": meta, "saved_at": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
    man = read_manifest(folder) or {"versions": []}
    older = [r for r in man["versions"] if r["version"] != version]
    for r in older:
        if str(folder / r["file"]) in bad:
            (folder / r["file"]).replace(folder / (r["file"] + ".corrupt"))
    older = [r for r in older if str(folder / r["file"]) not in bad]
    keep = [rec] + older[:keep_versions - 1]
    atomic.write_json(folder / "manifest.json", {"format": FORMAT, "name": folder.name, "versions": keep})
    for r in older[keep_versions - 1:]:
        (folder / r["file"]).unlink(missing_ok=True)
    return time.perf_counter() - t0


def read_newest(folder: Path, records: list, buffer_for) -> tuple[dict, Layout, torch.Tensor, list]:
    """The newest version among manifest `records` that reads back intact, into the buffer
    buffer_for(layout) returns: (record, layout, buffer, the CorruptFile errors of the newer
    versions skipped). Raises StoreError if none is intact."""
    problems = []
    for rec in records:
        layout = Layout(rec["layout"])
        data = buffer_for(layout)
        try:
            read_file(folder / rec["file"], rec, layout, data)
        except CorruptFile as err:
            problems.append(err)
            continue
        return rec, layout, data, problems
    raise StoreError(f"expert {folder.name!r}: no good copy on disk: " + "; ".join(map(str, problems)))


def check_versions(folder: Path, records: list) -> list[str]:
    """Read every version file in manifest `records` without keeping it: the problems found."""
    problems = []
    for rec in records:
        try:
            read_file(folder / rec["file"], rec, Layout(rec["layout"]), None)
        except CorruptFile as err:
            problems.append(str(err))
    return problems


def _write_file(path, layout: Layout, meta: dict, data: torch.Tensor) -> tuple[int, int]:
    """A safetensors file (tensors back to back, header padded to 8 bytes) written straight
    from the flat buffer; returns (size, CRC-32 of the whole file). Written here rather than by
    safetensors.torch.save_file to avoid a full in-memory copy and a second pass for the checksum."""
    header, pos = {}, 0
    for (k, d, shape), (_, nb) in zip(layout.fields, layout.spans):
        header[k] = {"dtype": d, "shape": list(shape), "data_offsets": [pos, pos + nb]}
        pos += nb
    header["__metadata__"] = {"format": FORMAT, "meta": json.dumps(meta, ensure_ascii=False)}
    hb = json.dumps(header, separators=(",", ":")).encode()
    hb += b" " * (-len(hb) % 8)
    prefix = struct.pack("<Q", len(hb)) + hb
    crc = zlib.crc32(prefix)
    mv = memoryview(data.numpy())
    with open(path, "wb") as f:
        f.write(prefix)
        for off, nb in layout.spans:
            crc = _write_span(f, mv[off:off + nb], crc)
    return len(prefix) + pos, crc


def _write_span(f, mv, crc) -> int:
    for i in range(0, len(mv), CHUNK):
        piece = mv[i:i + CHUNK]
        f.write(piece)
        crc = zlib.crc32(piece, crc)
    return crc


def read_file(path, rec: dict, layout: Layout, target: torch.Tensor | None):
    """Read a version file into `target` (or only check it, if None), verifying its size,
    header and CRC-32 against the manifest record. Raises CorruptFile naming the file."""
    path = Path(path)
    if not path.is_file():
        raise CorruptFile(path, "missing")
    size = path.stat().st_size
    if size != rec["bytes"]:
        raise CorruptFile(path, f"{size} bytes but the manifest says {rec['bytes']} (truncated or half-written)")
    scratch = None if target is not None else bytearray(min(CHUNK, max(nb for _, nb in layout.spans or [(0, 1)])))
    mv = memoryview(target.numpy()) if target is not None else None
    with open(path, "rb") as f:
        (n,) = struct.unpack("<Q", f.read(8))
        if n > size - 8:
            raise CorruptFile(path, f"header length {n} exceeds the file")
        hb = f.read(n)
        crc = zlib.crc32(struct.pack("<Q", n) + hb)
        try:
            header = json.loads(hb)
            pos = 0
            for (k, d, shape), (_, nb) in zip(layout.fields, layout.spans):
                h = header[k]
                if h["dtype"] != d or tuple(h["shape"]) != shape or h["data_offsets"] != [pos, pos + nb]:
                    raise ValueError(f"tensor {k!r} differs from the manifest")
                pos += nb
            if len(header) - ("__metadata__" in header) != len(layout.fields):
                raise ValueError("it holds other tensors than the manifest lists")
        except (ValueError, KeyError, TypeError) as err:
            raise CorruptFile(path, f"bad header ({err})") from err
        for off, nb in layout.spans:
            for i in range(0, nb, CHUNK):
                m = min(CHUNK, nb - i)
                piece = mv[off + i:off + i + m] if mv is not None else memoryview(scratch)[:m]
                if f.readinto(piece) != m:
                    raise CorruptFile(path, "ends early (truncated)")
                crc = zlib.crc32(piece, crc)
    if crc != rec["crc32"]:
        raise CorruptFile(path, f"checksum mismatch (CRC-32 {crc:08x}, manifest {rec['crc32']:08x}): "
                                "the file is corrupted")
