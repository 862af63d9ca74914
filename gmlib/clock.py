"""Where a trainer's wall time goes, part by part: training, and the time the GPU waits for experts.

A part is timed on the host between two synchronisations of the caller's CUDA stream (not the
whole device: the store's prefetch copies run on a side stream and must go on overlapping), so
the GPU work queued inside a part (a device-to-device load of an expert into the model, the
snapshot of put()) is counted in that part, and work queued before it is not. On a CPU the
synchronisations are no-ops and the parts are plain wall time.

Parts the gm trainer uses (gmlib.gm):
  fetch      store.get() of an expert (waiting until its weights and optimizer state are in the GPU
             tier) and the prefetch call for the next one
  load       the copy of the expert from its GPU slot into the model and optimizer
  writeback  store.put(): the snapshot into a GPU slot and the hand-over to RAM and disk
  sync       waiting for the store's background work (flush before records claim what is on disk)
  init       a new expert's first weights (no store involved: an all-resident run pays it too)
  train      Trainer.run() less its validation
  eval       validation
wait = fetch + load + writeback + sync; the wall time is everything inside segments and syncs, so
`other` (building a Trainer, logging) is wall minus the named parts.
"""
import time
from contextlib import contextmanager

import torch

WAIT = ("fetch", "load", "writeback", "sync")
PARTS = (*WAIT, "init", "train", "eval")


class Clock:
    """Clock(device). begin(**info) ... end() is one segment (a record in `segments`); `with
    clock.part(name):` times a part of it, or of no segment (a flush at a phase end: wall time too)."""

    def __init__(self, device):
        device = torch.device(device)
        self.stream = torch.cuda.current_stream(device) if device.type == "cuda" else None
        self.totals = dict.fromkeys(PARTS, 0.0)
        self.wall = 0.0
        self.segments = []
        self._seg = None

    def _sync(self):
        if self.stream is not None:
            self.stream.synchronize()

    @contextmanager
    def part(self, name: str):
        if name not in self.totals:
            raise ValueError(f"Clock: unknown part {name!r}; choose one of {PARTS}")
        self._sync()
        t0 = time.perf_counter()
        try:
            yield
        finally:
            self._sync()
            dt = time.perf_counter() - t0
            self.add(name, dt)
            if self._seg is None:  # a part outside segments is wall time of its own
                self.wall += dt

    def add(self, name: str, seconds: float):
        """Count `seconds` to part `name` (of the open segment, if any)."""
        self.totals[name] += seconds
        if self._seg is not None:
            self._seg[f"{name}_s"] += seconds

    def move(self, src: str, dst: str, seconds: float):
        """Count `seconds` already in part `src` to `dst` instead (validation inside a training run)."""
        self.add(src, -seconds)
        self.add(dst, seconds)

    def begin(self, **info) -> dict:
        """Open a segment; its record (returned, to add to) holds `info`, each part's seconds, and at
        end() wall_s and wait_s."""
        if self._seg is not None:
            raise RuntimeError("Clock.begin: a segment is open; end() it first")
        self._sync()
        self._t0 = time.perf_counter()
        self._seg = {**info, **{f"{p}_s": 0.0 for p in PARTS}}
        return self._seg

    def end(self):
        self._sync()
        rec, self._seg = self._seg, None
        rec["wall_s"] = time.perf_counter() - self._t0
        rec["wait_s"] = sum(rec[f"{p}_s"] for p in WAIT)
        self.wall += rec["wall_s"]
        self.segments.append(rec)

    def summary(self) -> dict:
        """trainer_wait_s (fetch + load + writeback + sync), trainer_wait_frac (of the wall time), every part's
        total, other_s, and the per-segment records."""
        wait = sum(self.totals[p] for p in WAIT)
        parts = {f"{p}_s": v for p, v in self.totals.items()}
        return {"trainer_wait_s": wait, "trainer_wait_frac": wait / self.wall if self.wall else 0.0,
                "wall_s": self.wall, **parts, "other_s": max(0.0, self.wall - sum(self.totals.values())),
                "segments": list(self.segments)}
