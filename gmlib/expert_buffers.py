"""The expert store's flat buffers: how one expert sits in one byte buffer (Layout: its
tensors sorted by key, each at an aligned offset), the put() policy that decides what is
stored (plan), and the buffers of a tier with their reuse under a byte budget (Tier).
Every tier of the store (gmlib.store) and every version file (gmlib.expert_files) holds an
expert this way, so moving it between tiers is one copy of one buffer.

StoreError, the error every part of the store raises, lives here, on the lowest floor."""
import math
import warnings
from collections import OrderedDict
from concurrent.futures import wait as wait_futures
from dataclasses import dataclass

import torch

OPTIM_PREFIX = "optim."
ALIGN = 256                     # byte alignment of each tensor inside a flat buffer

# safetensors dtype names (https://github.com/huggingface/safetensors)
DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
          "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
          "BOOL": torch.bool}
for _st, _attr in [("F8_E4M3", "float8_e4m3fn"), ("F8_E5M2", "float8_e5m2"), ("U16", "uint16"), ("U32", "uint32"),
                   ("U64", "uint64")]:
    if hasattr(torch, _attr):
        DTYPES[_st] = getattr(torch, _attr)
DTYPE_NAMES = {v: k for k, v in DTYPES.items()}


class StoreError(RuntimeError):
    """A store operation that cannot succeed: unknown expert, budget too small, no good copy."""


