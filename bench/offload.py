"""Swap overhead of the gm trainer itself: gmlib.gm.train_gm on N experts of a preset, once with
a GPU tier smaller than the schedule (`slots` expert states; 2 is the trainer's default) and once
with every expert resident (a GPU tier of N), on the same data, settings and seeds.

Nothing here trains or swaps: the trainer's segments, its store and its prefetch run as in any gm,
and its own clock (gmlib.clock, the rank record's `trainer_wait`) says where the GPU waited. Each
expert trains `rounds` segments of `segment_steps` steps, round-robin, so from its second segment on
every switch fetches an expert that the previous ones pushed out of the GPU tier. Recorded:
  overhead_frac          the swap run's wait (fetch + load + writeback + sync) / its wall time, from every
                         expert's second segment on (the first builds a new expert, and with compile
                         holds the compilation: both runs pay them alike, so they are left out);
                         overhead_frac_whole: the same over the whole run (gm.json's trainer_wait_frac)
  overhead_vs_resident   the swap run's wall time per step over the resident run's - 1, same segments;
                         overhead_vs_resident_whole: the two whole trainer runs (rank wall_s)
The data is random tokens written as shards here (or --shards, a shard root with train/), routed by
the hash router once and shared by both runs; a loss on random tokens means nothing, a speed does.
What both runs pay alike is in neither figure: the store's RAM copy and durable disk write of every
segment's state (gm.py's put), which the all-resident run does too.

  GPU machine (8 x 124m, GPU tier of 2 against 8; about 5 minutes on an H200):
      python bench/offload.py results/bench/offload.json
  CPU smoke test (seconds):
      python bench/offload.py /tmp/offload.json --preset tiny --seq-len 32 --batch 2 --experts 4 --rounds 2 \
          --segment-steps 3 --log-every 3 --compile 0 --vocab 256

Prediction (H200, 124m, batch 16x1024, 100 steps a segment): an expert with its Adam state is
1.32 GB, about 25 ms each way over PCIe at the 54 GB/s measured for pinned memory, against a segment
of about 100 x 30 ms = 3 s: the prefetch hides, and what shows is put()'s device-to-device snapshot
and get()'s copy into the model (about 1 ms each) and the host's work around them: overhead_frac
well under 1%, overhead_vs_resident under 1%.
"""
import argparse
import json
import shutil
import sys
import time
from dataclasses import asdict, dataclass, fields
from pathlib import Path

import numpy as np
import torch

from gmlib import atomic, gm
from gmlib.clock import PARTS, WAIT
from gmlib.data import ShardWriter, TokenShards
from gmlib.model import make_config
from gmlib.paths import work_dir
from pipeline.runlog import device_name, git_commit
from gmlib.train import TrainConfig


@dataclass
class Config:
    preset: str = "124m"
    seq_len: int = 0          # 0: the preset's
    activation: str = ""      # "": the preset's
    experts: int = 8
    slots: int = 2            # the swap run's GPU tier, in expert states (fp32 weights + Adam moments)
    rounds: int = 3           # segments each expert trains
    segment_steps: int = 100
    batch: int = 16
    lr: float = 3e-4
    log_every: int = 50       # the trainer's host syncs (gm124m uses 50)
    compile: int = 1
    vocab: int = 32768        # of the random tokens
    shards: str = ""          # a shard root with train/ (val/ optional); empty: random tokens written here
    work: str = ""            # empty: work/bench_offload (data, routing, and each run's gm while it runs)
    runs: str = "resident,swap"
    keep: int = 0             # 1: keep each run's gm folder (the store holds up to 2 versions per expert)
    device: str = "auto"
    seed: int = 0


def parse(config_cls, doc: str, argv=None) -> tuple[Path, object]:
    """The command line of a bench script: the JSON file to write, then one --flag per field
    of its Config dataclass, typed and defaulted by the field. bench/scale.py uses it too."""
    p = argparse.ArgumentParser(description=doc.split("\n")[0])
    p.add_argument("out", type=Path, help="JSON file to write")
    for f in fields(config_cls):
        p.add_argument("--" + f.name.replace("_", "-"), type=type(f.default), default=f.default)
    a = p.parse_args(argv)
    return a.out, config_cls(**{f.name: getattr(a, f.name) for f in fields(config_cls)})


def log(*msg):
    print(time.strftime("%H:%M:%S"), *msg, flush=True)


