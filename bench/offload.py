"""Swap overhead of the expert store: a schedule of experts that do not all fit on the GPU,
each trained for a segment of S real AdamW steps while the next one is prefetched.

Every expert (weights + AdamW state, fp32) lives in the store's pinned-RAM tier; the GPU tier
has `slots` slots, fewer than the experts. A segment is:
    prefetch(next); S training steps; put(current); get(next); copy it into the model
so the next expert's host-to-device copy (and the current one's way back) runs on a side
stream while the GPU trains. Recorded: the caller's wall time blocked in the store (wait_s)
against the schedule's wall time, and, as an end-to-end check, the schedule's wall time
against the same number of steps without any swapping (baseline_step_s).

  GPU machine (about 2-3 minutes on an H100):
      python bench/offload.py results/bench/offload.json
  CPU smoke test (seconds):
      python bench/offload.py /tmp/offload.json --preset tiny --batch 2 --seq-len 64 --steps 2 \
          --rounds 1 --baseline-steps 2 --compile 0

Prediction (H100, 124m = 110M params, batch 16x1024, S=40, 3 GPU slots, 8 experts x 3 rounds):
an expert with its Adam state is 1.32 GB, 25 ms each way at the 54 GB/s measured for pinned
memory, against a segment of about 40 x 30 ms = 1.2 s of training: the copies hide entirely,
and the visible cost is the device-to-device snapshot and load (about 1 ms each) plus the
host's launches, so overhead_frac well under 1%; copy_gb_s 45-54 GB/s.
"""
import argparse
import inspect
import json
import sys
import time
from dataclasses import asdict, dataclass, fields
from pathlib import Path

import torch

from gmlib import atomic
from gmlib.checkpoint import load_state_tensors, state_tensors
from gmlib.model import GPT, make_config
from gmlib.paths import work_dir
from gmlib.runlog import device_name, git_commit
from gmlib.store import ExpertStore, buffer_bytes

H100_PINNED_GB_S = 54.0   # BRIEF.md section 5
H100_PEAK_FLOPS = 989e12  # bf16 dense


@dataclass
class Config:
    preset: str = "124m"
    seq_len: int = 0          # 0: the preset's
    experts: int = 8
    slots: int = 3            # GPU tier size, in experts
    rounds: int = 3           # passes over all experts
    steps: int = 40           # S: optimizer steps per segment
    batch: int = 16
    lr: float = 3e-4
    compile: int = 1
    baseline_steps: int = 80
    shards: str = ""          # a token shard folder (gmlib.data); empty: random tokens
    store: str = ""           # store folder; empty: work/bench_offload/store
    seed: int = 0


def parse(config_cls, doc: str) -> tuple[Path, object]:
    """The command line of a bench script: the JSON file to write, then one --flag per field
    of its Config dataclass, typed and defaulted by the field. bench/scale.py uses it too."""
    p = argparse.ArgumentParser(description=doc.split("\n")[0])
    p.add_argument("out", type=Path, help="JSON file to write")
    for f in fields(config_cls):
        p.add_argument("--" + f.name.replace("_", "-"), type=type(f.default), default=f.default)
    a = p.parse_args()
    return a.out, config_cls(**{f.name: getattr(a, f.name) for f in fields(config_cls)})


def log(*msg):
    print(time.strftime("%H:%M:%S"), *msg, flush=True)


def batches(cfg: Config, vocab: int, T: int, device):
    """An endless iterator of (x, y) on the device."""
    if cfg.shards:
        from gmlib.data import TokenShards, WindowSampler
        sampler, step = WindowSampler(TokenShards(cfg.shards), T, cfg.batch, seed=cfg.seed), 0
        while True:
            x, y = sampler.batch(step)
            step += 1
            yield torch.from_numpy(x).to(device, non_blocking=True), torch.from_numpy(y).to(device, non_blocking=True)
    g = torch.Generator(device=device).manual_seed(cfg.seed)
    while True:
        buf = torch.randint(0, vocab, (cfg.batch, T + 1), device=device, generator=g)
        yield buf[:, :-1], buf[:, 1:]


def init_expert(model: GPT, opt, seed: int):
    """Fresh weights (the model's own initialisation, seeded) and no optimizer state."""
    torch.manual_seed(seed)
    with torch.device(model.wte.weight.device):
        fresh = GPT(model.cfg)
    model.load_state_dict(fresh.state_dict())
    opt.state.clear()


