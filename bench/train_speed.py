"""Training speed of the expert engine: tokens/s, MFU and peak memory of gmlib.train.Trainer.

  python bench/train_speed.py                                  # CPU record: tiny, eager (a minute)
  python bench/train_speed.py --suite h100 --out $OUT/train_speed.json --budget-s 470
  python bench/train_speed.py --variants 124m-b32 350m-b16     # chosen variants only
  python bench/train_speed.py --list

What is timed is the real training step of gmlib.train (data sampling, host-to-device copy,
forward, loss, backward, gradient clipping, fused AdamW), on random tokens at vocab 32000,
after warm-up steps that include compilation. Each variant runs in its own process (a clean
compile, a fresh peak-memory count, an out-of-memory that cannot take the rest down) and is
written to --out as soon as it finishes, so a run cut short keeps what it measured.

MFU = tokens/s x flops_per_token / 989e12 (H100 SXM dense bf16 peak; H200 has the same),
where flops_per_token = 6N + 12·L·d·T (N all parameters, the tied embedding once; attention
scores and values counted over the full T x T, no causal halving; PaLM appendix B), the same
count the BRIEF's naive-GPT numbers use (110M: 545k tokens/s = 42.5%).

Records are merged into --out, replacing those with the same (config, variant, device).
"""
import argparse
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
from gmlib.paths import results_dir  # noqa: E402  (honours GM_RESULTS_DIR)

PEAK_FLOPS = 989e12
VOCAB = 32000

