"""The expert store: every expert's tensors on disk, in (pinned) RAM and on the GPU, each tier
with a byte budget; prefetch that overlaps copying with training; an account of what moved
and how long the caller waited.

An expert is a flat dict[str, Tensor] (gmlib.checkpoint.state_tensors: `model.*` weights,
`optim.*` AdamW state) plus a small JSON-able meta dict. The store knows nothing of training:
the caller decides what to put, what to prefetch and when.

Tiers (least recently used first out):
  disk  root/<name>/v000007.safetensors, one file per version, written atomically by a
        background I/O thread; root/<name>/manifest.json lists the newest `keep_versions`
        versions with size, CRC-32, tensor layout and meta. The manifest is rewritten only
        after the file is complete, so a save killed midway leaves the previous version
        current. A file that is truncated or fails its checksum is reported
        (CorruptExpertWarning, naming the file) and the previous good version is used.
  ram   one flat byte buffer per expert. With a CUDA device it is pinned by cudaHostRegister
        (exact size; pin_memory() rounds every allocation up to a power of two). Evicting an
        expert that changed since it was last saved writes it to disk (write-back).
  dev   the GPU tier: flat slots, kept after eviction and reused, so a swap allocates nothing
        and cannot fragment GPU memory; moving an expert is ONE host<->device copy of its
        buffer. On a CPU device it is a second RAM tier, so the CPU tests run the same code.

get() returns views into the expert's GPU slot and the caller copies them into its own
model and optimizer (checkpoint.load_state_tensors). The alternative, making the model's
parameters *be* the slot, saves that device-to-device copy (about 1 ms for a 124M expert with
its Adam state, against 25 ms over PCIe) but would re-point the parameters of a compiled
model and of the optimizer at every swap; one copy keeps both untouched. put() snapshots the
caller's tensors into a slot on the caller's stream (fast), then copies the slot to RAM on a
side stream, so the caller may overwrite its model with the next expert at once.

Storing experts that are not training (`put(..., dtype=torch.bfloat16, keep_optimizer=False)`):
a parameter costs 2 bytes as bf16 weights only, against 12 as fp32 weights plus Adam's two
moments (16 with the gradient): 30B parameters are 60 GB or 360-480 GB, and the GPU machine has
125 GB of RAM and about 60 GB of free disk. What it costs: (1) the Adam moments restart from
zero when the expert trains again, so resume with a short learning-rate warm-up; (2) the master
weights are rounded to bf16, a relative error of at most 2^-9 per weight. Inference is hardly
affected (bf16 autocast already rounds every matmul weight to bf16; only the embedding lookup
and the norm gains saw fp32), and for training the rounding is smaller than one AdamW step
(lr 6e-4 on weights of size 0.02 is a 3% change). `dtype` never touches `optim.*` tensors:
bf16 second moments underflow and a bf16 step count stops at 256.

Synchronisation rules for the caller: the views get() returns stay valid until the next get()
and until put() of the same name; call prefetch() after copying the current expert into the
model (the side stream first waits for work already queued on the caller's stream). Waiting is
measured on the host: `get_s` is wall time in get(), which is the time the GPU waits for an
expert when the caller synchronises at segment ends.
"""
import copy
import json
import math
import re
import struct
import time
import warnings
import zlib
from collections import OrderedDict
from concurrent.futures import ThreadPoolExecutor
from concurrent.futures import wait as wait_futures
from dataclasses import asdict, dataclass, field
from functools import partial
from pathlib import Path

import torch

from . import atomic

FORMAT = "gm-store-v1"
OPTIM_PREFIX = "optim."
ALIGN = 256                     # byte alignment of each tensor inside a flat buffer
CHUNK = 16 << 20                # disk I/O and checksum granularity
_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,127}")

# safetensors dtype names (https://github.com/huggingface/safetensors)
_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
           "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
           "BOOL": torch.bool}
for _st, _attr in [("F8_E4M3", "float8_e4m3fn"), ("F8_E5M2", "float8_e5m2"), ("U16", "uint16"), ("U32", "uint32"),
                   ("U64", "uint64")]:
    if hasattr(torch, _attr):
        _DTYPES[_st] = getattr(torch, _attr)
_DTYPE_NAMES = {v: k for k, v in _DTYPES.items()}


class StoreError(RuntimeError):
    """A store operation that cannot succeed: unknown expert, budget too small, no good copy."""