def main():
    out, cfg = parse(Config, __doc__)
    cuda = torch.cuda.is_available()
    device = torch.device("cuda" if cuda else "cpu")
    if cuda:
        torch.backends.cuda.matmul.allow_tf32 = True
    mcfg = make_config(cfg.preset, **({"seq_len": cfg.seq_len} if cfg.seq_len else {}))
    T = mcfg.seq_len
    torch.manual_seed(cfg.seed)
    model = GPT(mcfg).to(device)
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, betas=(0.9, 0.95), weight_decay=0.1, fused=cuda)
    fwd = torch.compile(model) if cfg.compile else model
    lean = "return_logits" in inspect.signature(GPT.forward).parameters
    data = batches(cfg, mcfg.vocab_size, T, device)

    def train(n: int):
        for _ in range(n):
            x, y = next(data)
            with torch.autocast(device.type, dtype=torch.bfloat16):
                _, loss = fwd(x, y, return_logits=False) if lean else fwd(x, y)
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
        return loss

    names = [f"e{i:03d}" for i in range(cfg.experts)]
    root = Path(cfg.store) if cfg.store else work_dir("bench_offload") / "store"
    log(f"{cfg.experts} experts of {cfg.preset} ({mcfg.n_params / 1e6:.1f}M params), device {device_name()}")

    # the size of one expert: weights + AdamW state after one step
    init_expert(model, opt, 0)
    t0 = time.perf_counter()
    train(1).item()
    log(f"first step (compile) {time.perf_counter() - t0:.1f} s")
    expert_bytes = sum(t.numel() * t.element_size() for t in state_tensors(model, opt).values())
    slot = buffer_bytes(state_tensors(model, opt))  # the same plus alignment padding
    store = ExpertStore(root, ram_bytes=(cfg.experts + 1) * slot, gpu_bytes=cfg.slots * slot, device=device)

    # baseline: the same segments on one expert, no store
    train(2)
    if cuda:
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    done = 0
    while done < cfg.baseline_steps:
        n = min(cfg.steps, cfg.baseline_steps - done)
        train(n).item()
        done += n
    baseline_step_s = (time.perf_counter() - t0) / max(done, 1)
    log(f"baseline {baseline_step_s * 1e3:.1f} ms/step")

    for i, name in enumerate(names):  # every expert: its own init and one step, so it has Adam state
        init_expert(model, opt, cfg.seed + 1 + i)
        train(1)
        store.put(name, state_tensors(model, opt), meta={"expert": i, "steps": 1})
    schedule = [n for _ in range(cfg.rounds) for n in names]
    base = store.summary()
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    log(f"schedule of {len(schedule)} segments x {cfg.steps} steps; GPU tier {cfg.slots} x {slot / 1e9:.2f} GB")

    t0 = time.perf_counter()
    tensors, meta = store.get(schedule[0])
    load_state_tensors(model, opt, tensors)
    losses = []
    for k, name in enumerate(schedule):
        nxt = schedule[k + 1] if k + 1 < len(schedule) else None
        if nxt:
            store.prefetch(nxt)
        loss = train(cfg.steps)
        meta["steps"] += cfg.steps
        store.put(name, state_tensors(model, opt), meta=meta)
        if nxt:
            tensors, meta = store.get(nxt)
            load_state_tensors(model, opt, tensors)
        losses.append(loss.item())  # one sync a segment, as a trainer that logs its loss
        if k % max(1, len(schedule) // 8) == 0:
            log(f"segment {k + 1}/{len(schedule)} {name} loss {losses[-1]:.3f}")
    s = store.summary()  # waits for the last copies
    wall_s = time.perf_counter() - t0

    delta = {k: s[k] - base[k] for k in ("bytes_to_dev", "bytes_to_ram", "bytes_snapshot", "copy_s", "get_s", "put_s")}
    steps = len(schedule) * cfg.steps
    tokens = steps * cfg.batch * T
    bytes_moved = delta["bytes_to_dev"] + delta["bytes_to_ram"]
    wait_s = delta["get_s"] + delta["put_s"]
    result = {
        "experts": cfg.experts, "expert_params": mcfg.n_params, "total_params": cfg.experts * mcfg.n_params,
        "expert_bytes": expert_bytes, "gpu_tier_bytes": store.dev.budget, "gpu_slots": cfg.slots,
        "ram_tier_bytes": store.ram.budget, "segments": len(schedule), "steps_per_segment": cfg.steps,
        "steps": steps, "tokens": tokens,
        "wait_s": wait_s, "get_wait_s": delta["get_s"], "put_s": delta["put_s"], "wall_s": wall_s,
        "overhead_frac": wait_s / wall_s,
        "baseline_step_s": baseline_step_s,
        "overhead_vs_baseline": wall_s / (steps * baseline_step_s) - 1,
        "bytes_moved": bytes_moved, "bytes_to_dev": delta["bytes_to_dev"], "bytes_to_ram": delta["bytes_to_ram"],
        "bytes_snapshot": delta["bytes_snapshot"], "copy_s": delta["copy_s"],
        "copy_gb_s": bytes_moved / delta["copy_s"] / 1e9 if delta["copy_s"] else None,
        "pinned_reference_gb_s": H100_PINNED_GB_S,
        "tok_s": tokens / wall_s,
        "mfu": tokens / wall_s * mcfg.flops_per_token() / H100_PEAK_FLOPS if cuda else None,
        "peak_gpu_gb": torch.cuda.max_memory_allocated() / 1e9 if cuda else None,
        "store_hits": s["hits"], "store_misses": s["misses"], "store_allocs": s["allocs"],
        "first_loss": losses[0], "last_loss": losses[-1],
        "device": device_name(), "torch": torch.__version__, "git_commit": git_commit(),
        "compiled": bool(cfg.compile), "config": asdict(cfg),
    }
    store.close(flush=False)
    atomic.write_json(out, result)
    log(f"overhead {result['overhead_frac']:.2%} (wait {wait_s:.3f} s of {wall_s:.1f} s), "
        f"vs baseline {result['overhead_vs_baseline']:+.2%}, copies {result['copy_gb_s'] or 0:.1f} GB/s -> {out}")
    json.dump({k: v for k, v in result.items() if k != "config"}, sys.stdout, indent=1, default=str)
    print()


if __name__ == "__main__":
    main()
