"""Train a gm (many experts) from the command line; one process, or one per GPU through torchrun.

  python scripts/train_gm.py --config params/gm124m/04_train_gm.yaml   # the gm notebook 04 trains from it
  torchrun --standalone --nproc_per_node=2 scripts/train_gm.py --config ... [--data ...] [--out ...]
  ... -s n_experts=16 -s lr=1e-3                   # override any setting (YAML values)

The config is a params file of notebook 04 (one flat dialect, gmlib.config): GMConfig fields with
TrainConfig (lr, batch_size, ...) and GPTConfig (activation, seq_len, ...) fields beside them, a
`preset` of gmlib.config.PRESETS, and the notebook's run names: --data defaults to
work/<data_name>/shards, --out to work/<run_name>/gm/<gm_name>, and seed_from names a model of
work/<run_name>/models/ (a folder when the file has no run_name). A setting the file leaves out takes
the dataclass's default, not the notebook cell's demo value; the notebook's other settings
(compare_routers, reuse_routing, resume, cpu_threads) do not apply here. GMConfig's nested form
(model: {...}, train: {...}) is read too. Each rank trains the experts e with e % world_size == rank
on its own GPU (LOCAL_RANK); rank 0 fits the router and routes first, and writes <out>/gm.json at the
end. Rerunning the same command continues a killed run. A plan job (pipeline.plan, `nproc: N`) runs it
under torch.distributed.run with the run's names in its params file and -s gm_name=..., so the gm lands
beside the notebooks' ones, where 05 evaluates it (params/frontier/train_gm_x8.yaml).
"""
import argparse
import json
import sys
from datetime import timedelta
from pathlib import Path

import yaml

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # runs from a clone without installing

from gmlib import config, distributed, gm  # noqa: E402
from gmlib.model import GPTConfig  # noqa: E402
from gmlib.paths import work_dir  # noqa: E402
from gmlib.train import TrainConfig  # noqa: E402

CONFIGS = (gm.GMConfig, TrainConfig, GPTConfig)


def read_config(path: Path, sets: list[str]) -> tuple[gm.GMConfig, dict]:
    """The GMConfig of a params file (and KEY=VALUE overrides), and the run's default data and out folders."""
    settings = yaml.safe_load(Path(path).read_text()) or {}
    for kv in sets:
        k, _, v = kv.partition("=")
        settings[k] = yaml.safe_load(v)
    settings = config.check(settings, "04_train_gm", *CONFIGS, all_fields=True)
    run = {"data": work_dir(settings["data_name"]) / "shards" if settings.get("data_name") else None,
           "out": work_dir(settings["run_name"]) / "gm" / settings["gm_name"]
           if settings.get("run_name") and settings.get("gm_name") else None}
    flat = config.fields(settings, *CONFIGS)
    if flat.get("seed_from") and settings.get("run_name"):
        flat["seed_from"] = str(work_dir(settings["run_name"]) / "models" / flat["seed_from"])
    return gm.GMConfig.from_dict(flat), run


def distributed_group():
    """distributed.group() from torchrun's environment, a gloo group when world_size > 1. Gloo even on
    GPUs: ranks only wait at barriers (no tensor crosses), gloo's wait needs no GPU, and the long
    timeout lets ranks finish their experts hours apart."""
    return distributed.group("gloo", timeout=timedelta(days=7))


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", type=Path, required=True, help="a params file of notebook 04 (flat YAML)")
    ap.add_argument("--data", type=Path, help="a shards folder with train/ and val/ (default: work/<data_name>/shards)")
    ap.add_argument("--out", type=Path, help="the gm's folder: router, routed shards, store, gm.json "
                                             "(default: work/<run_name>/gm/<gm_name>)")
    ap.add_argument("-s", "--set", nargs=1, action="append", default=[], metavar="KEY=VALUE")
    ap.add_argument("-q", "--quiet", action="store_true", help="no line per segment")
    args = ap.parse_args(argv)
    cfg, run = read_config(args.config, [kv for (kv,) in args.set])
    args.data, args.out = args.data or run["data"], args.out or run["out"]
    if args.data is None or args.out is None:
        ap.error("give --data and --out, or data_name, run_name and gm_name in the config")
    with distributed_group() as (rank, world):
        out = gm.train_gm(cfg, args.data, args.out, rank=rank, world_size=world, verbose=not args.quiet)
    if rank == 0:
        a, sw = out["accounting"], out["swap"]
        print(json.dumps({"out": str(args.out), "experts": out["n_experts"], "world_size": world,
                          "val_loss": out["val_loss"], "tokens": a["tokens"], "gpu_seconds": a["gpu_seconds"],
                          "flops": a["flops"], "wall_s": sw["wall_s"], "wait_frac": sw["wait_frac"],
                          "trainer_wait_frac": sw["trainer_wait_frac"]}, indent=1))


if __name__ == "__main__":
    main()
