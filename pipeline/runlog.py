"""The record of one notebook stage inside results/<run_name>/.

Every stage saves its parameters as `<stage>.params.yaml`, merges its metrics into the
run's `metrics.json` (with git commit, device and seconds under `stages.<stage>`), and
saves figures as PNG and tables as CSV plus a Markdown copy. Several stages (01, 02, ...)
may share one run folder, e.g. results/demo/; a stage that trains one of several models of
a run carries a tag (the model's name): `03_train_dense.<tag>.params.yaml`. Stages may run
at the same time (one per GPU), so metrics.json is updated under a file lock."""
import fcntl
import json
import os
import platform
import subprocess
import time
from pathlib import Path

import yaml

from gmlib import atomic
from gmlib.paths import REPO_ROOT, results_dir


def git_commit() -> str:
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=REPO_ROOT, capture_output=True, text=True, timeout=10)
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=REPO_ROOT,
                               capture_output=True, text=True, timeout=10).stdout.strip()
        return out.stdout.strip() + ("-dirty" if dirty else "") if out.returncode == 0 else "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def device_name() -> str:
    """The device this process computes on; on a machine of several GPUs (GM_MACHINE_GPUS, set by
    the plan runner, pipeline.plan), also the machine, e.g. "NVIDIA H200 (8-GPU machine)"."""
    import torch
    if torch.cuda.is_available():
        n = int(os.environ.get("GM_MACHINE_GPUS") or torch.cuda.device_count())
        return torch.cuda.get_device_name(0) + (f" ({n}-GPU machine)" if n > 1 else "")
    return f"cpu ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)"


class RunLog:
    def __init__(self, run_name: str, stage: str, tag: str | None = None):
        self.run_name, self.stage = run_name, f"{stage}.{tag}" if tag else stage
        self.dir = results_dir(run_name)
        atomic.remove_stale(self.dir, recursive=False)  # a killed stage's half-written record files
        self.t0 = time.time()

    def save_params(self, params: dict):
        atomic.write_text(self.dir / f"{self.stage}.params.yaml",
                          yaml.safe_dump(params, allow_unicode=True, sort_keys=False))

    def save_metrics(self, metrics: dict, nested: tuple = ()) -> dict:
        """Merge `metrics` into metrics.json and stamp the stage. Top-level keys are replaced,
        except those in `nested`, whose entries are merged one level down (e.g. "gm", which
        holds one entry per gm of the run). Read, merge and write happen under a lock."""
        path = self.dir / "metrics.json"
        stamp = {"git_commit": git_commit(), "device": device_name(), "seconds": round(time.time() - self.t0, 2),
                 "finished_at": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
        with open(self.dir / ".metrics.lock", "w") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            try:
                merged = json.loads(path.read_text()) if path.exists() else {}
            except json.JSONDecodeError as e:
                raise ValueError(f"{path}: not valid JSON ({e}); fix or remove it") from None
            for k, v in metrics.items():
                merged[k] = {**merged.get(k, {}), **v} if k in nested else v
            merged.setdefault("stages", {})[self.stage] = stamp
            atomic.write_json(path, merged)
        return merged

    def savefig(self, fig, name: str) -> Path:
        path = self.dir / f"{name}.png"
        with atomic.atomic_path(path) as tmp:
            fig.savefig(tmp, format="png", dpi=120, bbox_inches="tight")
        return path

    def save_table(self, df, name: str, floatfmt=".4g") -> Path:
        """CSV (machine-readable) plus a Markdown copy (for the README)."""
        atomic.write_text(self.dir / f"{name}.csv", df.to_csv(index=False))
        atomic.write_text(self.dir / f"{name}.md", markdown_table(df, floatfmt))
        return self.dir / f"{name}.csv"


def markdown_table(df, floatfmt=".4g") -> str:
    # pandas.to_markdown needs `tabulate`; a plain pipe table needs nothing.
    def cell(v):
        return format(v, floatfmt) if isinstance(v, float) else str(v)
    head = "| " + " | ".join(map(str, df.columns)) + " |"
    sep = "|" + "|".join("---" for _ in df.columns) + "|"
    rows = ["| " + " | ".join(cell(v) for v in row) + " |" for row in df.itertuples(index=False)]
    return "\n".join([head, sep, *rows]) + "\n"
