"""Fused expert groups against one expert at a time: aggregate tokens/s, MFU, and per-expert losses.

  python bench/fused_experts.py --tiny                          # CPU check (seconds): tiny experts, fp32
  python bench/fused_experts.py --config 30m --experts 8 --batch 32 8 --group 8 4 2 \\
      --agree-steps 200 --budget-s 540 --out $OUT/fused_experts.json   # one H200 (about 8 minutes)

What is timed is the code gm runs. Sequential: one gmlib.train.Trainer (compiled on CUDA), the speed
of every expert when they train one after another (swaps aside: bench/offload.py). Fused:
gmlib.fused.GroupTrainer over G Trainers, the speed of a group; experts / G groups run one after
another at that speed. Both on synthetic text at vocab 32000 (phrases of 8 tokens drawn from a Zipf
law: the speed does not depend on the text, and the loss has somewhere to fall), after warm-up steps
that include compilation; torch._dynamo is reset between measurements, so each compiles for its own
shapes. One record per (config, batch, group_size, device), merged into --out; a combination that
does not fit in memory is recorded as "oom".

The agreement (--agree-steps N, at the first batch and group size): `experts` experts, each with its
own init, data order and learning rate, trained N steps in fused groups and one by one, in bf16
autocast on CUDA (fp32 on the CPU), with the same compile setting; the losses of every step are
compared per expert. Rounding differences grow in training as any change of kernel makes them grow,
so the yardstick is the same experts trained one by one eager against compiled (the same maths, other
kernels; on the CPU, where nothing is compiled, fp32 rounding against a floor of 1e-4). The record
says, per expert: the difference at step 1 (one forward, before any update: the forward's rounding
alone), the largest in the first 10 steps, the mean over the last 50, the yardstick's mean over the
last 50, and the first step where the difference passes 0.1 nats: a forward bug shows at step 1, an
optimizer or gradient bug within a few steps, an expert mixed up with another at once.

MFU = tokens/s x flops_per_token / 989e12 (H100/H200 dense bf16 peak), flops_per_token as in
bench/train_speed.py (6N + 12·L·d·T).
"""
import argparse
import gc
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
from gmlib.paths import results_dir  # noqa: E402  (honours GM_RESULTS_DIR)

PEAK_FLOPS = 989e12
DIVERGED = 0.1  # nats: far beyond bf16 rounding of a loss in the first steps


