"""Scale: the total parameters one GPU trains in one run, every expert taking real optimizer
steps, with the experts that are not training kept in RAM and on disk through the store.

Each expert: fresh weights on the GPU (the model's own seeded initialisation), `steps` steps of
gmlib.train's Trainer (the loop, AdamW and schedule every dense run and gm expert uses; one model and
one optimizer borrowed by every expert in turn, as gmlib.gm's ranks do) on random tokens written as
shards here (or --shards, a shard root with train/), then put into the store as bf16 weights without
optimizer state (the trade-off is in gmlib/store.py's docstring): a 350m expert is 0.67 GB instead of
4.0 GB with fp32 weights and Adam moments. The RAM tier holds `ram_gb`; older experts are
written back to disk. At the end every expert is read back and compared bit for bit with a
fingerprint taken on the GPU before it left (disk copies are also checked by CRC-32 on read).

Resumable: progress.json beside the store lists the finished experts and their fingerprints.
A second call keeps those with a copy on disk and retrains the ones that lived only in RAM
(RAM dies with the process; retraining is deterministic by seed). Training stops before
`time_limit` seconds, leaving time to verify and write the JSON (then "complete": false).

  GPU machine (about 3 minutes on an H100; 16 cores, 125 GB RAM, about 60 GB free disk):
      python bench/scale.py results/bench/scale.json
  CPU smoke test (seconds):
      python bench/scale.py /tmp/scale.json --preset tiny --target-params 2e7 --batch 2 --seq-len 64 \
          --steps 2 --ram-gb 0.02 --fresh 1

Why not gmlib.gm.train_gm itself: it keeps every finished expert as fp32 weights on disk (durable,
4 bytes a parameter: 120 GB for 30B, and the GPU machine has about 60 GB free), where this keeps
bf16 (2 bytes). The trainer's swaps are measured by bench/offload.py.

Estimate per expert on an H100 (BRIEF.md section 5), 350m (335M params), batch 8x1024: the
336M compiled trainer ran 191k tok/s, so about 43 ms a step; eager here, say 70 ms; 4 steps
0.3 s; a new GPT on the GPU and loading it 0.05 s; the bf16 snapshot <1 ms; 0.67 GB to
pageable RAM at 10.1 GB/s 0.07 s; the fingerprint 0.02 s: about 0.45 s an expert, so 90
experts (30.1B parameters) in about 40 s. The disk write-back of the experts beyond the RAM
tier (about 19 x 0.67 GB at 1.05 GB/s, 12 s) runs on the store's I/O thread meanwhile.
Verification reads 71 experts from RAM (0.07 s each) and 19 from disk (0.55 s each): ~15 s.
"""
import json
import math
import os
import shutil
import sys
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from gmlib import atomic  # noqa: E402
from gmlib.checkpoint import load_state_tensors, state_tensors  # noqa: E402
from gmlib.data import TokenShards, WindowSampler  # noqa: E402
from gmlib.model import GPT, make_config  # noqa: E402
from gmlib.paths import work_dir  # noqa: E402
from pipeline.runlog import device_name, git_commit  # noqa: E402
from gmlib.store import ExpertStore, buffer_bytes  # noqa: E402
from gmlib.train import Trainer, TrainConfig, make_optimizer  # noqa: E402
from offload import log, parse, synthetic_shards  # noqa: E402  (bench/offload.py: the same command line and log lines)

GB = 1e9


@dataclass
class Config:
    preset: str = "350m"
    seq_len: int = 0              # 0: the preset's
    target_params: float = 30e9   # experts = ceil(target / params per expert)
    steps: int = 4                # AdamW steps per expert
    batch: int = 8
    lr: float = 3e-4
    ram_gb: float = 48.0          # RAM tier budget; the rest goes to disk
    gpu_slots: int = 2
    time_limit: float = 420.0     # seconds: stop training in time to verify and write the JSON
    compile: int = 0              # a few steps per expert do not repay compiling
    shards: str = ""              # a shard root with train/; empty: random tokens written beside the store
    store: str = ""               # empty: work/bench_scale/store
    fresh: int = 0                # 1: delete the store and progress first
    seed: int = 0


def peak_rss_gb() -> float:
    """Peak resident memory of this process (VmHWM), pinned and pageable alike."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024 / GB
    return float("nan")


def fingerprint(tensors: dict) -> int:
    """An exact integer of the bf16 bits of every tensor: sum of (bits + 32768) * (i % 65521 + 1)
    over elements, in int64 on the tensors' device (no overflow below 2^63 for 4e9 elements)."""
    total = 0
    for k in sorted(tensors):
        bits = tensors[k].to(torch.bfloat16).reshape(-1).view(torch.int16).to(torch.int64) + 32768
        w = torch.arange(bits.numel(), device=bits.device, dtype=torch.int64) % 65521 + 1
        total += int((bits * w).sum())
    return total