class Layout:
    """Where each tensor of an expert lives in its flat byte buffer: fields sorted by key, each
    at an offset aligned to ALIGN bytes, so every view has a legal alignment for its dtype."""

    def __init__(self, fields):
        self.fields = tuple((str(k), str(d), tuple(int(s) for s in shape)) for k, d, shape in fields)
        self.spans, pos = [], 0
        for k, d, shape in self.fields:
            if d not in DTYPES:
                raise StoreError(f"tensor {k!r}: unsupported dtype {d}")
            nb = math.prod(shape) * DTYPES[d].itemsize
            self.spans.append((pos, nb))
            pos = -(-(pos + nb) // ALIGN) * ALIGN
        self.total = pos                                  # buffer size
        self.data_bytes = sum(nb for _, nb in self.spans)  # tensor bytes

    def __eq__(self, other):
        return isinstance(other, Layout) and self.fields == other.fields

    def views(self, buf: torch.Tensor) -> dict:
        return {k: buf[o:o + nb].view(DTYPES[d]).view(shape) for (k, d, shape), (o, nb) in zip(self.fields, self.spans)}

    def to_json(self):
        return [[k, d, list(s)] for k, d, s in self.fields]


def fits(capacity: int, nbytes: int) -> bool:
    """Whether a buffer of `capacity` bytes may be reused for `nbytes`: not wasting over half."""
    return nbytes <= capacity <= 2 * nbytes + ALIGN


def plan(tensors: dict, dtype, keep_optimizer: bool, name="?") -> tuple[Layout, dict]:
    """The layout an expert is stored in under the put() policy, and the tensors it keeps.
    `dtype` never touches `optim.*` tensors (see gmlib.store's docstring for why)."""
    keep = {}
    for k, t in tensors.items():
        if not isinstance(k, str) or not isinstance(t, torch.Tensor):
            raise StoreError(f"expert {name!r}: tensors must map str to torch.Tensor, got {k!r}: {type(t).__name__}")
        if keep_optimizer or not k.startswith(OPTIM_PREFIX):
            keep[k] = t.detach()
    keep = dict(sorted(keep.items()))

    def stored(k, t):
        d = dtype if dtype is not None and t.is_floating_point() and not k.startswith(OPTIM_PREFIX) else t.dtype
        if d not in DTYPE_NAMES:
            raise StoreError(f"expert {name!r}: tensor {k!r} has unsupported dtype {d}")
        return DTYPE_NAMES[d]
    return Layout((k, stored(k, t), t.shape) for k, t in keep.items()), keep


def buffer_bytes(tensors: dict, dtype: torch.dtype | None = None, keep_optimizer: bool = True) -> int:
    """Bytes one expert takes in a tier when put with this policy: set budgets in experts."""
    return plan(tensors, dtype, keep_optimizer)[0].total


class Buffer:
    """A flat uint8 buffer of one tier and the work that may still be using it."""

    def __init__(self, data: torch.Tensor, pinned_on: torch.device | None = None):
        self.data, self.pinned_on = data, pinned_on  # pinned_on: registered with cudaHostRegister
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

    def release(self):
        self.wait_all()  # for device memory too: the caching allocator may hand it out at once
        if self.pinned_on is not None:
            with torch.cuda.device(self.pinned_on):
                torch.cuda.cudart().cudaHostUnregister(self.data.data_ptr())
        self.data = None


def host_buffer(nbytes: int, pin_on: torch.device | None = None) -> Buffer:
    """A RAM buffer, pinned for copies to `pin_on` if given. cudaHostRegister pins the exact
    size; pin_memory(), the fallback, rounds every allocation up to a power of two."""
    data = torch.empty(nbytes, dtype=torch.uint8)
    if pin_on is None or nbytes == 0:
        return Buffer(data)
    try:
        with torch.cuda.device(pin_on):
            rc = torch.cuda.cudart().cudaHostRegister(data.data_ptr(), nbytes, 0)
        if int(getattr(rc, "value", rc)) == 0:
            return Buffer(data, pinned_on=pin_on)
    except (AttributeError, RuntimeError, TypeError) as err:
        rc = err
    warnings.warn(f"cudaHostRegister of {nbytes} bytes failed ({rc}); using pin_memory(), which rounds up")
    return Buffer(data.pin_memory())


@dataclass
class Entry:
    """What a tier holds for one expert: its layout, meta and buffer."""
    layout: Layout
    meta: dict
    buf: Buffer
    dirty: bool = False  # RAM: newer than the newest version on disk
    ready: object = None  # GPU tier: the CUDA event after which the data is in place (None: already)


class Tier:
    """An LRU of entries (anything with a .buf) under a byte budget, with a free list of
    buffers kept for reuse: a swap allocates nothing and cannot fragment memory."""

    def __init__(self, name: str, budget: int, new_buffer):
        self.name, self.budget, self._new = name, int(budget), new_buffer
        self.entries = OrderedDict()   # name -> entry, least recently used first
        self.free, self.used = [], 0

    def alloc(self, nbytes: int, evict, protect=(), spare: Buffer | None = None) -> Buffer:
        """A buffer for `nbytes`: a free one that fits, else the free buffer `spare` if it holds
        nbytes however much it wastes and no disk write of it is in flight, else a new one within the
        budget, or one freed by evict(name) of the least recently used entry not in `protect`."""
        if nbytes > self.budget:
            raise StoreError(f"the {self.name} tier's budget of {self.budget} bytes cannot hold an expert "
                             f"of {nbytes} bytes")
        while True:
            fit = [b for b in self.free if fits(b.capacity, nbytes)]
            if fit:  # prefer one that nothing uses any more (a write-back may still be reading one)
                buf = min(fit, key=lambda b: (b.future is not None and not b.future.done(), b.capacity))
                self.free.remove(buf)
                return buf
            # put() of a smaller version (an expert's last segment drops its Adam moments) offers the buffer of
            # the version it replaces: its bytes are counted already, and a new pinned RAM buffer costs a
            # cudaHostRegister (probably most of the 0.13-0.29 s those puts took on the H200 machine,
            # results/bench/offload.json). Not while its disk write is in flight: that can take longer.
            idle = spare is not None and (spare.future is None or spare.future.done())
            if idle and spare in self.free and spare.capacity >= nbytes:
                self.free.remove(spare)
                return spare
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

    def discard(self, name: str):
        """Forget entry `name` (if there is one), keeping its buffer for reuse; returns the entry."""
        e = self.entries.pop(name, None)
        if e is not None:
            self.free.append(e.buf)
        return e

    def adopt(self, name: str, entry):
        """Make `entry`, whose buffer was allocated outside the tier, the entry of `name`."""
        self.used += entry.buf.capacity
        self.entries[name] = entry

    def drop(self, buf: Buffer):
        self.used -= buf.capacity
        buf.release()

    def clear(self):
        for buf in [e.buf for e in self.entries.values()] + self.free:
            self.drop(buf)
        self.entries.clear()
        self.free.clear()