def zipf_shards(root: Path, vocab: int, n_tokens: int, seed: int = 0) -> Path:
    """Synthetic text: 8-token phrases (a book of 4096, random ids) drawn by a Zipf law."""
    from gmlib.data import ShardWriter
    rng = np.random.default_rng(seed)
    book = rng.integers(0, vocab, (4096, 8))
    p = 1.0 / np.arange(1, 4097)
    with ShardWriter(root, vocab_size=vocab, sources=["zipf"]) as w:
        w.add(book[rng.choice(4096, n_tokens // 8, p=p / p.sum())].ravel())
    return root


def make_trainers(args, cfg, shards, models, opts, experts, lrs, batch, steps, compile_, log_every=10**9):
    """One Trainer per model slot: expert experts[i] (its data seed) at learning rate lrs[i]."""
    from gmlib.data import TokenShards, WindowSampler
    from gmlib.train import Trainer, TrainConfig
    out = []
    for m, o, e, lr in zip(models, opts, experts, lrs):
        tc = TrainConfig(max_steps=steps, batch_size=batch, lr=lr, min_lr=lr / 10, warmup_steps=20, eval_every=0,
                         log_every=log_every, compile=compile_, device=str(args.device), seed=e)
        out.append(Trainer(m, tc, WindowSampler(TokenShards(shards), cfg.seq_len, batch, seed=e), optimizer=o))
    return out


def slots(cfg, n, device):
    """n GPT modules with their AdamW on the device: the slots experts borrow, as gmlib.gm_rank.Rank's."""
    from gmlib.model import GPT
    from gmlib.train import TrainConfig, make_optimizer
    models = [GPT(cfg).to(device) for _ in range(n)]
    return models, [make_optimizer(m, TrainConfig(), device) for m in models]


def timed(run, tokens_per_call, seconds, device):
    """Tokens/s of run(n) (n steps) after a warm-up of 3 + 3 steps that sizes n to `seconds`."""
    import torch
    run(3)
    t0 = time.perf_counter()
    run(3)
    step_s = (time.perf_counter() - t0) / 3
    n = max(3, min(500, int(seconds / step_s)))
    if device.type == "cuda":
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    run(n)  # Trainer.run and GroupTrainer.run end with a device synchronisation
    return n * tokens_per_call / (time.perf_counter() - t0)


def measure_sequential(args, cfg, shards, batch):
    """One expert's tokens/s at `batch` sequences a step: every expert's, when they train one at a time."""
    compile_ = args.device.type == "cuda" and not args.no_compile
    models, opts = slots(cfg, 1, args.device)
    one = make_trainers(args, cfg, shards, models, opts, [0], [args.lr], batch, 10**9, compile_)[0]
    return timed(lambda n: one.run(n, progress=False), batch * cfg.seq_len, args.seconds, args.device)


def measure_fused(args, cfg, shards, batch, G):
    """A fused group of G experts' aggregate tokens/s at `batch` sequences per expert and step."""
    from gmlib.fused import GroupTrainer
    compile_ = args.device.type == "cuda" and not args.no_compile
    models, opts = slots(cfg, G, args.device)
    trainers = make_trainers(args, cfg, shards, models, opts, range(G), [args.lr] * G, batch, 10**9, compile_)
    group = GroupTrainer(trainers)
    return timed(lambda n: group.run([n] * G), G * batch * cfg.seq_len, args.seconds, args.device)


def agreement(args, cfg, shards, batch, G, steps):
    """Per-expert loss curves of fused and one-by-one training (and the yardstick); see the docstring."""
    import torch
    from gmlib.checkpoint import load_state_tensors
    from gmlib.fused import GroupTrainer
    from gmlib.model import GPT
    t0, E, cuda = time.time(), args.experts, args.device.type == "cuda"
    lrs = [args.lr * (0.5 + g / max(1, E - 1)) for g in range(E)]   # each expert its own learning rate
    inits = []
    for g in range(E):
        torch.manual_seed(1000 + g)
        inits.append({f"model.{k}": v.clone() for k, v in GPT(cfg).state_dict().items()})
    compile_ = cuda and not args.no_compile

    def one_by_one(comp):
        models, opts = slots(cfg, 1, args.device)  # one model that every expert borrows in turn
        curves = []
        for g in range(E):
            load_state_tensors(models[0], opts[0], inits[g])  # no optim.* entries: a fresh AdamW
            tr = make_trainers(args, cfg, shards, models, opts, [g], lrs[g:g + 1], batch, steps, comp, 1)[0]
            tr.run(progress=False)
            curves.append(tr.history["loss"])
        return curves

    def fused():
        curves = []
        for g0 in range(0, E, G):
            members = list(range(g0, min(E, g0 + G)))
            models, opts = slots(cfg, len(members), args.device)
            for m, o, g in zip(models, opts, members):
                load_state_tensors(m, o, inits[g])
            trs = make_trainers(args, cfg, shards, models, opts, members, [lrs[g] for g in members], batch, steps,
                                compile_, 1)
            GroupTrainer(trs).run([steps] * len(trs))
            curves += [tr.history["loss"] for tr in trs]
        return curves

    seq, fus = np.array(one_by_one(compile_)), np.array(fused())
    ref = np.array(one_by_one(not compile_)) if cuda else seq
    d, dref, tail = np.abs(fus - seq), np.abs(ref - seq), min(50, steps)
    floor = 0.05 if cuda else 1e-4
    per = [{"expert": g, "lr": lrs[g], "loss_first": float(seq[g, 0]), "loss_last": float(seq[g, -1]),
            "diff_step1": float(d[g, 0]), "diff_max_first10": float(d[g, :10].max()),
            "diff_mean_last50": float(d[g, -tail:].mean()), "yardstick_mean_last50": float(dref[g, -tail:].mean()),
            "first_step_over_0.1": int(np.argmax(d[g] > DIVERGED)) + 1 if (d[g] > DIVERGED).any() else None}
           for g in range(E)]
    ok = all(p["diff_mean_last50"] <= max(3 * p["yardstick_mean_last50"], floor) and p["diff_step1"] <= floor
             for p in per)
    return {"steps": steps, "experts": E, "group_size": G, "batch": batch, "floor": floor, "agree": ok,
            "yardstick": "one by one, eager against compiled" if cuda else "none on the CPU: the floor alone",
            "max_diff": float(d.max()), "seconds": round(time.time() - t0, 1), "per_expert": per}


def report(rec: dict, cuda: bool):
    if rec["status"] != "ok":
        print(f"-- batch {rec['batch']}, group {rec['group_size']}: {rec['status']}", flush=True)
        return
    mfu = f", {100 * rec['mfu']:.1f}% MFU (one at a time {100 * rec['mfu_sequential']:.1f}%)" if cuda else ""
    print(f"-- batch {rec['batch']}, group {rec['group_size']}: fused {rec['tokens_per_s_fused']:,.0f} tokens/s, "
          f"one at a time {rec['tokens_per_s_sequential']:,.0f}: {rec['speedup']:.2f}x{mfu}, wall {rec['wall_s']} s",
          flush=True)
    if "agreement" in rec:
        a = rec["agreement"]
        print(f"   agreement over {a['steps']} steps: {'agree' if a['agree'] else 'DIFFER'}, max |diff| "
              f"{a['max_diff']:.3g}, {a['seconds']} s", flush=True)
        for p in a["per_expert"]:
            print(f"   expert {p['expert']}: step 1 {p['diff_step1']:.2e}, first 10 max {p['diff_max_first10']:.2e}, "
                  f"last 50 mean {p['diff_mean_last50']:.2e} (yardstick {p['yardstick_mean_last50']:.2e}), "
                  f"over {DIVERGED} at step {p['first_step_over_0.1']}", flush=True)


def merge(path: Path, rec: dict):
    from gmlib import atomic
    records = json.loads(path.read_text()) if path.is_file() else []
    key = lambda r: (r.get("config"), r.get("batch"), r.get("group_size"), r.get("device"))  # noqa: E731
    atomic.write_json(path, [r for r in records if key(r) != key(rec)] + [rec])


def main(argv=None) -> list[dict]:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", default="30m", help="gmlib.model preset of every expert")
    ap.add_argument("--experts", type=int, default=8)
    ap.add_argument("--batch", type=int, nargs="+", default=[32], help="sequences per expert and step (several: each)")
    ap.add_argument("--group", type=int, nargs="+", default=[8], help="group sizes to measure (each <= experts)")
    ap.add_argument("--seq-len", type=int, default=None, help="default: the preset's")
    ap.add_argument("--vocab", type=int, default=32000)
    ap.add_argument("--lr", type=float, default=3e-3)
    ap.add_argument("--seconds", type=float, default=6, help="timed seconds per measurement (after warm-up)")
    ap.add_argument("--agree-steps", type=int, default=0, help="loss agreement over N steps (0: none)")
    ap.add_argument("--budget-s", type=float, default=540, help="skip what would start after this much wall time")
    ap.add_argument("--no-compile", action="store_true")
    ap.add_argument("--device", default="auto")
    ap.add_argument("--tiny", action="store_true", help="CPU check: tiny experts, vocab 512, 3 experts, batch 4")
    ap.add_argument("--out", type=Path, default=results_dir("bench") / "fused_experts.json")
    args = ap.parse_args(argv)
    if args.tiny:
        args.config, args.experts, args.batch, args.vocab, args.seq_len = "tiny", 3, [4], 512, 64
        args.group = args.group if args.group != ap.get_default("group") else [3, 2]
        args.seconds = args.seconds if args.seconds != ap.get_default("seconds") else 0.5
        args.agree_steps = args.agree_steps or 12
    if bad := [g for g in args.group if not 1 < g <= args.experts]:
        sys.exit(f"--group {bad}: a group holds 2 .. experts ({args.experts}) experts")
    import torch
    from gmlib.model import make_config
    from pipeline.runlog import device_name, git_commit
    from gmlib.train import resolve_device
    args.device = resolve_device(args.device)
    cfg = make_config(args.config, vocab_size=args.vocab, **({"seq_len": args.seq_len} if args.seq_len else {}))
    cuda = args.device.type == "cuda"
    if cuda:
        torch.backends.cuda.matmul.allow_tf32 = True
    print(f"fused_experts: {device_name()}, {args.config} ({cfg.n_params:,} parameters), {args.experts} experts, "
          f"batch {args.batch}, groups {args.group}", flush=True)
    t_start, records, walls, seq = time.time(), [], [], {}
    with tempfile.TemporaryDirectory() as tmp:
        shards = zipf_shards(Path(tmp) / "shards", args.vocab, 1 << (18 if args.tiny else 22))
        for i, (batch, G) in enumerate((b, g) for b in args.batch for g in args.group):
            if time.time() - t_start + max(walls, default=0) > args.budget_s:
                print(f"-- batch {batch}, group {G}: skipped (would end past --budget-s)", flush=True)
                continue
            rec = {"config": args.config, "experts": args.experts, "expert_params": cfg.n_params, "group_size": G,
                   "batch": batch, "seq_len": cfg.seq_len, "vocab": args.vocab, "compile": cuda and not args.no_compile,
                   "device": device_name(), "torch": torch.__version__, "commit": git_commit(),
                   "date": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
            t0 = time.time()
            try:
                if batch not in seq:  # once per batch size; reset so that each measurement compiles its own shapes
                    torch._dynamo.reset()
                    seq[batch] = measure_sequential(args, cfg, shards, batch)
                torch._dynamo.reset()
                if cuda:
                    torch.cuda.reset_peak_memory_stats()
                fused, fpt = measure_fused(args, cfg, shards, batch, G), cfg.flops_per_token()
                rec.update(tokens_per_s_sequential=round(seq[batch], 1), tokens_per_s_fused=round(fused, 1),
                           speedup=round(fused / seq[batch], 3),
                           mfu=round(fused * fpt / PEAK_FLOPS, 4) if cuda else None,
                           mfu_sequential=round(seq[batch] * fpt / PEAK_FLOPS, 4) if cuda else None,
                           peak_mem_gb=round(torch.cuda.max_memory_allocated() / 1e9, 2) if cuda else None,
                           status="ok")
                if i == 0 and args.agree_steps:
                    rec["agreement"] = agreement(args, cfg, shards, batch, G, args.agree_steps)
            except torch.cuda.OutOfMemoryError:
                rec["status"] = "oom"
            gc.collect()
            if cuda:
                torch.cuda.empty_cache()
            rec["wall_s"] = round(time.time() - t0, 1)
            walls.append(rec["wall_s"] - rec.get("agreement", {}).get("seconds", 0))
            records.append(rec)
            merge(args.out, rec)
            report(rec, cuda)
    print(f"{len(records)} record(s) in {time.time() - t_start:.0f} s, merged into {args.out}")
    return records


if __name__ == "__main__":
    main()