class CorruptExpertWarning(UserWarning):
    """A damaged expert file was found and skipped; an older good version was used instead."""


class CorruptFile(Exception):
    def __init__(self, path, problem):
        super().__init__(f"{path}: {problem}")
        self.path = str(path)


@dataclass
class StoreStats:
    """What the store did. Bytes are tensor data bytes (alignment padding not counted)."""
    bytes_to_dev: int = 0       # RAM -> GPU (host-to-device)
    bytes_to_ram: int = 0       # GPU slot or caller -> RAM (device-to-host)
    bytes_snapshot: int = 0     # caller's tensors -> GPU slot in put() (device-to-device)
    bytes_to_disk: int = 0
    bytes_from_disk: int = 0
    copy_s: float = 0.0         # time of RAM<->device copies (CUDA events: the copies' own duration)
    disk_write_s: float = 0.0   # on the I/O thread
    disk_read_s: float = 0.0    # on the I/O thread
    get_s: float = 0.0          # caller's wall time inside get(): waiting for experts
    put_s: float = 0.0          # caller's wall time inside put()
    hits: dict = field(default_factory=lambda: {"dev": 0, "ram": 0, "disk": 0})    # where get() found the expert
    misses: dict = field(default_factory=lambda: {"dev": 0, "ram": 0})
    prefetches: int = 0
    evictions: dict = field(default_factory=lambda: {"dev": 0, "ram": 0})
    allocs: dict = field(default_factory=lambda: {"dev": 0, "ram": 0})  # buffers ever allocated
    corrupt: list = field(default_factory=list)                            # damaged files met

    @property
    def wait_s(self) -> float:
        return self.get_s + self.put_s


