"""Where a training step's time goes: torch.profiler over a few steps of one train_speed.py variant,
summed by kind of work, so that the next speed change aims at the largest share.

  python bench/train_profile.py 124m-b32-relu2-cudnn            # on a GPU: device time of every kernel
  python bench/train_profile.py tiny-cpu --steps 3              # on the CPU: self time of every operator

The same Trainer as train_speed.py (its build_trainer), on random tokens, after warm-up steps that
include compilation. Kinds are read from kernel (or operator) names: attention, matmul, loss,
optimizer, copies, and the rest (elementwise, norms, RoPE: mostly inductor's fused kernels). The
record keeps the top kernels by name, so a wrong guess about a kind can be checked and corrected.
Profiling slows the host a little, so the step time here is not the speed figure: train_speed.json is.
Records are merged into --out (default results/bench/train_profile.json), one per (config, variant, device).
"""
import argparse
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
# the variants, their Trainer, the record merge and results_dir (which puts the repository on sys.path)
from train_speed import VARIANTS, build_trainer, merge, random_shards, results_dir  # noqa: E402

# name fragments, tried in this order (an attention kernel may also say "gemm")
KINDS = [("attention", ("flash", "fmha", "cudnn", "sdpa", "attention")),
         ("matmul", ("gemm", "nvjet", "cutlass", "triton_tem", "scaled_mm", "aten::mm", "aten::addmm", "aten::bmm",
                     "matmul", "mmbackward")),
         ("loss", ("cross_entropy", "nll_loss", "log_softmax", "logsoftmax", "logsumexp")),
         ("optimizer", ("adam", "multi_tensor", "foreach")),
         # inductor names fused kernels after their ops ("triton_poi_fused__to_copy_add_0"): those stay "other"
         ("copies", ("memcpy", "memset", "aten::copy_", "aten::to", "aten::clone", "aten::contiguous"))]


# inductor's pointwise / persistent / reduction kernels: they also carry the names of the ops they feed,
# so an FP8 cast reads "triton_poi_fused__scaled_mm_..." but is no matmul (its templates, triton_tem_, are)
FUSED = ("triton_poi", "triton_per", "triton_red")


def kind(name: str) -> str:
    low = name.lower()
    fused = low.startswith(FUSED)
    return next((k for k, frags in KINDS if not (fused and k == "matmul") and any(f in low for f in frags)), "other")


def summarize(events, device: bool, steps: int) -> dict:
    """Per-kind and per-name time a step (ms) from key_averages(): device kernels on a GPU (each kernel
    once), operators' self CPU time on the CPU (self time, so nested operators are not counted twice)."""
    rows = []
    for e in events:
        if device and str(e.device_type).endswith("CUDA"):
            rows.append((e.key, e.self_device_time_total, e.count))
        elif not device and str(e.device_type).endswith("CPU"):
            rows.append((e.key, e.self_cpu_time_total, e.count))
    total = sum(t for _, t, _ in rows) or 1.0
    by_kind = {}
    for name, t, _ in rows:
        by_kind[kind(name)] = by_kind.get(kind(name), 0.0) + t
    top = sorted(rows, key=lambda r: -r[1])[:30]
    return {"time_per_step_ms": round(total / 1000 / steps, 3),
            "kinds": {k: {"ms_per_step": round(t / 1000 / steps, 3), "share": round(t / total, 4)}
                      for k, t in sorted(by_kind.items(), key=lambda kv: -kv[1])},
            "top": [{"name": n[:160], "kind": kind(n), "ms_per_step": round(t / 1000 / steps, 3),
                     "calls_per_step": round(c / steps, 2), "share": round(t / total, 4)} for n, t, c in top]}


def profile(name: str, shard_dir, steps: int) -> dict:
    import torch
    from torch.profiler import ProfilerActivity
    from pipeline.runlog import device_name, git_commit

    tr, v, cfg = build_trainer(name, shard_dir)
    device = tr.device.type == "cuda"
    tr.run(steps=3, progress=False)                  # compile and warm up outside the trace
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device else [])
    t0 = time.perf_counter()
    with torch.profiler.profile(activities=activities) as prof:
        tr.run(steps=steps, progress=False)          # ends with a device synchronisation
    wall = time.perf_counter() - t0
    return {"variant": name, "config": v["config"], "batch": v["batch"], "seq_len": cfg.seq_len, "steps": steps,
            "wall_ms_per_step_profiled": round(1000 * wall / steps, 2),
            "timer": "device kernels" if device else "operators' self CPU time",
            **summarize(prof.key_averages(), device, steps),
            "device": device_name(), "torch": torch.__version__, "commit": git_commit(),
            "date": time.strftime("%Y-%m-%dT%H:%M:%S%z")}


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("variant", help="a train_speed.py variant (see its --list)")
    ap.add_argument("--steps", type=int, default=5, help="profiled steps, after 3 warm-up steps")
    ap.add_argument("--out", type=Path, default=results_dir("bench") / "train_profile.json")
    args = ap.parse_args(argv)
    if args.variant not in VARIANTS:
        ap.error(f"unknown variant {args.variant!r}; see bench/train_speed.py --list")
    with tempfile.TemporaryDirectory() as tmp:
        rec = profile(args.variant, random_shards(Path(tmp) / "shards"), args.steps)
    merge(args.out, rec)
    print(f"{args.variant} on {rec['device']}: {rec['time_per_step_ms']} ms a step ({rec['timer']}), "
          f"{rec['wall_ms_per_step_profiled']} ms wall while profiled")
    for k, r in rec["kinds"].items():
        print(f"  {k:10s} {r['ms_per_step']:9.3f} ms  {100 * r['share']:5.1f}%")
    print(f"records merged into {args.out}")
    return rec


if __name__ == "__main__":
    main()
