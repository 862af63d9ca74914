"""A plan of notebook (and benchmark) jobs, run over the machine's GPUs, one job per GPU at a time
(scripts/run_experiment.py is its command line).

A plan (YAML) names the run and lists jobs in priority order:

  run_name: experiment
  jobs:
    - {name: dense124m, notebook: "03", params: params/experiment/03_dense124m.yaml, tag: dense124m}
    - {name: evaluate, notebook: "05", params: params/experiment/05_evaluate.yaml, needs: [dense124m]}
    - {name: speed, command: "python bench/train_speed.py --variants 124m-b32"}

A notebook job runs scripts/run_notebooks.py for one notebook with one params file (and --tag);
a command job runs its command. A job starts once every job it `needs` has succeeded and a GPU
is free (the first ready job in plan order takes it); it sees that GPU alone (CUDA_VISIBLE_DEVICES),
so each training run is charged one GPU's seconds, as if it had the machine to itself. A job whose
needs failed is skipped. A job may also wait until others have ended, however they ended (`after`):
two parts of one evaluation that write the same files run one after the other, and the second runs
even if the first failed. A notebook job may take parameters from what an earlier job measured
(`params_from`): {tokens: dense30m.tokens} passes `-p tokens <results/<run_name>/metrics.json's
dense30m.tokens>`, so a gm trains exactly the tokens its dense baseline reached in its seconds; list
that job in `needs`. A notebook job may also set parameters of its own over its params file (`set`):
{seed_fraction: 0.75, train_top_r: 2} passes `-p seed_fraction 0.75 -p train_top_r 2`, so the variants of
one gm share one params file. Without GPUs the jobs run one at a time on the CPU.

A job may span several GPUs (`nproc: N`): it waits until N GPUs are free (jobs after it in plan
order do not jump ahead of it), sees those N, and runs through torch.distributed.run with N
processes, one per GPU. A notebook-03 job runs its command-line twin scripts/train_dense.py (the
same parameters and record; dense data parallelism, gmlib.train's DDP); a command job runs its
Python script under torch.distributed.run (scripts/train_gm.py: gm with one rank per GPU, each its
own experts). Without GPUs the N processes share the CPU (gloo): the rehearsal of a multi-GPU plan.
Every job is told how many GPUs the machine has (GM_MACHINE_GPUS), so the records it writes name
the machine (pipeline.runlog.device_name), also for an evaluation that runs on one of them.

The record, results/<run_name>/schedule.json, is rewritten at every start and end: each job's
command, GPU, start, end, seconds and status; every job's output goes to results/<run_name>/logs/.
A rerun skips the jobs that already succeeded as they are written now (a job whose entry in the plan
changed runs again; --force runs every job again): the notebooks resume their own training, so an
interrupted plan is continued by running it again.
"""
import json
import os
import shlex
import subprocess
import sys
import time
from pathlib import Path

import yaml

from gmlib import atomic
from gmlib.paths import REPO_ROOT as REPO, results_dir

KEYS = {"name", "notebook", "params", "tag", "command", "needs", "after", "params_from", "set", "nproc"}
TWINS = {"03": "scripts/train_dense.py"}  # the notebooks that have a command line for torch.distributed.run