class Layout:
    """Where each tensor of an expert lives in its flat byte buffer: fields sorted by key, each
    at an offset aligned to ALIGN bytes, so every view has a legal alignment for its dtype."""

    def __init__(self, fields):
        self.fields = tuple((str(k), str(d), tuple(int(s) for s in shape)) for k, d, shape in fields)
        self.spans, pos = [], 0
        for k, d, shape in self.fields:
            if d not in _DTYPES:
                raise StoreError(f"tensor {k!r}: unsupported dtype {d}")
            nb = math.prod(shape) * _DTYPES[d].itemsize
            self.spans.append((pos, nb))
            pos = -(-(pos + nb) // ALIGN) * ALIGN
        self.total = pos                                  # buffer size
        self.data_bytes = sum(nb for _, nb in self.spans)  # tensor bytes

    def __eq__(self, other):
        return isinstance(other, Layout) and self.fields == other.fields

    def views(self, buf: torch.Tensor) -> dict:
        return {k: buf[o:o + nb].view(_DTYPES[d]).view(shape) for (k, d, shape), (o, nb) in zip(self.fields, self.spans)}

    def to_json(self):
        return [[k, d, list(s)] for k, d, s in self.fields]


class _Buf:
    """A flat uint8 buffer of one tier and the work that may still be using it."""

    def __init__(self, data: torch.Tensor, pinned: bool = False):
        self.data, self.pinned = data, pinned
        self.future = None   # a job on the I/O thread that reads or writes it
        self.event = None    # the CUDA copy into or out of it that was queued last

    @property
    def capacity(self) -> int:
        return self.data.numel()

    def wait_job(self):
        if self.future is not None:
            wait_futures([self.future])

    def wait_all(self):
        self.wait_job()
        if self.event is not None:
            self.event.synchronize()


@dataclass
class _Entry:
    layout: Layout
    meta: dict
    buf: _Buf
    dirty: bool = False  # RAM: newer than the newest version on disk
    ready: object = None  # GPU tier: the CUDA event after which the data is in place (None: already)


class _Tier:
    """An LRU of entries under a byte budget, with a free list of buffers kept for reuse."""

    def __init__(self, name: str, budget: int, new_buffer, release):
        self.name, self.budget, self._new, self._release = name, int(budget), new_buffer, release
        self.entries = OrderedDict()   # name -> _Entry, least recently used first
        self.free, self.used = [], 0

    def alloc(self, nbytes: int, evict, protect=()) -> _Buf:
        if nbytes > self.budget:
            raise StoreError(f"the {self.name} tier's budget of {self.budget} bytes cannot hold an expert of {nbytes} bytes")
        while True:
            fit = [b for b in self.free if nbytes <= b.capacity <= 2 * nbytes + ALIGN]
            if fit:  # prefer one that nothing uses any more (a write-back may still be reading one)
                buf = min(fit, key=lambda b: (b.future is not None and not b.future.done(), b.capacity))
                self.free.remove(buf)
                return buf
            if self.used + nbytes <= self.budget:
                buf = self._new(nbytes)
                self.used += nbytes
                return buf
            if self.free:  # buffers of the wrong size: give their bytes back
                buf = max(self.free, key=lambda b: b.capacity)
                self.free.remove(buf)
                self.drop(buf)
                continue
            victim = next((n for n in self.entries if n not in protect), None)
            if victim is None:
                raise StoreError(f"the {self.name} tier ({self.budget} bytes) has no room for {nbytes} bytes: "
                                 f"its experts {list(self.entries)} are all in use")
            evict(victim)

    def drop(self, buf: _Buf):
        self.used -= buf.capacity
        self._release(buf)


class ExpertStore:
    """ExpertStore(root, ram_bytes, gpu_bytes, device): see the module docstring."""

    def __init__(self, root, ram_bytes: int, gpu_bytes: int, device="cpu", *, pin: bool | None = None,
                 keep_versions: int = 2):
        self.root = Path(root)
        self.root.mkdir(parents=True, exist_ok=True)
        device = torch.device(device)
        self.cuda = device.type == "cuda"
        if self.cuda and not torch.cuda.is_available():
            raise StoreError(f"device {device} requested but CUDA is not available")
        self.device = torch.device("cuda", torch.cuda.current_device()) if self.cuda and device.index is None else device
        self.pin = self.cuda if pin is None else bool(pin) and self.cuda
        self.keep_versions = max(1, int(keep_versions))
        self.ram = _Tier("ram", ram_bytes, self._new_host, self._release_host)
        self.dev = _Tier("gpu" if self.cuda else "device", gpu_bytes, self._new_dev, self._release_dev)
        self.stats = StoreStats()
        self._side = torch.cuda.Stream(self.device) if self.cuda else None
        self._io = ThreadPoolExecutor(max_workers=1, thread_name_prefix="gm-store-io")  # FIFO: order matters
        self._jobs = []      # (future, callback run on the caller's thread when it is done)
        self._writing = {}   # name -> futures of pending disk writes
        self._version = {}   # name -> last version number handed out
        self._bad = set()    # files found damaged
        self._timed = []     # (future or None, start, end) CUDA events of copies not yet folded into copy_s
        self._held = None    # the expert of the last get(): its slot is never evicted

    # ---------------------------------------------------------------- public API
    def names(self) -> list[str]:
        on_disk = {p.parent.name for p in self.root.glob("*/manifest.json")}
        return sorted(on_disk | set(self.ram.entries) | set(self.dev.entries) | set(self._writing))

    def __contains__(self, name) -> bool:
        return name in self.names()

    def resident(self, tier: str) -> list[str]:
        """Names in a tier ("ram" or "dev"), least recently used first."""
        return list({"ram": self.ram, "dev": self.dev}[tier].entries)

    def used_bytes(self, tier: str) -> int:
        return {"ram": self.ram, "dev": self.dev}[tier].used

    def put(self, name: str, tensors: dict, meta: dict | None = None, *, dtype: torch.dtype | None = None,
            keep_optimizer: bool = True, durable: bool = False):
        """Store a new version of expert `name`. `dtype` casts floating-point tensors that are not
        `optim.*`; keep_optimizer=False drops `optim.*`. It goes to RAM (and, when the tensors are
        on the device, a GPU slot); disk follows on eviction, flush(), or now if `durable`."""
        t0 = time.perf_counter()
        _check_name(name)
        meta = _check_meta(name, meta)
        layout, keep = _plan(tensors, dtype, keep_optimizer, name)
        if layout.total > self.ram.budget:
            raise StoreError(f"expert {name!r}: the ram tier's budget of {self.ram.budget} bytes cannot hold "
                             f"its {layout.total} bytes")
        self._poll()
        old_dev, old_ram = self.dev.entries.pop(name, None), self.ram.entries.pop(name, None)
        if old_ram is not None:
            self.ram.free.append(old_ram.buf)  # superseded; a write of it in flight finishes first
        slot = None
        if any(t.device == self.device for t in keep.values()):
            slot = self._slot_for_put(old_dev, layout.total)
        elif old_dev is not None:
            self.dev.free.append(old_dev.buf)
        rbuf = self._ram_alloc(layout.total)
        with torch.no_grad():
            if slot is not None:  # snapshot on the caller's stream, then slot -> RAM on the side stream
                if self.cuda and slot.event is not None:
                    torch.cuda.current_stream(self.device).wait_event(slot.event)
                for v, t in zip(layout.views(slot.data).values(), keep.values()):
                    v.copy_(t)
                self.stats.bytes_snapshot += layout.data_bytes
                self._copy(rbuf, slot, layout, "bytes_to_ram")
                self.dev.entries[name] = _Entry(layout, meta, slot)
            else:  # tensors elsewhere (CPU tensors for a GPU store) or no room on the device: copy directly
                t1 = time.perf_counter()
                for v, t in zip(layout.views(rbuf.data).values(), keep.values()):
                    v.copy_(t)
                self.stats.copy_s += time.perf_counter() - t1
                self.stats.bytes_to_ram += layout.data_bytes
        self.ram.entries[name] = _Entry(layout, meta, rbuf, dirty=True)
        if durable:
            self._write_back(name, self.ram.entries[name])
        self.stats.put_s += time.perf_counter() - t0

    def get(self, name: str) -> tuple[dict, dict]:
        """(tensors on the device, meta) of the newest version. The tensors are views into the
        expert's slot: copy them into your model (see the module docstring for how long they last)."""
        t0 = time.perf_counter()
        _check_name(name)
        self._poll()
        self._held = None  # the previous expert's views expire now
        e = self.dev.entries.get(name)
        if e is not None:
            self.stats.hits["dev"] += 1
            self.dev.entries.move_to_end(name)
        else:
            self.stats.misses["dev"] += 1
            if name in self.ram.entries:
                self.stats.hits["ram"] += 1
            else:
                self.stats.misses["ram"] += 1
                self.stats.hits["disk"] += 1
            e = self._fetch(name, need_dev=True)
        for _ in range(3):
            if e.buf.future is not None:
                e.buf.future.result()  # raises the load's StoreError (no good copy on disk)
            if e.ready is not None:
                e.ready.synchronize()
            self._poll()  # reaps the load: warnings for damaged files, a fallback of another layout
            if self.dev.entries.get(name) is e:
                break
            e = self._fetch(name, need_dev=True)  # an older version of another layout was used
        else:
            raise StoreError(f"expert {name!r}: its copy kept changing while loading")
        self._held = name
        self.stats.get_s += time.perf_counter() - t0
        return e.layout.views(e.buf.data), copy.deepcopy(e.meta)

    def prefetch(self, name: str):
        """Start bringing `name` to the GPU tier without waiting: from RAM, a copy on the side
        stream; from disk, a read on the I/O thread followed by that copy. Without room on the
        GPU tier (its slots in use), the expert is only brought to RAM."""
        _check_name(name)
        self._poll()
        self.stats.prefetches += 1
        if name in self.dev.entries:
            self.dev.entries.move_to_end(name)
            return
        self._fetch(name, need_dev=False)

    def evict(self, name: str):
        """Drop `name` from the GPU and RAM tiers, writing it to disk first if it changed."""
        self._poll()
        d, r = self.dev.entries.pop(name, None), self.ram.entries.pop(name, None)
        if d is not None:
            self.dev.free.append(d.buf)
            self.stats.evictions["dev"] += 1
        if r is not None:
            if r.dirty:
                self._write_back(name, r)
            self.ram.free.append(r.buf)
            self.stats.evictions["ram"] += 1
        if self._held == name:
            self._held = None
        wait_futures(self._writing.get(name, []))
        self._poll()

    def flush(self):
        """Write every changed expert to disk and wait for all background work."""
        self._poll()
        for name, e in self.ram.entries.items():
            if e.dirty:
                self._write_back(name, e)
        wait_futures([f for f, _ in self._jobs])
        if self.cuda:
            self._side.synchronize()
        self._poll()

    def read(self, name: str) -> tuple[dict, dict]:
        """(tensors on the CPU, meta) of the newest good version on disk, bypassing the tiers
        (for export and checks). Damaged versions are skipped with a CorruptExpertWarning."""
        wait_futures(self._writing.get(name, []))
        self._poll()
        problems = []
        for rec in self._records(name):
            layout = Layout(rec["layout"])
            buf = torch.empty(layout.total, dtype=torch.uint8)
            try:
                _read_file(self.root / name / rec["file"], rec, layout, buf)
            except CorruptFile as err:
                problems.append(err)
                continue
            self._report(problems)
            return layout.views(buf), copy.deepcopy(rec["meta"])
        raise StoreError(f"expert {name!r}: no good copy on disk: " + "; ".join(map(str, problems)))

    def verify(self, names=None) -> list[str]:
        """Check every version file on disk (size, header, CRC-32) of `names` (default: all).
        Returns the problems found, each naming its file; an empty list means all is well.
        Experts that changed since their last save are not written first (see flush())."""
        wait_futures([f for fs in self._writing.values() for f in fs])
        self._poll()
        problems = []
        for name in sorted(names) if names is not None else self.names():
            try:
                records = self._records(name)
            except StoreError as err:
                problems.append(str(err))
                continue
            for rec in records:
                try:
                    _read_file(self.root / name / rec["file"], rec, Layout(rec["layout"]), None)
                except CorruptFile as err:
                    problems.append(str(err))
        return problems

    def summary(self) -> dict:
        """The accounting as a plain dict (waits for copies in flight so their time is counted)."""
        if self.cuda:
            self._side.synchronize()
        self._poll()
        out = asdict(self.stats)
        out["wait_s"] = self.stats.wait_s
        out["gb_s"] = (self.stats.bytes_to_dev + self.stats.bytes_to_ram) / self.stats.copy_s / 1e9 if self.stats.copy_s else None
        out["used_bytes"] = {"ram": self.ram.used, "dev": self.dev.used}
        return out

    def close(self, flush: bool = True):
        """Stop the I/O thread and free every buffer (pinned memory unregistered). flush=False
        drops the changes not yet on disk (writes already started still finish)."""
        if flush:
            self.flush()
        else:
            wait_futures([f for f, _ in self._jobs])
        self._io.shutdown(wait=True)
        for tier in (self.dev, self.ram):
            for buf in [e.buf for e in tier.entries.values()] + tier.free:
                tier.drop(buf)
            tier.entries.clear()
            tier.free.clear()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    # ---------------------------------------------------------------- buffers
    def _new_host(self, nbytes) -> _Buf:
        data = torch.empty(nbytes, dtype=torch.uint8)
        self.stats.allocs["ram"] += 1
        if not self.pin or nbytes == 0:
            return _Buf(data)
        try:
            with torch.cuda.device(self.device):
                rc = torch.cuda.cudart().cudaHostRegister(data.data_ptr(), nbytes, 0)
            if int(getattr(rc, "value", rc)) == 0:
                return _Buf(data, pinned=True)
        except (AttributeError, RuntimeError, TypeError) as err:
            rc = err
        warnings.warn(f"cudaHostRegister of {nbytes} bytes failed ({rc}); using pin_memory(), which rounds up")
        return _Buf(data.pin_memory())

    def _release_host(self, buf: _Buf):
        buf.wait_all()
        if buf.pinned:
            with torch.cuda.device(self.device):
                torch.cuda.cudart().cudaHostUnregister(buf.data.data_ptr())
        buf.data = None

    def _new_dev(self, nbytes) -> _Buf:
        self.stats.allocs["dev"] += 1
        return _Buf(torch.empty(nbytes, dtype=torch.uint8, device=self.device))

    def _release_dev(self, buf: _Buf):
        buf.wait_all()  # the caching allocator may hand the memory out at once
        buf.data = None

    def _ram_alloc(self, nbytes) -> _Buf:
        buf = self.ram.alloc(nbytes, self._evict_ram)
        buf.wait_all()  # host code may write it next: nothing may still read or fill it
        buf.future = buf.event = None
        return buf

    def _dev_alloc(self, nbytes) -> _Buf:
        buf = self.dev.alloc(nbytes, self._evict_dev, protect={self._held})
        buf.wait_job()  # CUDA copies still queued on it are ordered by the streams (buf.event)
        buf.future = None
        return buf

    def _slot_for_put(self, old: _Entry | None, nbytes: int) -> _Buf | None:
        if old is not None and nbytes <= old.buf.capacity <= 2 * nbytes + ALIGN:
            old.buf.wait_job()
            old.buf.future = None
            return old.buf
        if old is not None:
            self.dev.free.append(old.buf)
        try:
            return self._dev_alloc(nbytes)
        except StoreError:
            return None  # no room on the device: put() copies straight to RAM

    def _evict_dev(self, name):
        self.dev.free.append(self.dev.entries.pop(name).buf)
        self.stats.evictions["dev"] += 1

    def _evict_ram(self, name):
        e = self.ram.entries.pop(name)
        if e.dirty:
            self._write_back(name, e)
        self.ram.free.append(e.buf)
        self.stats.evictions["ram"] += 1

    # ---------------------------------------------------------------- copies between tiers
    def _copy(self, dst: _Buf, src: _Buf, layout: Layout, counter: str):
        """dst <- src (whole buffers): synchronous on CPU, on the side stream with CUDA."""
        n = layout.total
        if not self.cuda:
            t0 = time.perf_counter()
            dst.data[:n].copy_(src.data[:n])
            self.stats.copy_s += time.perf_counter() - t0
        else:
            # the side stream first waits for what the caller queued: a snapshot into src, or
            # reads of dst's previous contents (the slot being reused)
            self._side.wait_stream(torch.cuda.current_stream(self.device))
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            with torch.cuda.stream(self._side):
                start.record()
                dst.data[:n].copy_(src.data[:n], non_blocking=True)
                end.record()
            dst.event = src.event = end
            self._timed.append((None, start, end))
        setattr(self.stats, counter, getattr(self.stats, counter) + layout.data_bytes)
        return end if self.cuda else None

    def _job_copy(self, dst: _Buf, src: _Buf, layout: Layout, after, events) -> float:
        """On the I/O thread: dst <- src, once the caller's stream has reached event `after`."""
        n = layout.total
        if not self.cuda:
            t0 = time.perf_counter()
            dst.data[:n].copy_(src.data[:n])
            return time.perf_counter() - t0
        start, end = events
        with torch.cuda.device(self.device), torch.cuda.stream(self._side):
            self._side.wait_event(after)
            start.record()
            dst.data[:n].copy_(src.data[:n], non_blocking=True)
            end.record()
        return 0.0

    def _fetch(self, name, need_dev: bool) -> _Entry | None:
        """Make a GPU-tier entry for `name` whose data is on its way (from RAM or disk).
        Without room on the GPU tier: raise if need_dev, else bring it to RAM only (None)."""
        ram = self.ram.entries.get(name)
        if ram is not None and ram.buf.future is not None and not ram.buf.future.done():
            if not need_dev:
                return None  # already on its way to RAM
            wait_futures([ram.buf.future])
            self._poll()  # reaps the read (which may have replaced or dropped the entry)
            return self._fetch(name, need_dev)
        if ram is not None:
            self.ram.entries.move_to_end(name)
            slot = self._try_dev(ram.layout.total, need_dev)
            if slot is None:
                return None
            ready = self._copy(slot, ram.buf, ram.layout, "bytes_to_dev")
            e = self.dev.entries[name] = _Entry(ram.layout, ram.meta, slot, ready=ready)
            return e
        records = self._records(name)
        layout = Layout(records[0]["layout"])
        rbuf = self._ram_alloc(layout.total)
        try:
            slot = self._try_dev(layout.total, need_dev)
        except StoreError:
            self.ram.free.append(rbuf)
            raise
        ram = self.ram.entries[name] = _Entry(layout, copy.deepcopy(records[0]["meta"]), rbuf)
        after = events = None
        if slot is not None and self.cuda:
            # `after` marks what the caller has queued so far (reads of the slot's old contents)
            after = torch.cuda.Event()
            after.record(torch.cuda.current_stream(self.device))
            events = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            slot.event = rbuf.event = events[1]  # the copy reads rbuf until then
        fut = self._io.submit(self._load_job, name, records, rbuf, slot, layout, after, events)
        rbuf.future = fut
        self._jobs.append((fut, partial(self._loaded, name, ram)))
        if slot is None:
            return None
        slot.future = fut
        if events is not None:
            self._timed.append((fut, *events))
        e = self.dev.entries[name] = _Entry(layout, ram.meta, slot, ready=slot.event)
        return e

    def _try_dev(self, nbytes, need: bool) -> _Buf | None:
        try:
            return self._dev_alloc(nbytes)
        except StoreError:
            if need:
                raise
            return None

    # ---------------------------------------------------------------- disk
    def _records(self, name) -> list[dict]:
        wait_futures(self._writing.get(name, []))
        man = self._manifest(name)
        if man is None or not man["versions"]:
            raise StoreError(f"no expert named {name!r} in the store {self.root}")
        return man["versions"]

    def _manifest(self, name) -> dict | None:
        path = self.root / name / "manifest.json"
        if not path.is_file():
            return None
        try:
            man = json.loads(path.read_text())
            if man.get("format") != FORMAT or not isinstance(man.get("versions"), list):
                raise ValueError(f"format {man.get('format')!r}, expected {FORMAT!r}")
        except ValueError as err:
            files = sorted(p.name for p in path.parent.glob("v*.safetensors"))
            raise StoreError(f"{path}: unreadable store manifest ({err}); version files beside it: {files}") from err
        return man

    def _write_back(self, name, e: _Entry):
        if name not in self._version:
            man = self._manifest(name)
            self._version[name] = max((r["version"] for r in man["versions"]), default=0) if man else 0
        self._version[name] += 1
        e.dirty = False
        fut = self._io.submit(self._write_job, name, self._version[name], e.layout, copy.deepcopy(e.meta), e.buf,
                              e.buf.event)
        e.buf.future = fut
        self._writing.setdefault(name, []).append(fut)
        self._jobs.append((fut, partial(self._written, name, e)))

    def _write_job(self, name, version, layout, meta, buf, event):
        """On the I/O thread: the version file (atomically), then the manifest, then old files."""
        if event is not None:
            event.synchronize()  # the device-to-host copy into buf has finished
        folder = self.root / name
        folder.mkdir(parents=True, exist_ok=True)
        for stale in folder.glob(".*.tmp"):  # left by a save that was killed
            stale.unlink(missing_ok=True)
        t0 = time.perf_counter()
        fname = f"v{version:06d}.safetensors"
        with atomic.atomic_path(folder / fname) as tmp:
            size, crc = _write_file(tmp, layout, meta, buf.data)
        rec = {"version": version, "file": fname, "bytes": size, "crc32": crc, "layout": layout.to_json(),
               "meta": meta, "saved_at": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
        man = self._manifest(name) or {"versions": []}
        older = [r for r in man["versions"] if r["version"] != version]
        for r in older:
            if str(folder / r["file"]) in self._bad:  # keep damaged files for inspection, out of the list
                (folder / r["file"]).replace(folder / (r["file"] + ".corrupt"))
        older = [r for r in older if str(folder / r["file"]) not in self._bad]
        keep = [rec] + older[:self.keep_versions - 1]
        atomic.write_json(folder / "manifest.json", {"format": FORMAT, "name": name, "versions": keep})
        for r in older[self.keep_versions - 1:]:
            (folder / r["file"]).unlink(missing_ok=True)
        return {"bytes": layout.data_bytes, "seconds": time.perf_counter() - t0}

    def _load_job(self, name, records, rbuf, slot, layout, after, events):
        """On the I/O thread: the newest good version into rbuf (or a new buffer when an older
        version has another layout), then into the GPU slot."""
        problems = []
        for rec in records:
            lay = Layout(rec["layout"])
            target = rbuf.data if lay == layout else torch.empty(lay.total, dtype=torch.uint8)
            t0 = time.perf_counter()
            try:
                _read_file(self.root / name / rec["file"], rec, lay, target)
            except CorruptFile as err:
                problems.append(err)
                continue
            out = {"rec": rec, "layout": lay, "data": target, "problems": problems,
                   "read_s": time.perf_counter() - t0, "copy_s": 0.0, "copied": False}
            if slot is not None and lay == layout:
                out["copy_s"], out["copied"] = self._job_copy(slot, rbuf, layout, after, events), True
            return out
        raise StoreError(f"expert {name!r}: no good copy on disk: " + "; ".join(map(str, problems)))

    # ---------------------------------------------------------------- completions (caller's thread)
    def _poll(self):
        done = [(f, cb) for f, cb in self._jobs if f.done()]
        self._jobs = [(f, cb) for f, cb in self._jobs if not f.done()]
        keep = []
        for fut, start, end in self._timed:
            if fut is not None and not fut.done():
                keep.append((fut, start, end))
            elif end.query():
                try:
                    self.stats.copy_s += start.elapsed_time(end) / 1000
                except RuntimeError:  # never recorded (its job failed)
                    pass
            else:
                keep.append((fut, start, end))
        self._timed = keep
        errors = []
        for fut, cb in done:
            try:
                cb(fut)
            except StoreError as err:  # run every callback, then report the first failure
                errors.append(err)
        if errors:
            raise errors[0]

    def _report(self, problems):
        for p in problems:
            self._bad.add(p.path)
            self.stats.corrupt.append(p.path)
            warnings.warn(f"{p}; using an older version", CorruptExpertWarning, stacklevel=3)

    def _written(self, name, e: _Entry, fut):
        self._writing[name] = [f for f in self._writing.get(name, []) if f is not fut]
        if not self._writing[name]:
            del self._writing[name]
        if fut.exception() is not None:
            lost = self.ram.entries.get(name) is not e
            if not lost:
                e.dirty = True
            raise StoreError(f"writing expert {name!r} to {self.root / name} failed"
                             f"{' and its RAM copy is gone' if lost else ''}: {fut.exception()}") from fut.exception()
        res = fut.result()
        self.stats.bytes_to_disk += res["bytes"]
        self.stats.disk_write_s += res["seconds"]

    def _loaded(self, name, ram: _Entry, fut):
        dev = self.dev.entries.get(name)
        dev = dev if dev is not None and dev.buf.future is fut else None
        if fut.exception() is not None:  # no good copy: forget the entries; get() raises the error
            if self.ram.entries.get(name) is ram:
                self.ram.free.append(self.ram.entries.pop(name).buf)
            if dev is not None:
                self.dev.free.append(self.dev.entries.pop(name).buf)
            return
        res = fut.result()
        self._report(res["problems"])
        self.stats.bytes_from_disk += res["layout"].data_bytes
        self.stats.disk_read_s += res["read_s"]
        if res["copied"]:
            self.stats.bytes_to_dev += res["layout"].data_bytes
            self.stats.copy_s += res["copy_s"]
        meta = copy.deepcopy(res["rec"]["meta"])
        if res["layout"] == ram.layout:
            ram.meta = meta
            if dev is not None:
                dev.meta = meta
            return
        # an older version with another layout was used: adopt its buffer, redo the GPU copy
        if self.ram.entries.get(name) is ram:
            self.ram.free.append(ram.buf)
            nb = _Buf(res["data"])
            self.ram.used += nb.capacity
            self.ram.entries[name] = _Entry(res["layout"], meta, nb)
        if dev is not None:
            self.dev.free.append(self.dev.entries.pop(name).buf)


def buffer_bytes(tensors: dict, dtype: torch.dtype | None = None, keep_optimizer: bool = True) -> int:
    """Bytes one expert takes in a tier when put with this policy: set budgets in experts."""
    return _plan(tensors, dtype, keep_optimizer)[0].total


def _plan(tensors: dict, dtype, keep_optimizer: bool, name="?") -> tuple[Layout, dict]:
    """The layout an expert is stored in under the put() policy, and the tensors it keeps."""
    keep = {}
    for k, t in tensors.items():
        if not isinstance(k, str) or not isinstance(t, torch.Tensor):
            raise StoreError(f"expert {name!r}: tensors must map str to torch.Tensor, got {k!r}: {type(t).__name__}")
        if keep_optimizer or not k.startswith(OPTIM_PREFIX):
            keep[k] = t.detach()
    keep = dict(sorted(keep.items()))

    def stored(k, t):
        d = dtype if dtype is not None and t.is_floating_point() and not k.startswith(OPTIM_PREFIX) else t.dtype
        if d not in _DTYPE_NAMES:
            raise StoreError(f"expert {name!r}: tensor {k!r} has unsupported dtype {d}")
        return _DTYPE_NAMES[d]
    return Layout((k, stored(k, t), t.shape) for k, t in keep.items()), keep


# -------------------------------------------------------------------- file format
def _check_name(name):
    if not isinstance(name, str) or not _NAME.fullmatch(name):
        raise StoreError(f"bad expert name {name!r}: use 1-128 letters, digits, '_', '.', '-' (not starting with '.')")


def _check_meta(name, meta) -> dict:
    meta = {} if meta is None else meta
    try:
        return json.loads(json.dumps(meta, default=atomic._jsonable))
    except (TypeError, ValueError) as err:
        raise StoreError(f"expert {name!r}: meta must be JSON-serialisable: {err}") from err


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


def _read_file(path, rec: dict, layout: Layout, target: torch.Tensor | None):
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
        raise CorruptFile(path, f"checksum mismatch (CRC-32 {crc:08x}, manifest {rec['crc32']:08x}): the file is corrupted")
