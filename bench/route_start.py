"""How the mixture should treat the start of a document, measured: bits per byte of a gm's
mixture for several `MixtureConfig.route_from` (the first prefix the router reads; before it
every expert with a uniform prior), k = 1 and 2, on evenly spaced test documents.

  python bench/route_start.py --work work/demo --gm gm --docs 50
(the tiny CPU demo's gm; gmlib.mixture's docstring quotes what it measured.)
"""
import argparse
import math
from pathlib import Path

import sentencepiece as spm

from gmlib import eval_docs, evaluate, serve


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--work", type=Path, required=True, help="work/<run>: tokenizer.model, shards/test, gm/<name>")
    ap.add_argument("--gm", default="gm")
    ap.add_argument("--docs", type=int, default=50)
    ap.add_argument("--route-from", type=int, nargs="*", default=[1, 8, 32, 64, 256])
    ap.add_argument("--reroute-every", type=int, default=256)
    args = ap.parse_args(argv)
    sp = spm.SentencePieceProcessor(model_file=str(args.work / "tokenizer.model"))
    docs = eval_docs.docs_from_shards(args.work / "shards" / "test", sp, max_docs=args.docs)
    load = serve.mixture_loader(args.work / "gm")
    nbytes = sum(d.nbytes for d in docs)
    for k in (1, 2):
        for rf in args.route_from:
            lm = load({"run": args.gm, "k": k, "route_from": rf, "reroute_every": args.reroute_every}, "cpu")
            bits = evaluate.doc_nats(lm, docs).sum() / math.log(2)
            print(f"k={k} route_from={rf:4d}: bpb {bits / nbytes:.4f}", flush=True)


if __name__ == "__main__":
    main()
