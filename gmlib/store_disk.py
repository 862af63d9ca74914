"""The expert store's disk side: its background I/O thread's jobs (version files written, the newest
good version read, with a fallback to an older one) and their completion on the caller's thread,
and the reads and checks that bypass the tiers. The file format is gmlib.expert_files'; the tiers,
copies and prefetch are gmlib.store's. StoreDisk is ExpertStore's base class: its methods share the
store's state (root, tiers, stats, the I/O thread and its queue of jobs), set up by ExpertStore.
"""
import copy
import time
import warnings
from concurrent.futures import wait as wait_futures
from functools import partial

import torch

from . import expert_files
from .expert_buffers import Buffer, Entry, Layout, StoreError


class CorruptExpertWarning(UserWarning):
    """A damaged expert file was found and skipped; an older good version was used instead."""


class StoreDisk:
    """The disk half of gmlib.store.ExpertStore (see the module docstring)."""

    def read(self, name: str) -> tuple[dict, dict]:
        """(tensors on the CPU, meta) of the newest good version on disk, bypassing the tiers
        (for export and checks). Damaged versions are skipped with a CorruptExpertWarning."""
        wait_futures(self._writing.get(name, []))
        self._poll()
        rec, layout, buf, problems = expert_files.read_newest(self.root / name, self._records(name), layout_buffer)
        self._report(problems)
        return layout.views(buf), copy.deepcopy(rec["meta"])

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
            problems += expert_files.check_versions(self.root / name, records)
        return problems

    # ---------------------------------------------------------------- disk
    def _records(self, name) -> list[dict]:
        wait_futures(self._writing.get(name, []))
        man = expert_files.read_manifest(self.root / name)
        if man is None or not man["versions"]:
            raise StoreError(f"no expert named {name!r} in the store {self.root}")
        return man["versions"]

    def _write_back(self, name, e: Entry):
        if name not in self._version:
            man = expert_files.read_manifest(self.root / name)
            self._version[name] = max((r["version"] for r in man["versions"]), default=0) if man else 0
        self._version[name] += 1
        e.dirty = False
        fut = self._io.submit(self._write_job, name, self._version[name], e.layout, copy.deepcopy(e.meta), e.buf,
                              e.buf.event)
        e.buf.future = fut
        self._writing.setdefault(name, []).append(fut)
        self._jobs.append((fut, partial(self._written, name, e)))

    def _write_job(self, name, version, layout, meta, buf, event) -> float:
        """On the I/O thread: the version file, once the device-to-host copy into buf is done."""
        if event is not None:
            event.synchronize()
        return expert_files.write_version(self.root / name, version, layout, meta, buf.data, self.keep_versions,
                                          bad=self._bad)

    def _load_job(self, name, records, rbuf, slot, layout, after, events):
        """On the I/O thread: the newest good version into rbuf (or a new buffer when an older
        version has another layout), then into the GPU slot."""
        t0 = time.perf_counter()
        rec, lay, data, problems = expert_files.read_newest(
            self.root / name, records, lambda lay: rbuf.data if lay == layout else layout_buffer(lay))
        out = {"rec": rec, "layout": lay, "data": data, "problems": problems,
               "read_s": time.perf_counter() - t0, "copy_s": 0.0, "copied": False}
        if slot is not None and lay == layout:
            out["copy_s"], out["copied"] = self._job_copy(slot, rbuf, layout, after, events), True
        return out

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

    def _written(self, name, e: Entry, fut):
        self._writing[name] = [f for f in self._writing.get(name, []) if f is not fut]
        if not self._writing[name]:
            del self._writing[name]
        if fut.exception() is not None:
            lost = self.ram.entries.get(name) is not e
            if not lost:
                e.dirty = True
            raise StoreError(f"writing expert {name!r} to {self.root / name} failed"
                             f"{' and its RAM copy is gone' if lost else ''}: {fut.exception()}") from fut.exception()
        self.stats.bytes_to_disk += e.layout.data_bytes
        self.stats.disk_write_s += fut.result()

    def _loaded(self, name, ram: Entry, fut):
        dev = self.dev.entries.get(name)
        dev = dev if dev is not None and dev.buf.future is fut else None
        if fut.exception() is not None:  # no good copy: forget the entries; get() raises the error
            if self.ram.entries.get(name) is ram:
                self.ram.discard(name)
            if dev is not None:
                self.dev.discard(name)
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
            self.ram.adopt(name, Entry(res["layout"], meta, Buffer(res["data"])))
        if dev is not None:
            self.dev.discard(name)


def layout_buffer(layout: Layout) -> torch.Tensor:
    return torch.empty(layout.total, dtype=torch.uint8)
