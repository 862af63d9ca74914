"""The multi-GPU speed-up of the gm trainer, from two runs of the same config (issue 4).

  torchrun --standalone --nproc_per_node=1 scripts/train_gm.py --config params/gm124m/speedup.yaml \\
      --data work/data/shards --out work/s1
  torchrun --standalone --nproc_per_node=2 scripts/train_gm.py --config params/gm124m/speedup.yaml \\
      --data work/data/shards --out work/s2
  python bench/gm_speedup.py work/s1/gm.json work/s2/gm.json results/gm124m_speedup/speedup.json

The training phase's wall time is the store's `swap.wall_s` (from the first expert's segment to
the last; the router fit and the routing before it run on rank 0's CPU and are not divided among
GPUs). Device-seconds per rank show the load balance: the slowest rank sets the wall time.
"""
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from gmlib import atomic  # noqa: E402


def summarise(gm: dict) -> dict:
    per_rank = {}
    for r in gm["records"]:
        per_rank[r["rank"]] = per_rank.get(r["rank"], 0.0) + r["accounting"]["gpu_seconds"]
    return {"world_size": gm["world_size"], "train_wall_s": gm["swap"]["wall_s"],
            "gpu_seconds": gm["accounting"]["gpu_seconds"], "gpu_seconds_per_rank": per_rank,
            "tokens": gm["accounting"]["tokens"], "val_loss": gm["val_loss"], "wait_frac": gm["swap"]["wait_frac"]}


def main(one, many, out):
    a, b = (summarise(json.loads(Path(p).read_text())) for p in (one, many))
    rec = {"one": a, "many": b, "speedup_train_wall": a["train_wall_s"] / b["train_wall_s"],
           "max_val_loss_diff": max(abs(x - y) for x, y in zip(a["val_loss"], b["val_loss"]))}
    atomic.write_json(out, rec)
    print(json.dumps(rec, indent=1))


if __name__ == "__main__":
    main(*sys.argv[1:4])
