"""Generation speed: the static decoder (gmlib.decode) against the reference generator, one model and
the k-expert mixture, batch 1 and batched.

  python bench/decode.py                                               # CPU, tiny experts (seconds)
  python bench/decode.py --device cuda --size 124m --dtype bf16 --new-tokens 256   # the issue's setting (one H200)

Experts are random-weight GPTs of one preset size (speed does not depend on the weights). Every variant
generates `--new-tokens` tokens greedily after a `--prompt-len` token prompt through the models' own
generate_many() (SingleLM, MixtureLM: the code users run), so the time includes routing, the prefill and
copying the weights into the decoder; the best of `--repeats` calls counts, after one warm-up call
(`first_call_s`: a new shape captures its CUDA graph there). Rows:
  reference   k=1 and k=2, batch 1   gmlib.mixture's reference engine (the generator before gmlib.decode)
  static      k=1 and k=2, batch 1   gmlib.decode, a CUDA graph per token on a GPU
  eager       k=1, batch 1           gmlib.decode with graphs=False (the graph's share of the gain)
  compiled    k=1, batch 1           gmlib.decode with compiled=True: torch.compile'd step in the graph
  static      k=1 and k=2, batch B   --batch prompts of --prompt-len/2 .. --prompt-len tokens at once
tokens_per_s counts new tokens of all rows of the batch; same_tokens_as_reference (batch 1) is how many
leading tokens equal the reference engine's (all in fp32; bf16 kernels that round apart may split near-ties);
split_logit_margin (k=1) is the reference forward's logit gap between the two tokens where they split.
Greedy: random weights give flat distributions
whose top-p sort would dominate a tiny model's time, and the sampler is the same host code for both
engines. Records merge into --out (default results/bench/decode.json), one per (model, k, batch, engine,
dtype, device); the CPU record is no GPU figure.
"""
import argparse
import json
import sys
import time
import warnings
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from gmlib import atomic, decode  # noqa: E402
from gmlib.lm import SingleLM  # noqa: E402
from gmlib.mixture import MixtureConfig, from_models  # noqa: E402
from gmlib.model import GPT, make_config  # noqa: E402
from gmlib.paths import results_dir  # noqa: E402
from pipeline.runlog import device_name, git_commit  # noqa: E402


def timed(call, device, repeats):
    """(first call's seconds, best of `repeats` later calls, the warnings they raised (a CUDA graph
    capture that failed and fell back to eager says so there), the last call's tokens)."""
    times = []
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for _ in range(repeats + 1):
            if device.type == "cuda":
                torch.cuda.synchronize()
            t0 = time.perf_counter()
            out = call()
            if device.type == "cuda":
                torch.cuda.synchronize()
            times.append(time.perf_counter() - t0)
    # deprecation notices of the libraries (torch.compile's first import raises one) say nothing about the run
    return times[0], min(times[1:]), sorted({str(w.message) for w in caught
                                             if not issubclass(w.category, DeprecationWarning)}), out


@torch.no_grad()
def split_margin(model, context: list[int], want: int, got: int) -> float:
    """Where a decoder's greedy tokens leave the reference's: the reference forward's logit of the reference's
    token minus that of the decoder's, after `context`. Near zero (bf16 logits are rounded to about 2^-8 of
    their size) is a near-tie that two kernel orders may split; a large margin points at a decoder bug."""
    logits, _ = model(torch.tensor([context], device=next(model.parameters()).device))
    return float(logits[0, -1, want].float() - logits[0, -1, got].float())


