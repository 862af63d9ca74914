"""Does a gm GPT exported by gmlib.hf compute what transformers' LlamaForCausalLM computes from the folder?

  python bench/hf_parity.py                                    # CPU record: tiny, fp32 (seconds)
  python bench/hf_parity.py --config 124m --dtypes float32 bfloat16 --device cuda   # on a GPU (a minute)

A GPT of the preset with the gated MLP (activation="swiglu", vocab 32000) and random weights (its own
init, RMSNorm gains drawn from [0.5, 1.5] so that a misplaced gain would show) is exported, loaded by
AutoModelForCausalLM, and both score the same random token ids: the full context in one pass, then a
prompt of half the context followed by 16 tokens one at a time through each one's KV cache.
- float32: both models in fp32 (matmuls in full fp32: TF32 off);
- bfloat16: gm as it runs on a GPU (fp32 weights under bf16 autocast) against the folder exported in
  bf16 and loaded by transformers in bf16, the way a user would load it. Rounding differs (gm keeps
  fp32 weights and computes RoPE in fp32), so the difference is of bf16's size, not zero;
  `top1_agreement` says how often the two pick the same next token.
Records are merged into --out (default results/bench/hf_parity.json), one per (config, dtype, device).
"""
import argparse
import contextlib
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from train_speed import merge, results_dir  # noqa: E402


def compare(config: str, dtype_name: str, device: str, batch: int, seed: int = 0) -> dict:
    import torch
    import transformers
    from gmlib import hf
    from gmlib.model import GPT, make_config
    from pipeline.runlog import device_name, git_commit

    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    dtype = hf.DTYPES[dtype_name]
    cfg = make_config(config, vocab_size=32000, activation="swiglu")
    torch.manual_seed(seed)
    model = GPT(cfg)
    with torch.no_grad():
        for p in model.parameters():
            if p.ndim == 1:
                p.uniform_(0.5, 1.5)
    model = model.to(device).eval()
    ids = torch.randint(0, cfg.vocab_size, (batch, cfg.seq_len), generator=torch.Generator().manual_seed(seed + 1))
    ids = ids.to(device)
    bf16_autocast = dtype == torch.bfloat16 and device == "cuda"
    with tempfile.TemporaryDirectory() as tmp:
        folder = hf.export_gpt(model, Path(tmp) / "model", dtype=dtype)
        ref = transformers.AutoModelForCausalLM.from_pretrained(folder, dtype=dtype).to(device).eval()
    if dtype == torch.bfloat16 and device != "cuda":
        model = model.to(torch.bfloat16)  # no bf16 autocast off the GPU: gm in bf16 weights instead

    def ours(x, cache=None):
        with torch.autocast("cuda", torch.bfloat16) if bf16_autocast else contextlib.nullcontext():
            return model(x, cache=cache)[0].float()

    with torch.no_grad():
        t0 = time.perf_counter()
        a, b = ours(ids), ref(ids).logits.float()
        full_s = time.perf_counter() - t0
        half = cfg.seq_len // 2
        cache, past = model.new_cache(batch), transformers.DynamicCache()
        diffs = []
        for lo, hi in [(0, half)] + [(half + i, half + i + 1) for i in range(16)]:
            x = ids[:, lo:hi]
            out = ref(x, past_key_values=past, use_cache=True)
            past = out.past_key_values
            diffs.append((ours(x, cache) - out.logits.float()).abs().max().item())
    d = (a - b).abs()
    return {
        "config": config, "dtype": dtype_name, "device": device_name() if device == "cuda" else "cpu",
        "max_abs_logit_diff": d.max().item(), "mean_abs_logit_diff": d.mean().item(),
        "max_abs_logit_diff_cached": max(diffs), "top1_agreement": (a.argmax(-1) == b.argmax(-1)).float().mean().item(),
        "max_abs_logit": a.abs().max().item(), "tokens": batch * cfg.seq_len,
        "model_config": {"preset": config, **{k: getattr(cfg, k) for k in ("vocab_size", "seq_len", "n_layer", "n_head",
                                                                          "n_embd", "activation", "mlp_width")}},
        "params": cfg.n_params, "gm_mode": "bf16 autocast, fp32 weights" if bf16_autocast else dtype_name,
        "transformers": transformers.__version__, "torch": torch.__version__, "commit": git_commit(),
        "forward_s": round(full_s, 3), "date": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", default="tiny", help="gmlib.model preset (with activation=swiglu)")
    ap.add_argument("--dtypes", nargs="+", default=["float32"], choices=["float32", "bfloat16"])
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--batch", type=int, default=2)
    ap.add_argument("--out", type=Path, default=results_dir("bench") / "hf_parity.json")
    args = ap.parse_args(argv)
    for dt in args.dtypes:
        rec = compare(args.config, dt, args.device, args.batch)
        merge(args.out, {**rec, "variant": dt})
        print(f"-- {args.config} {dt} on {rec['device']}: max |logit diff| {rec['max_abs_logit_diff']:.3g} "
              f"(cached {rec['max_abs_logit_diff_cached']:.3g}, mean {rec['mean_abs_logit_diff']:.3g}, "
              f"top-1 agreement {rec['top1_agreement']:.4f}, max |logit| {rec['max_abs_logit']:.3g})", flush=True)


if __name__ == "__main__":
    main()