def load_plan(path: Path) -> dict:
    """The plan, checked: unique names, one of notebook/command per job, needs that exist and come first."""
    try:
        plan = yaml.safe_load(Path(path).read_text())
    except (OSError, yaml.YAMLError) as e:
        raise ValueError(f"{path}: cannot read the plan: {e}") from None
    if not isinstance(plan, dict) or not plan.get("run_name") or not isinstance(plan.get("jobs"), list):
        raise ValueError(f"{path}: a plan needs run_name and a list of jobs")
    seen = set()
    for i, job in enumerate(plan["jobs"]):
        where = f"{path}: job {i + 1} ({job.get('name') if isinstance(job, dict) else job!r})"
        if not isinstance(job, dict) or not job.get("name"):
            raise ValueError(f"{where}: a job is a mapping with a name")
        if bad := sorted(set(job) - KEYS):
            raise ValueError(f"{where}: unknown keys {bad}; known: {sorted(KEYS)}")
        if job["name"] in seen:
            raise ValueError(f"{where}: the name is used twice")
        if ("notebook" in job) == ("command" in job):
            raise ValueError(f"{where}: give either a notebook or a command")
        if "notebook" in job and not (REPO / job.get("params", "")).is_file():
            raise ValueError(f"{where}: params file {job.get('params')!r} not found")
        src = job.get("params_from", {})
        if not isinstance(src, dict) or ("command" in job and src) or \
                not all(isinstance(v, str) and v.count(".") == 1 for v in src.values()):
            raise ValueError(f"{where}: params_from maps a notebook's parameter to 'model.field' of metrics.json")
        if not isinstance(job.get("set", {}), dict) or ("command" in job and job.get("set")):
            raise ValueError(f"{where}: set maps a notebook's parameter to its value")
        nproc = job.get("nproc", 1)
        if not isinstance(nproc, int) or isinstance(nproc, bool) or nproc < 1:
            raise ValueError(f"{where}: nproc is a number of processes (GPUs), at least 1")
        if nproc > 1 and "notebook" in job and str(job["notebook"]) not in TWINS:
            raise ValueError(f"{where}: nproc > 1 runs a command line under torch.distributed.run; notebook "
                             f"{job['notebook']} has none (only {sorted(TWINS)}: {sorted(TWINS.values())})")
        if nproc > 1 and "command" in job and shlex.split(job["command"])[0] not in ("python", "python3"):
            raise ValueError(f"{where}: nproc > 1 needs a command that runs a Python script (python script.py ...)")
        if both := sorted(set(job.get("set", {})) & set(src)):
            raise ValueError(f"{where}: {both} given by both set and params_from; keep one")
        for key in ("needs", "after"):
            if missing := [n for n in job.get(key, []) if n not in seen]:
                raise ValueError(f"{where}: {key} {missing}, which no earlier job is")
        seen.add(job["name"])
    return plan


def measured(job: dict, run_name: str) -> dict:
    """The job's params_from values, read from results/<run_name>/metrics.json (ValueError if missing)."""
    if not job.get("params_from"):
        return {}
    path = results_dir(run_name) / "metrics.json"
    metrics = json.loads(path.read_text()) if path.is_file() else {}
    out = {}
    for name, src in job["params_from"].items():
        model, field = src.split(".")
        if field not in metrics.get(model, {}):
            raise ValueError(f"params_from {name}: {path} has no {src}")
        out[name] = metrics[model][field]
    return out


def command(job: dict, run_name: str, values: dict | None = None) -> list[str]:
    """The job's argv; `values` are the params_from parameters (shown as <model.field> when None)."""
    nproc = job.get("nproc", 1)
    launch = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}"]
    if "command" in job:
        argv = shlex.split(job["command"])
        if nproc > 1:
            return launch + argv[1:]
        return [sys.executable if argv[0] in ("python", "python3") else argv[0], *argv[1:]]
    if nproc > 1:
        argv = launch + [str(REPO / TWINS[str(job["notebook"])]), "--run-name", run_name,
                         "-f", str(REPO / job["params"])]
    else:
        argv = [sys.executable, str(REPO / "scripts" / "run_notebooks.py"), "--run-name", run_name,
                "--only", str(job["notebook"]), "-f", str(REPO / job["params"])]
    for name, value in job.get("set", {}).items():
        argv += ["-p", name, json.dumps(value)]
    for name, src in job.get("params_from", {}).items():
        argv += ["-p", name, json.dumps(values[name]) if values is not None else f"<{src}>"]
    # train_dense.py names its record by model_name (what a tag is in every plan); the notebooks take --tag
    return argv + (["--tag", job["tag"]] if job.get("tag") and nproc == 1 else [])


def gpu_slots(gpus) -> list[str]:
    if gpus is not None:
        return [str(g) for g in gpus] or ["cpu"]
    import torch
    return [str(i) for i in range(torch.cuda.device_count())] or ["cpu"]