def synthetic_shards(root: Path, vocab: int, n_docs: int, doc_tokens: int, seed: int) -> Path:
    """root/train: n_docs documents of doc_tokens uniform random token ids (gmlib.data's format);
    kept when already there with the same shape."""
    train = root / "train"
    if (train / "meta.json").is_file():
        meta = json.loads((train / "meta.json").read_text())
        if meta["vocab_size"] == vocab and meta["n_docs"] == n_docs and meta["n_tokens"] == n_docs * doc_tokens:
            return root
    rng = np.random.default_rng([seed, 7])
    with ShardWriter(train, vocab_size=vocab, sources=["random"]) as w:
        for _ in range(n_docs):
            w.add(rng.integers(0, vocab, doc_tokens), nbytes=doc_tokens)
    return root


def steady(tw: dict) -> dict:
    """A run's clock (rank record's trainer_wait) from every expert's second segment on: the
    segments that fetch an expert from the store, and the syncs at the phase ends."""
    first = [s for s in tw["segments"] if s["found"] == "new"]
    rest = [s for s in tw["segments"] if s["found"] != "new"]
    wall = tw["wall_s"] - sum(s["wall_s"] for s in first)
    out = {"segments": len(rest), "steps": sum(s["step_end"] - s["step"] for s in rest), "wall_s": wall,
           "found": {k: sum(s["found"] == k for s in rest) for k in ("dev", "ram", "disk")}}
    for p in PARTS:
        out[f"{p}_s"] = tw[f"{p}_s"] - sum(s[f"{p}_s"] for s in first)
    out["wait_s"] = sum(out[f"{p}_s"] for p in WAIT)
    out["wait_frac"] = out["wait_s"] / wall if wall > 0 else 0.0
    out["step_s"] = wall / out["steps"] if out["steps"] else None
    return out


def overrides(cfg: Config) -> dict:
    """The GPTConfig overrides of every expert (GMConfig.model)."""
    return {**({"seq_len": cfg.seq_len} if cfg.seq_len else {}),
            **({"activation": cfg.activation} if cfg.activation else {})}


def run_one(cfg: Config, name: str, data: Path, root: Path, slots: int) -> dict:
    """train_gm with a GPU tier of `slots` expert states; the trainer's own record, condensed."""
    mcfg = make_config(cfg.preset, vocab_size=TokenShards(data / "train").vocab_size, **overrides(cfg))
    tok_step = cfg.batch * mcfg.seq_len
    tcfg = TrainConfig(batch_size=cfg.batch, lr=cfg.lr, min_lr=cfg.lr / 10, warmup_steps=min(20, cfg.segment_steps),
                       schedule="wsd", eval_every=0, log_every=cfg.log_every, compile=bool(cfg.compile))
    gcfg = gm.GMConfig(n_experts=cfg.experts, router="random", model_size=cfg.preset, model=overrides(cfg),
                       budget="fixed", tokens=cfg.rounds * cfg.segment_steps * tok_step,
                       segment_steps=cfg.segment_steps,
                       gpu_bytes=slots * gm.state_bytes(mcfg), device=cfg.device, seed=cfg.seed, train=tcfg)
    out = root / name
    shutil.rmtree(out, ignore_errors=True)
    cuda = torch.cuda.is_available() and cfg.device != "cpu"
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    log(f"{name}: {cfg.experts} experts x {cfg.rounds} segments of {cfg.segment_steps} steps, GPU tier of {slots}")
    s = gm.train_gm(gcfg, data, out, routing=root / "routing")
    rank, st = s["ranks"][0], s["ranks"][0]["store"]
    tw = rank["trainer_wait"]
    rec = {"gpu_slots": slots, "gpu_tier_bytes": gcfg.gpu_bytes, "wall_s": rank["wall_s"], "clock_wall_s": tw["wall_s"],
           "trainer_wait_s": tw["trainer_wait_s"], "trainer_wait_frac": tw["trainer_wait_frac"],
           "parts": {k: v for k, v in tw.items() if k.endswith("_s") and k not in ("wall_s", "trainer_wait_s")},
           "steady": steady(tw), "tokens": s["accounting"]["tokens"],
           "store": {k: st[k] for k in ("bytes_to_dev", "bytes_to_ram", "bytes_snapshot", "bytes_to_disk", "copy_s",
                                        "gb_s", "get_s", "put_s", "hits", "misses", "prefetches", "evictions",
                                        "allocs")},
           "peak_gpu_gb": torch.cuda.max_memory_allocated() / 1e9 if cuda else None,
           "last_loss": [r["history"]["loss"][-1] if r["history"]["loss"] else None for r in s["records"]],
           "segments": tw["segments"]}
    rec["steady"]["tokens_per_s"] = (rec["steady"]["steps"] * tok_step / rec["steady"]["wall_s"]
                                     if rec["steady"]["wall_s"] > 0 else None)
    if not cfg.keep:
        shutil.rmtree(out, ignore_errors=True)
    sd = rec["steady"]
    log(f"{name}: wall {rec['wall_s']:.1f} s; from the second segment on {sd['wall_s']:.2f} s, "
        f"waited {sd['wait_s']:.3f} s "
        f"({sd['wait_frac']:.2%}: " + ", ".join(f"{p} {sd[p + '_s']:.3f}" for p in WAIT) + ")")
    return rec


