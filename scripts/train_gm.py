"""Train a gm (many experts) from the command line; one process, or one per GPU through torchrun.

  python scripts/train_gm.py --config params/gm/train_gm.yaml --data work/data/shards --out work/data/gm/gm
  torchrun --standalone --nproc_per_node=2 scripts/train_gm.py --config ... --data ... --out ...
  ... -s n_experts=16 -s lr=1e-3                   # override any setting (YAML values)

The config is a YAML of gmlib.gm.GMConfig fields, with TrainConfig fields (lr, batch_size, ...)
beside them. Each rank trains the experts e with e % world_size == rank on its own GPU (LOCAL_RANK);
rank 0 fits the router and routes first, and writes <out>/gm.json at the end. Rerunning the same
command continues a killed run.
"""
import argparse
import json
import os
import sys
from datetime import timedelta
from pathlib import Path

import torch.distributed as dist

import yaml

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # runs from a clone without installing

from gmlib import gm  # noqa: E402


def init_distributed() -> tuple[int, int]:
    """(rank, world_size) from torchrun's environment, with a gloo group when world_size > 1. Gloo
    even on GPUs: ranks only wait at barriers (no tensor crosses), gloo's wait needs no GPU, and
    the long timeout lets ranks finish their experts hours apart."""
    rank, world = int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))
    if world > 1:
        dist.init_process_group("gloo", rank=rank, world_size=world, timeout=timedelta(days=7))
    return rank, world


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", type=Path, required=True, help="YAML of GMConfig (and TrainConfig) fields")
    ap.add_argument("--data", type=Path, required=True, help="a shards folder with train/ and val/")
    ap.add_argument("--out", type=Path, required=True, help="the gm's folder (router, routed shards, store, gm.json)")
    ap.add_argument("-s", "--set", nargs=1, action="append", default=[], metavar="KEY=VALUE")
    ap.add_argument("-q", "--quiet", action="store_true", help="no line per segment")
    args = ap.parse_args(argv)
    settings = yaml.safe_load(args.config.read_text()) or {}
    for (kv,) in args.set:
        k, _, v = kv.partition("=")
        settings[k] = yaml.safe_load(v)
    cfg = gm.GMConfig.from_dict(settings)
    rank, world = init_distributed()
    try:
        out = gm.train_gm(cfg, args.data, args.out, rank=rank, world_size=world, verbose=not args.quiet)
    finally:
        if world > 1:
            dist.destroy_process_group()
    if rank == 0:
        a, sw = out["accounting"], out["swap"]
        print(json.dumps({"out": str(args.out), "experts": out["n_experts"], "world_size": world,
                          "val_loss": out["val_loss"], "tokens": a["tokens"], "gpu_seconds": a["gpu_seconds"],
                          "flops": a["flops"], "wall_s": sw["wall_s"], "wait_frac": sw["wait_frac"],
                          "trainer_wait_frac": sw["trainer_wait_frac"]}, indent=1))


if __name__ == "__main__":
    main()
