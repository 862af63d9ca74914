"""Export a model of a run as a Hugging Face folder that transformers loads offline.

  python scripts/export_hf.py demo best work/demo/hf/best          # the run's best exportable model
  python scripts/export_hf.py experiment dense30m OUT --dtype bfloat16
  python scripts/export_hf.py experiment gm_local-expert3 OUT      # one expert of a gm
  python scripts/export_hf.py experiment gm_local OUT --k 2        # the whole gm: every expert, router, settings

MODEL is a name of results/RUN/summary.json (05_evaluate's names) or a checkpoint under work/RUN/models/;
only a gated MLP (activation=swiglu) fits a Llama. A single model's folder loads with
AutoTokenizer/AutoModelForCausalLM.from_pretrained(OUT); a whole gm's with gmlib.hf.mixture_lm(OUT).
See gmlib/hf.py and gmlib/publish.py.
"""
import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # runs from a clone without installing

from gmlib import publish  # noqa: E402


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("run", help="run name: results/RUN and work/RUN")
    ap.add_argument("model", help='a model name of the run, or "best"')
    ap.add_argument("out", type=Path, help="the folder to write")
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    ap.add_argument("--k", type=int, default=None,
                    help="a whole gm's mixture top-k (default: the name's -k<k>, else 2)")
    args = ap.parse_args(argv)
    try:
        spec = publish.export(args.run, args.model, args.out, args.dtype, args.k)
    except (FileNotFoundError, ValueError) as e:
        sys.exit(f"export_hf: {e}")
    print(f"exported {spec['name']} ({spec['kind']}) of run {args.run} to {args.out}")


if __name__ == "__main__":
    main()