def main(argv=None):
    out, cfg = parse(Config, __doc__, argv)
    runs = [r.strip() for r in cfg.runs.split(",") if r.strip()]
    if sorted(set(runs)) != ["resident", "swap"] or len(runs) != 2:
        raise SystemExit(f"--runs {cfg.runs!r}: give resident and swap once each, in the order to run them")
    if not 2 <= cfg.slots < cfg.experts:
        raise SystemExit(f"--slots {cfg.slots}: the swap run needs 2 <= slots < experts ({cfg.experts}): the expert "
                         f"training and the one prefetched")
    root = Path(cfg.work) if cfg.work else work_dir("bench_offload")
    T = make_config(cfg.preset, **overrides(cfg)).seq_len
    data = (Path(cfg.shards) if cfg.shards
            else synthetic_shards(root / "data", cfg.vocab, 16 * cfg.experts, 4 * T, cfg.seed))
    res = {name: run_one(cfg, name, data, root, cfg.slots if name == "swap" else cfg.experts) for name in runs}
    sw, rs = res["swap"], res["resident"]
    emcfg = make_config(cfg.preset, vocab_size=TokenShards(data / "train").vocab_size, **overrides(cfg))
    ratio = lambda a, b: a / b - 1 if a is not None and b else None  # noqa: E731
    result = {
        "source": "gm_trainer", "experts": cfg.experts, "expert_params": emcfg.n_params,
        "total_params": cfg.experts * emcfg.n_params, "expert_bytes": gm.state_bytes(emcfg), "gpu_slots": cfg.slots,
        "segments_per_expert": cfg.rounds, "steps_per_segment": cfg.segment_steps,
        "overhead_frac": sw["steady"]["wait_frac"], "overhead_frac_whole": sw["trainer_wait_frac"],
        "overhead_vs_resident": ratio(sw["steady"]["step_s"], rs["steady"]["step_s"]),
        "overhead_vs_resident_whole": ratio(sw["wall_s"], rs["wall_s"]),
        "wait_s": sw["steady"]["wait_s"], "wall_s": sw["steady"]["wall_s"],
        **{f"{p}_s": sw["steady"][f"{p}_s"] for p in WAIT},
        "resident_wait_s": rs["steady"]["wait_s"], "resident_fetch_s": rs["steady"]["fetch_s"],
        "copy_gb_s": sw["store"]["gb_s"], "bytes_to_dev": sw["store"]["bytes_to_dev"],
        "tokens_per_s": sw["steady"]["tokens_per_s"], "tokens_per_s_resident": rs["steady"]["tokens_per_s"],
        "runs": res, "data": str(data) if cfg.shards else "random tokens",
        "device": device_name(), "torch": torch.__version__, "commit": git_commit(),
        "date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "config": asdict(cfg),
    }
    atomic.write_json(out, result)
    log(f"overhead {result['overhead_frac']:.2%} of the wall time (whole run {result['overhead_frac_whole']:.2%}); "
        f"vs all resident {result['overhead_vs_resident'] or 0:+.2%} "
        f"(whole run {result['overhead_vs_resident_whole'] or 0:+.2%})"
        f" -> {out}")
    json.dump({k: v for k, v in result.items() if k not in ("config", "runs")}, sys.stdout, indent=1, default=str)
    print()
    return result


if __name__ == "__main__":
    main()