# name -> a gmlib.config preset plus overrides, in the flat names of TrainConfig and GPTConfig (model_size: the
# gmlib.model preset) that notebooks 03 and 04 take, beside two settings only this harness has: fp32_logits
# (the naive loss path) and inductor (torch._inductor.config flags). Suites list names in priority order
# (a time budget runs them until it is spent).
BASE = dict(model_size="124m", activation="gelu", seq_len=1024, fp32_logits=False, inductor={})
VARIANTS = {
    "124m-b32": dict(preset="compiled"),
    "350m-b16": dict(preset="compiled", model_size="350m", batch_size=16),
    "124m-b32-eager": dict(preset="compiled", compile=False),                 # what compile buys
    "124m-b16": dict(preset="compiled", batch_size=16),                       # what the micro-batch buys
    "124m-b32-fp32logits": dict(preset="compiled", fp32_logits=True),         # the naive loss path
    "124m-b32-relu2": dict(preset="compiled", activation="relu2"),
    "124m-b64": dict(preset="compiled", batch_size=64),
    "350m-b32": dict(preset="compiled", model_size="350m"),
    "350m-b16-relu2": dict(preset="compiled", model_size="350m", batch_size=16, activation="relu2"),
    "124m-b32-autotune": dict(preset="compiled", compile_mode="max-autotune-no-cudagraphs"),
    "124m-b32-coordtune": dict(preset="compiled", inductor={"coordinate_descent_tuning": True}),
    "350m-b16-autotune": dict(preset="compiled", model_size="350m", batch_size=16,
                              compile_mode="max-autotune-no-cudagraphs"),
    # SDPA through cuDNN's fused attention instead of FlashAttention-2 (faster on Hopper in NVIDIA's figures)
    "124m-b32-cudnn": dict(preset="compiled", sdpa="cudnn"),
    "124m-b32-relu2-cudnn": dict(preset="compiled", activation="relu2", sdpa="cudnn"),
    "350m-b16-cudnn": dict(preset="compiled", model_size="350m", batch_size=16, sdpa="cudnn"),
    "124m-b32-cudagraphs": dict(preset="compiled", compile_mode="reduce-overhead"),  # CUDA graphs: no launch gaps
    # FP8 training matmuls (gmlib.fp8): the output projection alone, or every matmul but attention's
    "124m-b32-relu2-cudnn-fp8head": dict(preset="fast", batch_size=32, fp8="head"),
    "124m-b32-relu2-cudnn-fp8": dict(preset="fast", batch_size=32, fp8="all"),
    "350m-b16-fp8": dict(preset="compiled", model_size="350m", batch_size=16, fp8="all"),
    # the measured gains stacked (preset "fast"): batch 64 (+2.2% alone), ReLU², cuDNN attention; with FP8
    "124m-b64-relu2-cudnn": dict(preset="fast"),
    "124m-b64-relu2-cudnn-fp8": dict(preset="fast", fp8="all"),
    # session 5, each aimed at a share of the profile: the residual stream in bf16 (the norms' and adds'
    # bytes), heads of 128 instead of 64 (the attention kernels), FP8 with a scale per row (casts that
    # fuse into their producers, unlike the tensorwise amax; measured slower), alone and stacked
    "124m-b64-relu2-cudnn-bf16res": dict(preset="fast", bf16_residual=True),
    "124m-b64-relu2-cudnn-h6": dict(preset="fast", n_head=6),
    "124m-b64-relu2-cudnn-h6-bf16res": dict(preset="fast", n_head=6, bf16_residual=True),
    "124m-b64-relu2-cudnn-h6-bf16res-fp8": dict(preset="fastest"),        # the README's fastest
    "124m-b64-relu2-cudnn-h6-bf16res-fp8row": dict(preset="fastest", fp8_scaling="row"),
    # the gated MLP (issue 15) on the fastest 124m stack: Llama's SwiGLU, width 2048 (the same parameters and
    # FLOPs as ReLU²'s 3072), one fused [gate; up] matmul; compare it with the line above in one call
    "124m-b64-swiglu-cudnn-h6-bf16res-fp8": dict(preset="fastest", activation="swiglu"),
    "350m-b16-relu2-cudnn-h8-bf16res": dict(preset="fast", model_size="350m", batch_size=16, n_head=8,
                                            bf16_residual=True),
    "350m-b16-relu2-cudnn-h8-bf16res-fp8row": dict(preset="fastest", model_size="350m", batch_size=16, n_head=8,
                                                   fp8_scaling="row"),
    "350m-b16-relu2-cudnn-h8-bf16res-fp8": dict(preset="fastest", model_size="350m", batch_size=16, n_head=8),
    "tiny-cpu": dict(preset="compiled", model_size="tiny", batch_size=8, compile=False, seq_len=128),
    "tiny-cpu-swiglu": dict(preset="compiled", model_size="tiny", batch_size=8, compile=False, seq_len=128,
                            activation="swiglu"),
    "tiny-cpu-bf16res-fp8row": dict(preset="compiled", model_size="tiny", batch_size=8, compile=False, seq_len=128,
                                    bf16_residual=True, fp8="all", fp8_scaling="row"),
}
SUITES = {
    "cpu": ["tiny-cpu"],
    "h100": ["124m-b32", "350m-b16", "124m-b32-eager", "124m-b16", "124m-b32-fp32logits", "124m-b32-relu2",
             "124m-b64", "350m-b32", "350m-b16-relu2", "124m-b32-autotune", "124m-b32-coordtune",
             "350m-b16-autotune"],
}
# rough seconds a variant needs on an H100 (process start, compile, warm-up, timing): skip what cannot fit
NEED_S = {"autotune": 240, "coordtune": 150, "eager": 30, "tiny-cpu": 40, "350m": 110, "cudagraphs": 100}


def need_seconds(name: str) -> int:
    return next((s for k, s in NEED_S.items() if k in name), 75)


def random_shards(root: Path, n_tokens: int = 1 << 22):
    """One shard folder of uniform random tokens: speed does not depend on the text."""
    import numpy as np
    from gmlib.data import ShardWriter
    with ShardWriter(root, vocab_size=VOCAB, sources=["random"]) as w:
        w.add(np.random.default_rng(0).integers(0, VOCAB, n_tokens))
    return root


def settings(name: str) -> dict:
    """A variant's flat settings: BASE, its preset, its overrides (later ones winning); the TrainConfig and
    GPTConfig fields it leaves out take the dataclasses' defaults."""
    from gmlib import config
    return {**BASE, **config.PRESETS[VARIANTS[name]["preset"]], **VARIANTS[name]}


