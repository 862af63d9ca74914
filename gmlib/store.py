"""The expert store: every expert's tensors on disk, in (pinned) RAM and on the GPU, each tier
with a byte budget; prefetch that overlaps copying with training; an account of what moved
and how long the caller waited.

An expert is a flat dict[str, Tensor] (gmlib.checkpoint.state_tensors: `model.*` weights,
`optim.*` AdamW state) plus a small JSON-able meta dict, held in every tier as one flat byte
buffer (gmlib.expert_buffers.Layout). The store knows nothing of training: the caller decides what to
put, what to prefetch and when.

Tiers (least recently used first out):
  disk  one safetensors file per version with a manifest (gmlib.expert_files), written and read by
        a background I/O thread (gmlib.store_disk, ExpertStore's base class). A damaged file is
        reported (CorruptExpertWarning, naming the file) and the previous good version is used.
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
import time
from concurrent.futures import ThreadPoolExecutor
from concurrent.futures import wait as wait_futures
from dataclasses import asdict, dataclass, field
from functools import partial
from pathlib import Path

import torch

from .expert_buffers import Buffer, Entry, Layout, StoreError, Tier, host_buffer, plan
from .expert_buffers import buffer_bytes  # noqa: F401  (part of this module's API)
from .expert_files import check_meta, check_name
from .store_disk import CorruptExpertWarning, StoreDisk  # noqa: F401  (CorruptExpertWarning: part of this module's API)


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


class ExpertStore(StoreDisk):
    """ExpertStore(root, ram_bytes, gpu_bytes, device): see the module docstring."""

    def __init__(self, root, ram_bytes: int, gpu_bytes: int, device="cpu", *, pin: bool | None = None,
                 keep_versions: int = 2):
        self.root = Path(root)
        self.root.mkdir(parents=True, exist_ok=True)
        device = torch.device(device)
        self.cuda = device.type == "cuda"
        if self.cuda and not torch.cuda.is_available():
            raise StoreError(f"device {device} requested but CUDA is not available")
        self.device = (torch.device("cuda", torch.cuda.current_device()) if self.cuda and device.index is None
                       else device)
        self.pin = self.cuda if pin is None else bool(pin) and self.cuda
        self.keep_versions = max(1, int(keep_versions))
        self.ram = Tier("ram", ram_bytes, self._new_host)
        self.dev = Tier("gpu" if self.cuda else "device", gpu_bytes, self._new_dev)
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
        check_name(name)
        meta = check_meta(name, meta)
        layout, keep = plan(tensors, dtype, keep_optimizer, name)
        if layout.total > self.ram.budget:
            raise StoreError(f"expert {name!r}: the ram tier's budget of {self.ram.budget} bytes cannot hold "
                             f"its {layout.total} bytes")
        self._poll()
        old_dev = self.dev.entries.pop(name, None)
        old_ram = self.ram.discard(name)  # superseded; a write of it in flight finishes first
        slot = None
        if any(t.device == self.device for t in keep.values()):
            slot = self._slot_for_put(old_dev, layout.total)
        elif old_dev is not None:
            self.dev.free.append(old_dev.buf)
        rbuf = self._ram_alloc(layout.total, spare=old_ram.buf if old_ram is not None else None)
        with torch.no_grad():
            if slot is not None:  # snapshot on the caller's stream, then slot -> RAM on the side stream
                if self.cuda and slot.event is not None:
                    torch.cuda.current_stream(self.device).wait_event(slot.event)
                for v, t in zip(layout.views(slot.data).values(), keep.values()):
                    v.copy_(t)
                self.stats.bytes_snapshot += layout.data_bytes
                self._copy(rbuf, slot, layout, "bytes_to_ram")
                self.dev.entries[name] = Entry(layout, meta, slot)
            else:  # tensors elsewhere (CPU tensors for a GPU store) or no room on the device: copy directly
                t1 = time.perf_counter()
                for v, t in zip(layout.views(rbuf.data).values(), keep.values()):
                    v.copy_(t)
                self.stats.copy_s += time.perf_counter() - t1
                self.stats.bytes_to_ram += layout.data_bytes
        self.ram.entries[name] = Entry(layout, meta, rbuf, dirty=True)
        if durable:
            self._write_back(name, self.ram.entries[name])
        self.stats.put_s += time.perf_counter() - t0

    def get(self, name: str) -> tuple[dict, dict]:
        """(tensors on the device, meta) of the newest version. The tensors are views into the
        expert's slot: copy them into your model (see the module docstring for how long they last)."""
        t0 = time.perf_counter()
        check_name(name)
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
        check_name(name)
        self._poll()
        self.stats.prefetches += 1
        if name in self.dev.entries:
            self.dev.entries.move_to_end(name)
            return
        self._fetch(name, need_dev=False)

    def evict(self, name: str):
        """Drop `name` from the GPU and RAM tiers, writing it to disk first if it changed."""
        self._poll()
        if name in self.dev.entries:
            self._evict_dev(name)
        if name in self.ram.entries:
            self._evict_ram(name)
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

    def summary(self) -> dict:
        """The accounting as a plain dict (waits for copies in flight so their time is counted)."""
        if self.cuda:
            self._side.synchronize()
        self._poll()
        out = asdict(self.stats)
        out["wait_s"] = self.stats.wait_s
        out["gb_s"] = ((self.stats.bytes_to_dev + self.stats.bytes_to_ram) / self.stats.copy_s / 1e9
                       if self.stats.copy_s else None)
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
        self.dev.clear()
        self.ram.clear()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    # ---------------------------------------------------------------- buffers
    def _new_host(self, nbytes) -> Buffer:
        self.stats.allocs["ram"] += 1
        return host_buffer(nbytes, self.device if self.pin else None)

    def _new_dev(self, nbytes) -> Buffer:
        self.stats.allocs["dev"] += 1
        return Buffer(torch.empty(nbytes, dtype=torch.uint8, device=self.device))

    def _ram_alloc(self, nbytes, spare: Buffer | None = None) -> Buffer:
        buf = self.ram.alloc(nbytes, self._evict_ram, spare=spare)
        buf.wait_all()  # host code may write it next: nothing may still read or fill it
        buf.future = buf.event = None
        return buf

    def _dev_alloc(self, nbytes) -> Buffer:
        buf = self.dev.alloc(nbytes, self._evict_dev, protect={self._held})
        buf.wait_job()  # CUDA copies still queued on it are ordered by the streams (buf.event)
        buf.future = None
        return buf

    def _slot_for_put(self, old: Entry | None, nbytes: int) -> Buffer | None:
        # the slot of the version being replaced, even when it is bigger than fits() allows (the last
        # segment's weights-only version): its bytes are counted already, a new slot would add to them
        if old is not None and old.buf.capacity >= nbytes:
            old.buf.wait_job()
            old.buf.future = None
            return old.buf
        if old is not None:
            self.dev.free.append(old.buf)
        return self._try_dev(nbytes, need=False)  # None: no room on the device, put() copies straight to RAM

    def _evict_dev(self, name):
        self.dev.discard(name)
        self.stats.evictions["dev"] += 1

    def _evict_ram(self, name):
        e = self.ram.discard(name)
        if e.dirty:
            self._write_back(name, e)
        self.stats.evictions["ram"] += 1

    # ---------------------------------------------------------------- copies between tiers
    def _copy(self, dst: Buffer, src: Buffer, layout: Layout, counter: str):
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

    def _job_copy(self, dst: Buffer, src: Buffer, layout: Layout, after, events) -> float:
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

    def _fetch(self, name, need_dev: bool) -> Entry | None:
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
            e = self.dev.entries[name] = Entry(ram.layout, ram.meta, slot, ready=ready)
            return e
        records = self._records(name)
        layout = Layout(records[0]["layout"])
        rbuf = self._ram_alloc(layout.total)
        try:
            slot = self._try_dev(layout.total, need_dev)
        except StoreError:
            self.ram.free.append(rbuf)
            raise
        ram = self.ram.entries[name] = Entry(layout, copy.deepcopy(records[0]["meta"]), rbuf)
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
        e = self.dev.entries[name] = Entry(layout, ram.meta, slot, ready=slot.event)
        return e

    def _try_dev(self, nbytes, need: bool) -> Buffer | None:
        try:
            return self._dev_alloc(nbytes)
        except StoreError:
            if need:
                raise
            return None
