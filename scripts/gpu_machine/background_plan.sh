#!/usr/bin/env bash
# Run an experiment plan (scripts/run_experiment.py) in the background on a GPU machine that is
# reached one command at a time and whose copy of this repository may be re-synchronised between
# commands: data, checkpoints and results all live under $GM_ROOT (default /root/gm), outside the
# copy, and each `watch` packs the results so far, so a lost machine loses nothing that finished.
#
#   bash scripts/gpu_machine/background_plan.sh stage ARCHIVE [PART2..]  # unpack a tar.xz of work/data's shards/ and tokenizer.*
#                                                                         # (given in parts, in order, when the archive and the
#                                                                         # working tree exceed one call's 64 MiB: split -b 30M)
#   bash scripts/gpu_machine/background_plan.sh start PLAN [WHEELS] [RAW] # PLAN (or PLAN1,PLAN2,... run in order; A1,A2+B1: the
#                                                                         # groups on either side of + run at the same time, each
#                                                                         # in its own process), offline wheels (optional), raw
#                                                                         # data dir with parus/ and reviews/ (optional), an
#                                                                         # import check, then the plans under setsid
#   bash scripts/gpu_machine/background_plan.sh watch SECONDS OUT.tgz     # wait for the plan to end (at most SECONDS), pack results
#
# Make the archive here with:  (cd work/data && tar cf - shards tokenizer.model tokenizer.json | xz -6 -T2) > ARCHIVE   # about 54 MB
# and the wheels with ../shared/tools/gpu-wheels.sh WHEELS, then add ftfy and wcwidth (data_prep.clean):
#   python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp -d WHEELS ftfy wcwidth
set -euo pipefail
ROOT=${GM_ROOT:-/root/gm}
REPO=$(cd "$(dirname "$0")/../.." && pwd)
SITE=$ROOT/site
export GM_WORK_DIR=$ROOT/work GM_RESULTS_DIR=$ROOT/results GM_DATA_DIR=$ROOT/raw
export PYTHONPATH=$SITE:$REPO PYTHONUNBUFFERED=1
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1

plan_state() {  # "done" when the plan's schedule has no pending or running job, else a one-line summary
  python3 - "$GM_RESULTS_DIR" <<'EOF'
import json, sys, pathlib
files = list(pathlib.Path(sys.argv[1]).glob("**/schedule.json"))  # run names may nest: frontier/b1
jobs = {n: j["status"] for f in files for n, j in json.loads(f.read_text())["jobs"].items()}
live = [n for n, s in jobs.items() if s in ("pending", "running")]
print("done" if files and not live else " ".join(f"{n}:{s}" for n, s in jobs.items()) or "no schedule yet")
EOF
}

case ${1:-} in
  stage)
    [ -n "${2:-}" ] || { echo "stage: give the archive (or its parts, in order)" >&2; exit 2; }
    mkdir -p "$GM_WORK_DIR/data"
    cat "${@:2}" | tar xJf - -C "$GM_WORK_DIR/data"
    ls "$GM_WORK_DIR/data" ;;
  start)
    [ -n "${2:-}" ] || { echo "start: give the plan(s)" >&2; exit 2; }
    for p in ${2//[,+]/ }; do [ -f "$p" ] || { echo "start: no plan file $p" >&2; exit 2; }; done
    if [ -n "${3:-}" ]; then
      python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$SITE" "$3"/*.whl
    fi
    if [ -n "${4:-}" ]; then mkdir -p "$GM_DATA_DIR" && cp -r "$4"/. "$GM_DATA_DIR"/; fi
    # Fail now, not minutes into the plan, if a module the notebooks import is missing (2026-11-28:
    # 06 needs ftfy through data_prep.clean, which the wheel set lacked, and failed after the training).
    cd "$REPO"
    python3 -c "import importlib, pkgutil, gmlib, pipeline, papermill, ipykernel, data_prep.clean
[importlib.import_module(m.name) for p in (gmlib, pipeline) for m in pkgutil.iter_modules(p.__path__, p.__name__ + '.')]" \
      || { echo "start: a module the plan's notebooks import is missing here: add its wheel to ${3:-WHEELS}" >&2; exit 4; }
    mkdir -p "$GM_RESULTS_DIR"
    # One process per group of plans (groups split by +, so that small jobs of one budget fill the GPU while
    # another budget's job compiles or evaluates); plan.pid holds one pid a line, logs plan.log, plan-2.log, ...
    rm -f "$ROOT/plan.pid"
    i=1
    IFS=+ read -ra groups <<< "$2"
    for g in "${groups[@]}"; do
      plans=$(for p in ${g//,/ }; do realpath "$p"; done)   # a group's plans, comma-separated: run in order
      log=$ROOT/plan.log; [ "$i" -gt 1 ] && log=$ROOT/plan-$i.log
      # shellcheck disable=SC2086  (one path per plan, no spaces)
      setsid nohup python3 scripts/run_experiment.py $plans > "$log" 2>&1 < /dev/null &
      echo $! >> "$ROOT/plan.pid"
      echo "started:" $plans "(log $log)"
      i=$((i + 1))
    done ;;
  watch)
    # A machine given back between calls comes back bare: say so at once instead of waiting out
    # SECONDS of device time (2026-11-28: 560 s were spent watching nothing).
    if [ ! -f "$ROOT/plan.pid" ]; then
      echo "watch: no plan was started on this machine ($ROOT/plan.pid missing): it is a fresh one;" \
           "stage and start again" >&2
      exit 3
    fi
    end=$((SECONDS + ${2:?seconds}))
    # stop early when the plans' process has ended (all done, or crashed with jobs left); not on a schedule
    # that says done, since the next plan of a list may not have written its own yet
    alive() { for pid in $(cat "$ROOT/plan.pid"); do kill -0 "$pid" 2>/dev/null && return 0; done; return 1; }
    while [ $SECONDS -lt "$end" ] && alive; do
      sleep 10
    done
    plan_state
    for log in "$ROOT"/plan*.log; do
      if [ -f "$log" ]; then echo "== $(basename "$log")"; tail -n 12 "$log"; fi
    done
    tar czf "${3:?out.tgz}" -C "$ROOT" results $(cd "$ROOT" && ls plan*.log 2>/dev/null) ;;
  *)
    sed -n 2,15p "$0"; exit 2 ;;
esac