def merge(path: Path, rows: list[dict]):
    key = lambda r: (r["model"], r["k"], r["batch"], r["engine"], r["dtype"], r["device"])  # noqa: E731
    new = {key(r) for r in rows}
    old = json.loads(path.read_text()) if path.is_file() else []
    atomic.write_json(path, [r for r in old if key(r) not in new] + rows)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--size", default="tiny", help="model preset (gmlib.model.PRESETS)")
    ap.add_argument("--vocab", type=int, default=32000)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--dtype", default="fp32", choices=["fp32", "bf16"])
    ap.add_argument("--k", type=int, default=2, help="experts in the mixture rows")
    ap.add_argument("--prompt-len", type=int, default=32)
    ap.add_argument("--new-tokens", type=int, default=64, help="256 for the issue's setting (tiny's seq_len is 128)")
    ap.add_argument("--batch", type=int, default=32, help="prompts of the batched rows")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: leave the default)")
    ap.add_argument("--out", type=Path, default=None, help="default: results/bench/decode.json")
    args = ap.parse_args(argv)
    if args.k < 2:
        sys.exit("--k: the mixture rows need at least 2 experts")
    out = args.out or results_dir("bench") / "decode.json"
    if args.threads:
        torch.set_num_threads(args.threads)

    device = torch.device(args.device)
    cfg = make_config(args.size, vocab_size=args.vocab)
    if args.prompt_len + args.new_tokens > cfg.seq_len:
        sys.exit(f"prompt {args.prompt_len} + new tokens {args.new_tokens} exceed seq_len {cfg.seq_len}")
    dtype = torch.bfloat16 if args.dtype == "bf16" else torch.float32
    experts = []
    for e in range(args.k):
        torch.manual_seed(e)
        experts.append(GPT(cfg).to(device=device, dtype=dtype).eval())
    rng = np.random.default_rng(0)
    prompt = [1] + rng.integers(3, cfg.vocab_size, args.prompt_len - 1).tolist()
    batch = [[1] + rng.integers(3, cfg.vocab_size, int(n) - 1).tolist()
             for n in rng.integers(max(1, args.prompt_len // 2), args.prompt_len + 1, args.batch)]
    single, mixture = SingleLM(experts[0]), from_models(experts, cfg=MixtureConfig(k=args.k, eta=1.0))
    n, kw = args.new_tokens, dict(temperature=0.0)
    variants = [  # (k, engine, prompts, call)
        (1, "reference", [prompt], lambda: single.generate_many([prompt], n, engine="reference", **kw)),
        (1, "static", [prompt], lambda: single.generate_many([prompt], n, **kw)),
        (1, "eager", [prompt], lambda: decode.generate([experts[0]], [prompt], max_new_tokens=n, graphs=False, **kw)),
        (1, "compiled", [prompt], lambda: decode.generate([experts[0]], [prompt], max_new_tokens=n, compiled=True,
                                                          **kw)),
        (args.k, "reference", [prompt], lambda: mixture.generate_many([prompt], n, engine="reference", **kw)),
        (args.k, "static", [prompt], lambda: mixture.generate_many([prompt], n, **kw)),
        (1, "static", batch, lambda: single.generate_many(batch, n, **kw)),
        (args.k, "static", batch, lambda: mixture.generate_many(batch, n, **kw)),
    ]
    where = device_name() if device.type == "cuda" else f"cpu ({torch.get_num_threads()} threads)"
    common = {"dtype": args.dtype, "device": where,
              "commit": git_commit(), "torch": torch.__version__, "expert_params": cfg.n_params,
              "prompt_len": args.prompt_len, "new_tokens": n, "greedy": True,
              "date": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
    rows, ref_toks = [], {}
    for k, engine, prompts, call in variants:
        first, best, warned, toks = timed(call, device, args.repeats)
        if engine == "reference":
            ref_toks[k] = toks[0]
        # batch 1: how many leading tokens equal the reference's (all of them in fp32; bf16 kernels may round apart)
        same = next((i for i, (a, b) in enumerate(zip(toks[0], ref_toks[k])) if a != b), len(toks[0])) \
            if len(prompts) == 1 else None
        margin = split_margin(experts[0], prompt + ref_toks[k][:same], ref_toks[k][same], toks[0][same]) \
            if k == 1 and same is not None and same < len(toks[0]) else None  # the mixture's: not computed
        rows.append({"model": args.size, "k": k, "engine": engine, "batch": len(prompts),
                     "cuda_graph": engine in ("static", "compiled") and device.type == "cuda"
                     and not any("CUDA graph capture failed" in w for w in warned), "warnings": warned,
                     "same_tokens_as_reference": same, "split_logit_margin": margin,
                     "tokens_per_s": round(len(prompts) * n / best, 2), "seconds": round(best, 4),
                     "first_call_s": round(first, 4), **common})
        print(f"{args.size} k={k} {engine:9s} batch {len(prompts):3d}: {rows[-1]['tokens_per_s']:10.1f} tokens/s "
              f"(best {best:.3f} s, first call {first:.3f} s)", flush=True)
    ref = {r["k"]: r["tokens_per_s"] for r in rows if r["engine"] == "reference"}
    one = {(r["engine"], r["batch"]): r["tokens_per_s"] for r in rows if r["k"] == 1}
    for r in rows:
        r["relative_to_reference"] = round(r["tokens_per_s"] / ref[r["k"]], 3)  # same k, batch 1, reference engine
        r["relative_to_single"] = round(r["tokens_per_s"] / one[(r["engine"], r["batch"])], 3) \
            if (r["engine"], r["batch"]) in one else None
    merge(out, rows)
    print(f"wrote {out}")
    return rows


if __name__ == "__main__":
    main()
