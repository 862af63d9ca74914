"""The learning-rate schedule and the branch points of a run: where its budget stands at a step.

WSD and branching. Under WSD the learning rate is flat after the warmup until the last
decay_frac of the budget, so the run's state at any step of the stable phase does not depend
on how long the run will be. A run can therefore save branch checkpoints (gmlib.train.
run_with_branches: weights, AdamW moments, step, data position) along its stable phase; gm
experts continue from one of them, and the same run, decayed at its end, is their dense twin.
`cfg` below is a gmlib.train.TrainConfig.
"""
import math
from pathlib import Path

SCHEDULES = ("cosine", "wsd")


def lr_at(cfg, step: int, progress: float) -> float:
    """Linear warmup over the first warmup_steps, times the schedule's shape over the budget
    (progress 0..1: the largest spent fraction of steps, tokens or seconds):
      cosine: from lr to min_lr over the whole budget;
      wsd:    lr until 1 - decay_frac, then 1 - sqrt down to min_lr at the end. 1 - sqrt rather
              than linear: Hägele et al. 2024 (Scaling Laws and Compute-Optimal Training Beyond
              Fixed Training Durations) find it beats a linear cooldown and matches cosine."""
    warm = min(1.0, (step + 1) / cfg.warmup_steps) if cfg.warmup_steps else 1.0
    p = min(progress, 1.0)
    if cfg.schedule == "cosine":
        shape = 0.5 * (1 + math.cos(math.pi * p))
    else:
        into = (p - (1 - cfg.decay_frac)) / cfg.decay_frac if cfg.decay_frac else 0.0
        shape = 1 - math.sqrt(min(1.0, max(0.0, into)))
    return warm * (cfg.min_lr + (cfg.lr - cfg.min_lr) * shape)


def branch_step(fraction: float, total_steps: int) -> int:
    """The step at which a run of total_steps passes `fraction` of its budget: where gm experts
    branch (gm.py) and where a dense run saves the checkpoint they branch from (run_with_branches).
    One function for both, so the two always agree."""
    if not 0 < fraction < 1:
        raise ValueError(f"branch fraction {fraction} must be in (0, 1)")
    return max(1, min(total_steps - 1, round(fraction * total_steps)))


def stable_until(cfg, total_steps: int) -> int:
    """The last step whose learning rate (after warmup) does not depend on the budget: the
    state at a step <= this is the same in a run of any length >= total_steps' decay start."""
    return math.floor((1 - cfg.decay_frac) * total_steps) if cfg.schedule == "wsd" else 0


def branch_path(ckpt_dir, step: int) -> Path:
    """Where a run saves its branch checkpoint at `step` (next to its checkpoint.safetensors)."""
    return Path(ckpt_dir) / f"branch_{step:07d}.safetensors"