def run_plan(plan: dict, slots: list[str], force: bool = False, poll_s: float = 1.0, log=print) -> dict:
    """Run the plan's jobs over the slots (GPU indices, or ["cpu"]); returns the schedule record."""
    out = results_dir(plan["run_name"])
    (out / "logs").mkdir(exist_ok=True)
    path = out / "schedule.json"
    old = json.loads(path.read_text())["jobs"] if path.is_file() else {}
    jobs = {j["name"]: j for j in plan["jobs"]}
    rec = {"run_name": plan["run_name"], "slots": slots, "jobs": {}}
    for name, job in jobs.items():  # a job that succeeded as it is written now is not run again
        done = not force and old.get(name, {}).get("status") == "ok" and old[name].get("job", job) == job
        rec["jobs"][name] = old[name] if done else {"status": "pending"}
    running, free = {}, list(slots)
    gpus = [s for s in slots if s != "cpu"]

    def width(name):  # the slots a job takes: its nproc GPUs, or the one CPU slot
        return jobs[name].get("nproc", 1) if gpus else 1

    def save():
        atomic.write_json(path, rec)

    def status(n):
        return rec["jobs"][n]["status"]

    def skip(name):
        rec["jobs"][name] = {"status": "skipped", "reason": "a job it needs did not succeed"}
        log(f"[skip] {name}")

    save()
    while True:
        for name, job in jobs.items():  # skip what can no longer run
            if status(name) == "pending" and any(status(n) in ("failed", "skipped") for n in job.get("needs", [])):
                skip(name)
        ready = [n for n, j in jobs.items()
                 if status(n) == "pending" and all(status(d) == "ok" for d in j.get("needs", []))
                 and all(status(d) in ("ok", "failed", "skipped") for d in j.get("after", []))]
        while ready and free:
            if width(ready[0]) > len(slots):  # can never run here
                name = ready.pop(0)
                rec["jobs"][name] = {"status": "failed", "command": shlex.join(command(jobs[name], plan["run_name"])),
                                     "reason": f"needs {width(name)} GPUs; this machine has {len(gpus)}"}
                save()
                log(f"[failed] {name}: needs {width(name)} GPUs")
                continue
            if width(ready[0]) > len(free):  # the first in line waits for its GPUs; nothing overtakes it
                break
            name = ready.pop(0)
            taken, free = free[:width(name)], free[width(name):]
            slot = ",".join(taken)
            env = {**os.environ, "PYTHONUNBUFFERED": "1", "CUDA_VISIBLE_DEVICES": "" if slot == "cpu" else slot,
                   "GM_MACHINE_GPUS": str(len(gpus))}
            if jobs[name].get("nproc", 1) > 1:  # NCCL without NVLink multicast (the shared hosts' rule)
                env.setdefault("NCCL_NVLS_ENABLE", "0")
                env.setdefault("TORCH_SYMM_MEM_DISABLE_MULTICAST", "1")
            logf = open(out / "logs" / f"{name}.log", "w")
            try:
                argv = command(jobs[name], plan["run_name"], measured(jobs[name], plan["run_name"]))
                proc = subprocess.Popen(argv, cwd=REPO, env=env, stdout=logf, stderr=subprocess.STDOUT)
            except (OSError, ValueError) as e:  # a command that does not exist, a measurement missing:
                logf.close()                    # this job fails, the plan goes on
                free = taken + free
                rec["jobs"][name] = {"status": "failed", "command": shlex.join(command(jobs[name], plan["run_name"])),
                                     "reason": str(e)}
                save()
                log(f"[failed] {name}: {e}")
                continue
            running[name] = (proc, slot, logf, time.time())
            rec["jobs"][name] = {"status": "running", "gpu": slot, "command": shlex.join(argv), "job": jobs[name],
                                 "start": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
            save()
            log(f"[start] {name} on {slot}")
        if not running:  # nothing runs and nothing could start: what is left waits on a failure
            for name in jobs:
                if status(name) == "pending":
                    skip(name)
            save()
            break
        time.sleep(poll_s)
        for name, (proc, slot, logf, t0) in list(running.items()):
            if proc.poll() is None:
                continue
            logf.close()
            del running[name]
            free += slot.split(",")
            rec["jobs"][name].update(status="ok" if proc.returncode == 0 else "failed", rc=proc.returncode,
                                     end=time.strftime("%Y-%m-%dT%H:%M:%S%z"), seconds=round(time.time() - t0, 1))
            save()
            log(f"[{rec['jobs'][name]['status']}] {name} on {slot} after {time.time() - t0:.0f} s")
    return rec
