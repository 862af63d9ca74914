"""Cleaning and tokenization throughput of data_prep, in MB of text per CPU-second (one core).

  python bench/data_throughput.py                       # 1 MB from each corpus source
  python bench/data_throughput.py --mb-per-source 0.2 --out /tmp/t.json

The sample is fixed: the first N MB of raw text of every corpus source (the last document cut
at a line). Each step runs in this one process and is timed with CPU time (time.process_time),
so the numbers are per core and do not depend on how busy the other cores are; wall time is
reported too. Cleaning counts raw bytes in; tokenization counts the cleaned bytes it encodes.
The tokenizer is work/<data>/tokenizer.model when it exists (the real 32k one), else a
temporary one trained on the sample (its vocabulary size is recorded).
"""
import argparse
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from data_prep import clean, dedup, residual, sources, tokenizer  # noqa: E402
from data_prep.prepare import _limited  # noqa: E402
from gmlib import atomic  # noqa: E402


def timed(fn, items):
    t0, w0 = time.process_time(), time.time()
    out = [fn(x) for x in items]
    return out, time.process_time() - t0, time.time() - w0


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--mb-per-source", type=float, default=1.0)
    ap.add_argument("--data-name", default="data", help="use work/<data-name>/tokenizer.model if present")
    ap.add_argument("--out", type=Path, default=REPO / "results" / "bench" / "data_throughput.json")
    args = ap.parse_args(argv)

    raw = []
    for s in sources.CORPUS:
        role = sources.SOURCES[s].role
        recs = sources.read_source(s)
        raw += [(role, t) for _, t in _limited(recs, s, int(args.mb_per_source * 1e6))]
    raw_bytes = sum(len(t.encode("utf-8")) for _, t in raw)
    cfgs = {r: clean.CleanConfig().for_role(r) for r in sources.ROLES}

    steps = {}
    texts, steps["normalize"], _ = timed(lambda rt: clean.normalize(rt[1]), raw)
    texts, steps["protect_code"], _ = timed(lambda t: clean.protect_code(t), texts)  # markers for code blocks
    texts = [(r, t, c) for (r, _), (t, c) in zip(raw, texts)]
    texts, steps["strip_markup"], _ = timed(
        lambda rtc: (rtc[0], clean.strip_markup(rtc[1], cfgs[rtc[0]]), rtc[2]), texts)
    texts, steps["clean_lines"], _ = timed(
        lambda rtc: (rtc[0], clean.restore_code(clean.clean_lines(rtc[1], cfgs[rtc[0]])[0], rtc[2])), texts)
    rules, steps["doc_filter"], _ = timed(lambda rt: clean.doc_filter(rt[1], rt[0], cfgs[rt[0]]), texts)
    texts = [t for _, t in texts]
    kept = [t for t, r in zip(texts, rules) if r is None]
    _, steps["residual_scan"], _ = timed(residual.scan, kept)
    hasher = dedup.MinHasher()
    _, steps["minhash"], _ = timed(lambda t: (dedup.exact_key(t), hasher.signature(t)), kept)
    clean_cpu = sum(steps.values())
    kept_bytes = sum(len(t.encode("utf-8")) for t in kept)

    model = Path(os.environ.get("GM_WORK_DIR", REPO / "work")) / args.data_name / "tokenizer.model"
    tmp = None
    if not model.is_file():
        tmp = tempfile.TemporaryDirectory()
        model = Path(tmp.name) / "tok.model"
        tokenizer.train(kept, model, tokenizer.TokenizerConfig(vocab_size=8000, num_threads=1))
    sp = tokenizer.load(model)
    ids, tok_cpu, tok_wall = timed(sp.encode, kept)
    n_tokens = sum(map(len, ids))

    result = {
        "sample": {"sources": len(sources.CORPUS), "mb_per_source": args.mb_per_source, "docs": len(raw),
                   "raw_mb": round(raw_bytes / 1e6, 3), "kept_docs": len(kept), "kept_mb": round(kept_bytes / 1e6, 3)},
        "cleaning_mb_s_per_core": round(raw_bytes / 1e6 / clean_cpu, 3),
        "cleaning_steps_mb_s_per_core": {k: round(raw_bytes / 1e6 / v, 2) for k, v in steps.items()},
        "cleaning_cpu_share": {k: round(v / clean_cpu, 3) for k, v in steps.items()},
        "tokenization_mb_s_per_core": round(kept_bytes / 1e6 / tok_cpu, 3),
        "tokenizer": {"path": str(model.relative_to(REPO)) if tmp is None else "temporary (trained on the sample)",
                      "vocab_size": sp.get_piece_size(), "bytes_per_token": round(kept_bytes / n_tokens, 3)},
        "machine": {"cpu": _cpu_name(), "cores": os.cpu_count(), "load_avg_1m": os.getloadavg()[0],
                    "python": platform.python_version()},
        "measured_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }
    atomic.write_json(args.out, result)
    print(json.dumps(result, indent=2, ensure_ascii=False))


def _cpu_name():
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


if __name__ == "__main__":
    main()
