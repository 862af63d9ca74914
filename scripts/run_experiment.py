"""Run a plan of notebook (and benchmark) jobs over the machine's GPUs, one job per GPU at a time.

  python scripts/run_experiment.py params/experiment/plan.yaml            # every GPU it sees
  python scripts/run_experiment.py params/experiment/plan.yaml --gpus 0 1 # these GPUs
  python scripts/run_experiment.py params/experiment/plan.yaml --dry-run  # print the commands
  python scripts/run_experiment.py params/frontier/plan_b1.yaml params/frontier/plan_b3.yaml  # one plan after another

The plan format, the scheduling and the record: pipeline/plan.py.
"""
import argparse
import shlex
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from pipeline import plan as plan_format  # noqa: E402
from pipeline.plan import command, gpu_slots, load_plan, run_plan  # noqa: E402


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__ + "\n" + plan_format.__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("plan", type=Path, nargs="+", help="plan files, run one after the other")
    ap.add_argument("--gpus", nargs="*", help="GPU indices to use (default: all visible; none: the CPU)")
    ap.add_argument("--force", action="store_true", help="run again the jobs that already succeeded")
    ap.add_argument("--dry-run", action="store_true", help="print each job's command and exit")
    args = ap.parse_args(argv)
    try:
        plans = [load_plan(p) for p in args.plan]
    except ValueError as e:
        sys.exit(str(e))
    if args.dry_run:
        for plan in plans:
            for job in plan["jobs"]:
                after = f"  after {job['after']}" if job.get("after") else ""
                gpus = f"  on {job['nproc']} GPUs" if job.get("nproc", 1) > 1 else ""
                print(f"{job['name']}: {shlex.join(command(job, plan['run_name']))}  "
                      f"needs {job.get('needs', [])}{after}{gpus}")
        return
    bad = []
    for plan in plans:  # a plan whose jobs failed does not stop the next one
        rec = run_plan(plan, gpu_slots(args.gpus), force=args.force)
        bad += [f"{plan['run_name']}:{n}" for n, j in rec["jobs"].items() if j["status"] != "ok"]
    sys.exit(f"jobs not done: {bad}" if bad else 0)


if __name__ == "__main__":
    main()
