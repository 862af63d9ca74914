"""Train one dense model outside the notebook: notebook 03's run, on one device or data-parallel through torchrun.

  python scripts/train_dense.py --run-name frontier/b3 -f params/frontier/03_dense.yaml -p model_name dense30m
  torchrun --standalone --nproc_per_node=8 scripts/train_dense.py --run-name frontier/b5 \
      -f params/frontier/03_dense.yaml

It takes notebook 03's parameters (the notebook's defaults, then the -f YAML, then -p NAME VALUE),
checked as the notebook checks them (gmlib.config: a name 03 does not declare, or a value of the
wrong type, is refused; a `preset` expands under the given names), and writes what 03 writes for
the rest of the pipeline: the checkpoint and branch checkpoints under work/<run_name>/models/
<model_name>/, and in results/<run_name>/ the parameters (03_train_dense.<model_name>.params.yaml),
the loss figure and the model's entry in metrics.json (the same fields as 03's, plus world_size),
so 04 branches from it, 05 evaluates it and a plan's params_from reads its tokens exactly as after
the notebook. Under torchrun every rank trains its part of each global batch (gmlib.train's DDP);
rank 0 alone writes. The plan runner (pipeline.plan) runs it for a notebook-03 job with `nproc`.
"""
import argparse
import json
import math
import sys
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))  # runs from a clone without installing

from gmlib import config, distributed, train  # noqa: E402
from gmlib.data import TokenShards  # noqa: E402
from gmlib.model import PRESETS, GPTConfig, make_config  # noqa: E402
from gmlib.paths import work_dir  # noqa: E402

NOTEBOOK = "03_train_dense"


def read_params(run_name: str, params_file: Path | None, overrides: dict) -> dict:
    """03's parameters: its cell's defaults, the params file's, the overrides; checked as 03 checks them."""
    given = {**((yaml.safe_load(params_file.read_text()) or {}) if params_file else {}), **overrides}
    given["run_name"] = run_name
    try:
        params = config.check({**config.declared(NOTEBOOK), **given}, NOTEBOOK, train.TrainConfig, GPTConfig,
                              given=set(given))
    except (ValueError, TypeError) as e:
        raise SystemExit(str(e)) from None
    if params["model_size"] not in PRESETS:
        raise SystemExit(f"model_size={params['model_size']!r}; choose one of {sorted(PRESETS)}")
    if not isinstance(params["branch_fractions"], list):
        raise SystemExit(f"branch_fractions={params['branch_fractions']!r}: a list of fractions of the budget")
    return params


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--run-name", default="demo")
    ap.add_argument("-f", "--params-file", type=Path, help="a YAML of notebook 03's parameters")
    ap.add_argument("-p", "--param", nargs=2, action="append", default=[], metavar=("NAME", "VALUE"),
                    help="one of 03's parameters (YAML value); later wins")
    args = ap.parse_args(argv)
    p = read_params(args.run_name, args.params_file, {k: yaml.safe_load(v) for k, v in args.param})
    with distributed.group() as (rank, world):
        run(p, rank, world)


def run(p: dict, rank: int, world: int) -> dict | None:
    """03's training and record for the parameters p; returns the metrics entry on rank 0."""
    shard_dir = work_dir(p["data_name"]) / "shards"
    if not (shard_dir / "train" / "meta.json").is_file():
        raise SystemExit(f"{shard_dir}: no token shards; run 02_tokenizer with data_name={p['data_name']!r} first")
    ckpt_path = work_dir(p["run_name"]) / "models" / p["model_name"] / "checkpoint.safetensors"
    log = None
    if rank == 0:
        from pipeline.runlog import RunLog
        log = RunLog(p["run_name"], NOTEBOOK, tag=p["model_name"])
        log.save_params(p)
    vocab_size = TokenShards(shard_dir / "train").vocab_size
    model_cfg = make_config(p["model_size"], vocab_size=vocab_size, **config.fields(p, GPTConfig))
    train_cfg = train.TrainConfig(**config.fields(p, train.TrainConfig))
    tr = train.setup(model_cfg, train_cfg, shard_dir, ckpt_path=ckpt_path, resume=p["resume"], rank=rank,
                     world_size=world)
    resumed_at = tr.step
    if rank == 0:
        print(f"{p['model_name']} ({p['model_size']}, {model_cfg.n_params / 1e6:.2f}M) on {world} x {tr.device}"
              + (f"; resumed at step {resumed_at}" if resumed_at else ""), flush=True)
    acct, branches = train.run_with_branches(tr, p["branch_fractions"], ckpt_path.parent, progress=rank == 0)
    val_loss = tr.evaluate(batches=p["final_eval_batches"])  # every rank: its rows of the validation windows
    distributed.barrier()  # rank 0's checkpoint is complete before any rank leaves
    if rank != 0:
        return None
    fig = train.plot_history(tr.history)
    fig.axes[0].set_title(f"{p['model_name']} ({p['model_size']}, {model_cfg.n_params / 1e6:.1f}M, {world} ranks): "
                          f"held-out loss {val_loss:.3f}")
    log.savefig(fig, f"loss_{p['model_name']}")
    root = work_dir(p["run_name"]).parent
    entry = {"model_size": p["model_size"], "config": tr.model.config_dict(), "val_loss": val_loss,
             "val_ppl": math.exp(val_loss), "val_tokens": p["final_eval_batches"] * p["batch_size"] * model_cfg.seq_len,
             **acct, "flops_per_token": model_cfg.flops_per_token(), "resumed_at_step": resumed_at,
             "schedule": p["schedule"], "decay_frac": p["decay_frac"], "max_steps_budget": tr.max_steps,
             "weight_decay": p["weight_decay"], "world_size": world,
             "branches": {str(s): str(q.relative_to(root)) for s, q in branches.items()},
             "checkpoint": str(ckpt_path.relative_to(root))}
    log.save_metrics({p["model_name"]: entry})
    print(json.dumps({k: entry[k] for k in ("val_loss", "tokens", "gpu_seconds", "flops_6nd", "world_size")}),
          flush=True)
    return entry


if __name__ == "__main__":
    main()