def record_settings(v: dict) -> dict:
    """The settings in the records' own names (results/bench/*.json, written before the flat names)."""
    from gmlib.train import TrainConfig
    t = TrainConfig(**{k: v[k] for k in v if k in TrainConfig.__dataclass_fields__})
    return {"compile": t.compile, "mode": t.compile_mode, "activation": v["activation"],
            "fp32_logits": v["fp32_logits"], "inductor": v["inductor"], "sdpa": t.sdpa, "fp8": t.fp8,
            "fp8_scaling": t.fp8_scaling, "bf16_residual": t.bf16_residual, "config": v["model_size"],
            "batch": t.batch_size}


def build_trainer(name: str, shard_dir, val_dir=None, **train_overrides):
    """The variant's Trainer (and its settings, in the records' names, and model config), as timed here,
    profiled by train_profile.py and trained on real text by train_quality.py (which passes validation
    shards and a schedule)."""
    import torch
    from gmlib import config
    from gmlib.data import TokenShards, WindowSampler
    from gmlib.model import GPT, GPTConfig, make_config
    from gmlib.train import VAL_SEED, Trainer, TrainConfig

    flat = settings(name)
    for k, val in flat["inductor"].items():
        import torch._inductor.config as ic
        setattr(ic, k, val)
    cfg = make_config(flat["model_size"], vocab_size=VOCAB, **config.fields(flat, GPTConfig))
    run = dict(max_steps=10**9, eval_every=0, log_every=10**9, warmup_steps=10, device="auto")
    tc = TrainConfig(**{**config.fields(flat, TrainConfig), **run, **train_overrides})  # sdpa: Trainer sets it
    v = record_settings(flat)
    torch.manual_seed(0)
    val = WindowSampler(TokenShards(val_dir), cfg.seq_len, v["batch"], seed=VAL_SEED) if val_dir else None
    tr = Trainer(GPT(cfg), tc, WindowSampler(TokenShards(shard_dir), cfg.seq_len, v["batch"]), val)
    if v["fp32_logits"]:
        # the naive path: the compiled graph returns the full fp32 logits beside the loss
        model = tr.model
        tr.forward = torch.compile(lambda x, y, return_logits: model(x, y, return_logits=True), mode=v["mode"]) \
            if v["compile"] else (lambda x, y, return_logits: model(x, y, return_logits=True))
    return tr, v, cfg


def measure(name: str, shard_dir: str, seconds: float) -> dict:
    """Run in the child process: build, warm up, time; return one record."""
    import torch
    from pipeline.runlog import device_name, git_commit

    tr, v, cfg = build_trainer(name, shard_dir)
    cuda = tr.device.type == "cuda"
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    t0 = time.perf_counter()
    tr.run(steps=3, progress=False)                  # compile, autotune, allocator warm-up
    compile_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    tr.run(steps=3, progress=False)
    step_s = (time.perf_counter() - t0) / 3
    n = max(5, min(500, int(seconds / step_s)))
    t0 = time.perf_counter()
    tr.run(steps=n, progress=False)                  # ends with a device synchronisation
    dt = time.perf_counter() - t0
    tps = n * tr.tokens_per_step / dt
    fpt = cfg.flops_per_token()
    return {
        "config": v["config"], "variant": name, "params": cfg.n_params, "seq_len": cfg.seq_len, "batch": v["batch"],
        "tokens_per_s": round(tps, 1), "mfu": round(tps * fpt / PEAK_FLOPS, 4) if cuda else None,
        "achieved_tflops": round(tps * fpt / 1e12, 4),
        "peak_mem_gb": round(torch.cuda.max_memory_allocated() / 1e9, 2) if cuda else None,
        "device": device_name(), "torch": torch.__version__, "commit": git_commit(),
        "step_ms": round(1000 * dt / n, 2), "steps_timed": n, "compile_s": round(compile_s, 1),
        "flops_per_token": fpt, "flops_count": "6N + 12*L*d*T (N incl. tied embedding), peak 989e12 bf16",
        "settings": {k: v[k] for k in ("compile", "mode", "activation", "fp32_logits", "inductor", "sdpa", "fp8",
                                       "fp8_scaling", "bf16_residual")},
        "n_head": cfg.n_head, "mlp_width": cfg.mlp_width,
        "vocab": VOCAB, "load_avg_1m": round(os.getloadavg()[0], 2), "status": "ok",
        "date": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }


def run_child(name: str, shard_dir: Path, seconds: float, timeout: float) -> dict:
    cmd = [sys.executable, __file__, "--child", name, "--shards", str(shard_dir), "--seconds", str(seconds)]
    # own process group, so a timeout also ends the compile workers it started
    p = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:
        out, err = p.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(p.pid, signal.SIGKILL)
        p.communicate()
        return {"variant": name, "status": f"timeout after {timeout:.0f} s"}
    lines = [ln for ln in out.splitlines() if ln.startswith("{")]
    if p.returncode == 0 and lines:
        return json.loads(lines[-1])
    oom = "OutOfMemoryError" in err or "out of memory" in err
    return {"variant": name, "status": "oom" if oom else f"error (rc {p.returncode}): {err.strip()[-600:]}"}


def merge(path: Path, rec: dict, key_fields=("config", "variant", "device")):
    """Add rec to the records in path, replacing the one of the same measurement (key_fields)."""
    from gmlib import atomic
    records = json.loads(path.read_text()) if path.is_file() else []
    key = lambda r: tuple(r.get(f) for f in key_fields)  # noqa: E731
    records = [r for r in records if key(r) != key(rec)] + [rec]
    atomic.write_json(path, records)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--suite", default="cpu", choices=sorted(SUITES))
    ap.add_argument("--variants", nargs="*", help="run these variant names instead of a suite")
    ap.add_argument("--out", type=Path, default=results_dir("bench") / "train_speed.json")
    ap.add_argument("--budget-s", type=float, default=470, help="wall-clock budget for all variants")
    ap.add_argument("--seconds", type=float, default=8, help="timed seconds per variant (after warm-up)")
    ap.add_argument("--list", action="store_true")
    ap.add_argument("--child", help=argparse.SUPPRESS)
    ap.add_argument("--shards", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.child:
        print(json.dumps(measure(args.child, args.shards, args.seconds)))
        return
    if args.list:
        for k, v in VARIANTS.items():
            print(f"{k:22s} {settings(k)}")
        return
    names = args.variants or SUITES[args.suite]
    unknown = [n for n in names if n not in VARIANTS]
    if unknown:
        sys.exit(f"unknown variant(s) {unknown}; see --list")
    import torch
    from pipeline.runlog import device_name
    print(f"train_speed: {device_name()}, torch {torch.__version__}, variants {names}, budget {args.budget_s:.0f} s",
          flush=True)
    t_start = time.time()
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        shard_dir = random_shards(Path(tmp) / "shards")
        for name in names:
            left = args.budget_s - (time.time() - t_start)
            if left < need_seconds(name):
                print(f"-- {name}: skipped ({left:.0f} s left, needs about {need_seconds(name)} s)", flush=True)
                continue
            t0 = time.time()
            rec = run_child(name, shard_dir, args.seconds, timeout=left)
            rec["wall_s"] = round(time.time() - t0, 1)
            results.append(rec)
            if rec["status"] == "ok":
                merge(args.out, rec)
                mfu = f"{100 * rec['mfu']:.1f}% MFU" if rec["mfu"] is not None else "MFU n/a (cpu)"
                mem = f"{rec['peak_mem_gb']} GB" if rec["peak_mem_gb"] is not None else "-"
                print(f"-- {name}: {rec['tokens_per_s']:,.0f} tokens/s, {mfu}, peak {mem}, step {rec['step_ms']} ms, "
                      f"compile+warm-up {rec['compile_s']} s, wall {rec['wall_s']} s", flush=True)
            else:
                print(f"-- {name}: {rec['status']}", flush=True)
    print(f"\n{len([r for r in results if r['status'] == 'ok'])} variant(s) measured in {time.time() - t_start:.0f} s; "
          f"records merged into {args.out}")
    print(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
