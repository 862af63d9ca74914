"""Do the speed options cost quality? Train train_speed.py variants on the real shards, the same seed,
data order and schedule for each, and compare their validation loss at equal tokens.

  python bench/train_quality.py 124m-b64-relu2-cudnn 124m-b64-relu2-cudnn-h6-bf16res-fp8 \
      --shards work/data/shards --steps 600          # on a GPU, about 100 s a variant at 124m
  python bench/train_quality.py tiny-cpu tiny-cpu-bf16res-fp8row --shards work/data/shards --steps 30
  python bench/train_quality.py 124m-b64-relu2-cudnn-h6-bf16res-fp8 124m-b64-swiglu-cudnn-h6-bf16res-fp8 \
      --shards work/data/shards --steps 300          # the gated MLP against the fastest stack

train_speed.py times variants on random tokens, where a loss means nothing; here the same Trainer
(build_trainer) reads `--shards`/train, validates on the first `--eval-batches` batches of `--shards`/val
(the same batches for every variant), with warmup then cosine to `--steps`. Every variant starts from
the same initial weights when the architecture is the same (seed 0); a gated MLP (swiglu) has other
shapes, so other initial weights from the same seed. Records are merged into --out
(default results/bench/train_quality.json), one per (config, variant, device, steps): a run of
another length is another measurement and stays beside the first.
"""
import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from train_speed import VARIANTS, build_trainer, merge, results_dir  # noqa: E402

QUALITY_KEY = ("config", "variant", "device", "steps")


def train_one(name: str, shards: Path, steps: int, eval_every: int, eval_batches: int, lr: float) -> dict:
    import torch
    from pipeline.runlog import device_name, git_commit
    for split in ("train", "val"):
        if not (shards / split).is_dir():
            raise SystemExit(f"{shards / split}: no such shard folder (run notebook 01, or pass --shards)")
    tr, v, cfg = build_trainer(name, shards / "train", shards / "val", lr=lr, min_lr=lr / 10,
                               warmup_steps=max(1, steps // 6), eval_every=eval_every, eval_batches=eval_batches,
                               log_every=max(1, eval_every // 4))
    tr.max_steps = steps  # build_trainer's budget is open-ended; the cosine ends here
    t0 = time.perf_counter()
    acct = tr.run(progress=False)
    h = tr.history
    return {
        "config": v["config"], "variant": name, "params": cfg.n_params, "n_head": cfg.n_head,
        "mlp_width": cfg.mlp_width,
        "batch": v["batch"],
        "seq_len": cfg.seq_len, "steps": tr.step, "tokens": acct["tokens"], "lr": lr,
        "val_loss": h["val_loss"][-1], "val_curve": list(zip(h["val_step"], h["val_loss"])),
        "train_curve": list(zip(h["step"], h["loss"])), "eval_batches": eval_batches,
        "train_seconds": acct["gpu_seconds"], "wall_s": round(time.perf_counter() - t0, 1),
        "settings": {k: v[k] for k in ("activation", "sdpa", "fp8", "fp8_scaling", "bf16_residual", "compile")},
        "shards": str(shards), "device": device_name(), "torch": torch.__version__, "commit": git_commit(),
        "date": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("variants", nargs="+", help="train_speed.py variant names (see its --list)")
    ap.add_argument("--shards", type=Path, required=True, help="folder with train/ and val/ token shards")
    ap.add_argument("--steps", type=int, default=600)
    ap.add_argument("--eval-every", type=int, default=100)
    ap.add_argument("--eval-batches", type=int, default=20)
    ap.add_argument("--lr", type=float, default=1e-3, help="peak learning rate (the dense124m run's)")
    ap.add_argument("--out", type=Path, default=results_dir("bench") / "train_quality.json")
    args = ap.parse_args(argv)
    unknown = [n for n in args.variants if n not in VARIANTS]
    if unknown:
        sys.exit(f"unknown variant(s) {unknown}; see train_speed.py --list")
    for name in args.variants:
        rec = train_one(name, args.shards, args.steps, args.eval_every, args.eval_batches, args.lr)
        merge(args.out, rec, QUALITY_KEY)
        print(f"-- {name}: val loss {rec['val_loss']:.4f} after {rec['tokens']:,} tokens ({rec['steps']} steps), "
              f"{rec['train_seconds']:.0f} s of training; curve {[round(v, 3) for _, v in rec['val_curve']]}",
              flush=True)


if __name__ == "__main__":
    main()
