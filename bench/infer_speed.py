"""Generation speed: the gm mixture (k experts, a KV cache each) against one expert of the same size.

  python bench/infer_speed.py                                   # CPU, tiny experts
  python bench/infer_speed.py --device cuda --size 124m --dtype bf16 --new-tokens 256

Experts are random-weight GPTs of one preset size (speed does not depend on the weights).
Every model generates `--new-tokens` tokens after a `--prompt-len` token prompt, batch size 1,
through gmlib.mixture's generate(); the time includes the prompt's prefill, and the best of
`--repeats` runs counts. Decoding is greedy by default: the mixture samples once per token from
its mixed distribution, so sampling costs the same for one expert and for k, and random
weights give unrealistically flat distributions whose top-p sort would dominate a tiny model's
time (pass --temperature 0.8 --top-p 0.9 to include it).
Expectation: a k-expert mixture does k forward passes per token, so about 1/k of the single
expert's tokens/s, less the mixing and sampling overhead (which this measures).
Writes JSON (default results/bench/infer_speed.json).
"""
import argparse
import platform
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from gmlib import atomic  # noqa: E402
from gmlib.mixture import MixtureConfig, SingleLM, from_models  # noqa: E402
from gmlib.model import GPT, make_config  # noqa: E402
from gmlib.paths import REPO_ROOT  # noqa: E402


def timed(lm, prompt, n, repeats, device, temperature, top_p):
    times = []
    for _ in range(repeats):
        if device.type == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        out = lm.generate(prompt, n, temperature=temperature, top_p=top_p, seed=0)
        if device.type == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
        assert len(out) == n
    return times


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--size", default="tiny", help="model preset (gmlib.model.PRESETS)")
    ap.add_argument("--vocab", type=int, default=32000)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--dtype", default="fp32", choices=["fp32", "bf16"])
    ap.add_argument("--ks", type=int, nargs="+", default=[2, 4])
    ap.add_argument("--prompt-len", type=int, default=32)
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--temperature", type=float, default=0.0, help="0: greedy")
    ap.add_argument("--top-p", type=float, default=1.0)
    ap.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: leave the default)")
    ap.add_argument("--out", type=Path, default=REPO_ROOT / "results" / "bench" / "infer_speed.json")
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)

    device = torch.device(args.device)
    cfg = make_config(args.size, vocab_size=args.vocab)
    if args.prompt_len + args.new_tokens > cfg.seq_len:
        sys.exit(f"prompt {args.prompt_len} + new tokens {args.new_tokens} exceed seq_len {cfg.seq_len}")
    dtype = torch.bfloat16 if args.dtype == "bf16" else torch.float32
    experts = []
    for e in range(max(args.ks)):
        torch.manual_seed(e)
        experts.append(GPT(cfg).to(device=device, dtype=dtype).eval())
    prompt = [1] + torch.randint(3, cfg.vocab_size, (args.prompt_len - 1,), generator=torch.Generator().manual_seed(0)).tolist()

    models = {"single": (1, SingleLM(experts[0]))}
    for k in args.ks:
        models[f"mixture_k{k}"] = (k, from_models(experts, cfg=MixtureConfig(k=k, eta=1.0)))
    SingleLM(experts[0]).generate(prompt, 4)  # warm-up (allocator, kernels)
    rows = []
    for name, (k, lm) in models.items():
        t = timed(lm, prompt, args.new_tokens, args.repeats, device, args.temperature, args.top_p)
        rows.append({"model": name, "k": k, "tokens_per_s": round(args.new_tokens / min(t), 2),
                     "seconds": [round(x, 4) for x in t]})
        print(f"{name:12s} k={k}  {rows[-1]['tokens_per_s']:9.1f} tokens/s  (best of {t})", flush=True)
    base = rows[0]["tokens_per_s"]
    for r in rows:
        r["relative_to_single"] = round(r["tokens_per_s"] / base, 3)
        r["relative_to_1_over_k"] = round(r["tokens_per_s"] / (base / r["k"]), 3)

    record = {
        "what": "generated tokens/s, batch 1, KV cache per expert, prefill included, best of repeats",
        "temperature": args.temperature, "top_p": args.top_p,
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else f"cpu ({platform.machine()}, {torch.get_num_threads()} threads)",
        "torch": torch.__version__, "size": args.size, "dtype": args.dtype, "config": cfg.__dict__,
        "expert_params": cfg.n_params, "prompt_len": args.prompt_len, "new_tokens": args.new_tokens,
        "repeats": args.repeats, "results": rows,
        "finished_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }
    atomic.write_json(args.out, record)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