def main(argv=None):
    out, cfg = parse(Config, __doc__, argv)
    t_start = time.perf_counter()
    cuda = torch.cuda.is_available()
    device = torch.device("cuda" if cuda else "cpu")
    if cuda:
        torch.backends.cuda.matmul.allow_tf32 = True
    mcfg = make_config(cfg.preset, **({"seq_len": cfg.seq_len} if cfg.seq_len else {}))
    T, n_experts = mcfg.seq_len, math.ceil(cfg.target_params / mcfg.n_params)
    names = [f"e{i:03d}" for i in range(n_experts)]
    root = Path(cfg.store) if cfg.store else work_dir("bench_scale") / "store"
    progress_path = root.parent / f"{root.name}.progress.json"
    if cfg.fresh:
        shutil.rmtree(root, ignore_errors=True)
        progress_path.unlink(missing_ok=True)
    key = {k: v for k, v in asdict(cfg).items() if k in ("preset", "seq_len", "steps", "batch", "lr", "shards", "seed")}
    key["loop"] = "gmlib.train.Trainer"  # progress of the older hand-written loop is not reused
    progress = json.loads(progress_path.read_text()) if progress_path.is_file() else {"key": key, "done": {}}
    if progress["key"] != key:
        raise SystemExit(f"{progress_path}: made with {progress['key']}, not {key}; pass --fresh 1 to start over")
    # only experts with a copy on disk survived the previous call
    progress["done"] = {n: v for n, v in progress["done"].items() if (root / n / "manifest.json").is_file()}

    torch.manual_seed(cfg.seed)
    with torch.device(device):
        model = GPT(mcfg)
    # the Trainer's settings: a short cosine from lr, no warm-up (a few steps an expert), a loss logged every step
    tcfg = TrainConfig(max_steps=cfg.steps, batch_size=cfg.batch, lr=cfg.lr, min_lr=cfg.lr / 10, warmup_steps=0,
                       eval_every=0, log_every=1, compile=bool(cfg.compile), device=str(device))
    opt = make_optimizer(model, tcfg, device)
    one = buffer_bytes(state_tensors(model), dtype=torch.bfloat16)
    ram_bytes = max(int(cfg.ram_gb * GB), one)
    expect_disk = max(0, n_experts - ram_bytes // one) * one
    free_disk = shutil.disk_usage(root.parent if root.parent.exists() else Path.cwd()).free
    log(f"{n_experts} experts of {cfg.preset} ({mcfg.n_params / 1e6:.1f}M params, {one / GB:.2f} GB in bf16) = "
        f"{n_experts * mcfg.n_params / 1e9:.2f}B params; RAM tier {ram_bytes / GB:.1f} GB, "
        f"disk about {expect_disk / GB:.1f} GB of {free_disk / GB:.1f} GB free; {len(progress['done'])} done before")
    if expect_disk > 0.9 * free_disk:
        raise SystemExit(f"not enough free disk under {root.parent}: need about {expect_disk / GB:.1f} GB; "
                         "raise --ram-gb")
    store = ExpertStore(root, ram_bytes=ram_bytes, gpu_bytes=cfg.gpu_slots * one, device=device, pin=False)

    data = Path(cfg.shards) if cfg.shards else synthetic_shards(root.parent / f"{root.name}.data", mcfg.vocab_size,
                                                                 64, 4 * T, cfg.seed)
    shards = TokenShards(data / "train")

    def train_expert(i: int) -> dict:
        torch.manual_seed(cfg.seed * 100003 + i)
        with torch.device(device):
            fresh = GPT(mcfg)  # initialised on the GPU
        # into the one model, in place; no optim.* tensors: a new expert's AdamW state starts empty
        load_state_tensors(model, opt, {f"model.{k}": v for k, v in fresh.state_dict().items()})
        del fresh
        seed = cfg.seed * 100003 + i  # each expert its own batches
        tr = Trainer(model, replace(tcfg, seed=seed), WindowSampler(shards, T, cfg.batch, seed=seed), optimizer=opt)
        tr.run(progress=False)
        losses = tr.history["loss"]
        weights = state_tensors(model)
        fp = fingerprint(weights)  # of the bf16 weights the store is about to keep
        store.put(names[i], state_tensors(model, opt), meta={"expert": i, "steps": cfg.steps, "fingerprint": str(fp)},
                  dtype=torch.bfloat16, keep_optimizer=False)
        return {"fingerprint": str(fp), "loss_first": float(losses[0]), "loss_last": float(losses[-1])}

    # ---- train
    per_expert, trained, stopped_early = [], 0, False
    t_train = time.perf_counter()
    for i, name in enumerate(names):
        if name in progress["done"]:
            continue
        elapsed = time.perf_counter() - t_start
        est = (sum(per_expert) / len(per_expert)) if per_expert else 5.0
        remaining_verify = 0.1 * n_experts + 0.6 * expect_disk / one + 20  # seconds, generous
        if elapsed + 2 * est + remaining_verify > cfg.time_limit:
            stopped_early = True
            log(f"stopping before {name}: {elapsed:.0f} s used of {cfg.time_limit:.0f}")
            break
        t0 = time.perf_counter()
        progress["done"][name] = train_expert(i)
        per_expert.append(time.perf_counter() - t0)
        trained += 1
        atomic.write_json(progress_path, progress)
        if trained % 10 == 1 or i == n_experts - 1:
            log(f"{name}: {per_expert[-1]:.2f} s, loss {progress['done'][name]['loss_last']:.3f}, "
                f"RAM peak {peak_rss_gb():.1f} GB, {len(store.resident('ram'))} experts in RAM")
    if cuda:
        torch.cuda.synchronize()
    train_s = time.perf_counter() - t_train
    opt.state.clear()  # the last expert's AdamW state: not needed any more

    # ---- verify: every expert read back, bit-identical to its fingerprint
    t_verify = time.perf_counter()
    in_ram = set(store.resident("ram"))
    bad, verified = [], 0
    for name in sorted(progress["done"]):
        if time.perf_counter() - t_start > cfg.time_limit:
            log("out of time while verifying")
            break
        if name in in_ram:
            tensors, _ = store.get(name)            # RAM -> GPU slot
        else:
            tensors, _ = store.read(name)           # disk, CRC-32 checked, bypassing the tiers
            tensors = {k: v.to(device) for k, v in tensors.items()}
        ok = str(fingerprint(tensors)) == progress["done"][name]["fingerprint"]
        verified += 1
        if not ok:
            bad.append(name)
            log(f"MISMATCH: {name}")
        del tensors
    verify_s = time.perf_counter() - t_verify
    # spot check: every version file
    disk_problems = store.verify(sorted(n for n in progress["done"] if n not in in_ram)[:5])
    s = store.summary()
    disk_bytes = sum(p.stat().st_size for p in root.rglob("*.safetensors"))

    done = len(progress["done"])
    result = {
        "total_params": done * mcfg.n_params, "experts": done, "experts_planned": n_experts,
        "expert_params": mcfg.n_params, "steps_per_expert": cfg.steps, "tokens_per_expert": cfg.steps * cfg.batch * T,
        "complete": done == n_experts and not bad and verified == done,
        "trained_this_call": trained, "stopped_early": stopped_early,
        "verified": verified, "mismatched": bad, "disk_problems": disk_problems,
        "in_ram": len(in_ram), "on_disk": sum((root / n / "manifest.json").is_file() for n in progress["done"]),
        "peak_gpu_gb": torch.cuda.max_memory_allocated() / GB if cuda else None,
        "peak_gpu_reserved_gb": torch.cuda.max_memory_reserved() / GB if cuda else None,
        "peak_ram_gb": peak_rss_gb(), "ram_tier_gb": ram_bytes / GB,
        "disk_gb": disk_bytes / GB, "expert_store_gb": one / GB,
        "fp32_adam_gb_would_be": done * mcfg.n_params * 12 / GB,
        "seconds_per_expert": train_s / trained if trained else None,
        "train_s": train_s, "verify_s": verify_s, "wall_s": time.perf_counter() - t_start,
        "store": {k: s[k] for k in ("bytes_to_ram", "bytes_to_disk", "bytes_from_disk", "bytes_to_dev", "copy_s",
                                    "disk_write_s", "disk_read_s", "put_s", "evictions", "allocs", "corrupt")},
        "source": "gmlib.train.Trainer", "device": device_name(), "torch": torch.__version__, "commit": git_commit(),
        "cpu_count": os.cpu_count(), "config": asdict(cfg),
    }
    store.close(flush=False)  # RAM copies are not written out: the disk holds about 60 GB at most
    atomic.write_json(out, result)
    log(f"{done} experts, {result['total_params'] / 1e9:.2f}B params, "
        f"{result['seconds_per_expert'] or 0:.2f} s/expert, "
        f"peak GPU {result['peak_gpu_gb'] or 0:.1f} GB, RAM {result['peak_ram_gb']:.1f} GB, "
        f"disk {result['disk_gb']:.1f} GB, "
        f"verified {verified}, mismatches {len(bad)} -> {out}")
    json.dump({k: v for k, v in result.items() if k not in ("config", "store")}, sys.stdout, indent=1, default=str)
    print()


if __name__ == "__main__":
    main()
