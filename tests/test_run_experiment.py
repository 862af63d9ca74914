"""pipeline.plan (scripts/run_experiment.py): jobs start when their needs succeeded and a slot is free,
one job per slot, a failure skips what needs it, a rerun skips what succeeded; RunLog merges metrics
under a lock; scripts/gpu_machine/background_plan.sh runs plans in the background."""
import json
import multiprocessing as mp
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from pipeline import plan as scheduler
from pipeline.runlog import RunLog
from helpers import REPO, load_script


def job(name, code, needs=()):
    """A command job: a Python one-liner that appends '<name> <slot>' to the trace file."""
    return {"name": name, "command": f"python -c \"{code}\"", "needs": list(needs)}


TRACE = ("import os,time,sys; "
         "open(os.environ['TRACE'],'a').write('{name} start '+os.environ['CUDA_VISIBLE_DEVICES']+'\\n'); "
         "time.sleep({sleep}); "
         "open(os.environ['TRACE'],'a').write('{name} end\\n'); sys.exit({rc})")


def traced(name, sleep=0.3, rc=0, needs=()):
    return job(name, TRACE.format(name=name, sleep=sleep, rc=rc), needs)


@pytest.fixture
def env(tmp_path, monkeypatch):
    monkeypatch.setenv("GM_RESULTS_DIR", str(tmp_path / "results"))
    monkeypatch.setenv("TRACE", str(tmp_path / "trace.txt"))
    return tmp_path


def events(tmp_path):
    return (tmp_path / "trace.txt").read_text().split("\n")[:-1]


def test_needs_and_slots(env):
    plan = {"run_name": "t", "jobs": [traced("a", 0.6), traced("b", 0.2), traced("c", 0.1, needs=["a"]),
                                      traced("d", 0.1, needs=["b"])]}
    rec = scheduler.run_plan(plan, ["0", "1"], poll_s=0.05, log=lambda *_: None)
    assert {n: j["status"] for n, j in rec["jobs"].items()} == dict.fromkeys("abcd", "ok")
    ev = events(env)
    # a and b start at once on the two slots; d (needs b) runs before a ends; c only after a ends
    assert set(ev[:2]) == {"a start 0", "b start 1"}
    first = {e.rsplit(" ", 1)[0] if " start" in e else e: i for i, e in reversed(list(enumerate(ev)))}
    assert first["d start"] < first["a end"] < first["c start"] and ev[first["d start"]] == "d start 1"
    # never more jobs at once than slots
    live = 0
    for e in ev:
        live += 1 if " start " in e else -1
        assert live <= 2
    saved = json.loads((env / "results" / "t" / "schedule.json").read_text())
    assert saved["jobs"]["d"]["gpu"] == "1" and saved["jobs"]["a"]["seconds"] >= 0.5
    assert (env / "results" / "t" / "logs" / "a.log").is_file()


def test_failure_skips_dependents_and_rerun_skips_done(env):
    plan = {"run_name": "t", "jobs": [traced("a", 0.0, rc=3), traced("b", 0.0), traced("c", 0.0, needs=["a"]),
                                      traced("d", 0.0, needs=["c"]), {"name": "e", "command": "no-such-program-gm"},
                                      traced("f", 0.0, needs=["e"])]}
    rec = scheduler.run_plan(plan, ["cpu"], poll_s=0.02, log=lambda *_: None)
    assert {n: j["status"] for n, j in rec["jobs"].items()} == {"a": "failed", "b": "ok", "c": "skipped",
                                                               "d": "skipped", "e": "failed", "f": "skipped"}
    assert "no-such-program-gm" in rec["jobs"]["e"]["reason"]
    assert rec["jobs"]["a"]["rc"] == 3 and "c start" not in "".join(events(env))
    assert events(env)[0] == "a start "  # the CPU slot hides every GPU
    (env / "trace.txt").unlink()
    plan["jobs"][0] = traced("a", 0.0)  # fixed: a rerun runs a, c, d but not b again
    del plan["jobs"][4:]
    rec = scheduler.run_plan(plan, ["cpu"], poll_s=0.02, log=lambda *_: None)
    assert all(j["status"] == "ok" for j in rec["jobs"].values())
    assert [e.split()[0] for e in events(env) if " start" in e] == ["a", "c", "d"]
    (env / "trace.txt").unlink()
    plan["jobs"][1] = traced("b", 0.01)  # b written differently since it succeeded: it runs again, alone
    scheduler.run_plan(plan, ["cpu"], poll_s=0.02, log=lambda *_: None)
    assert [e.split()[0] for e in events(env) if " start" in e] == ["b"]


def test_after_waits_for_the_end_but_not_for_success(env):
    # two parts of one evaluation: the second waits for the first to end, and runs although it failed;
    # with two slots it would otherwise start at once
    b = {**traced("b", 0.0), "after": ["a"]}
    plan = {"run_name": "t", "jobs": [traced("a", 0.3, rc=1), b, {**traced("c", 0.0, needs=["a"]), "after": ["b"]}]}
    rec = scheduler.run_plan(plan, ["0", "1"], poll_s=0.02, log=lambda *_: None)
    assert {n: j["status"] for n, j in rec["jobs"].items()} == {"a": "failed", "b": "ok", "c": "skipped"}
    ev = events(env)
    assert [e.split()[:2] for e in ev] == [["a", "start"], ["a", "end"], ["b", "start"], ["b", "end"]]


@pytest.mark.parametrize("jobs, message", [
    ([{"name": "a", "command": "true"}, {"name": "a", "command": "true"}], "used twice"),
    ([{"name": "a"}], "either a notebook or a command"),
    ([{"name": "a", "command": "true", "needs": ["b"]}, {"name": "b", "command": "true"}], "no earlier job"),
    ([{"name": "a", "command": "true", "after": ["b"]}, {"name": "b", "command": "true"}], "after .* no earlier job"),
    ([{"name": "a", "notebook": "03", "params": "params/nope.yaml"}], "not found"),
    ([{"name": "a", "command": "true", "gpu": 1}], "unknown keys"),
    ([{"name": "a", "command": "true", "params_from": {"tokens": "d.tokens"}}], "params_from"),
    ([{"name": "d", "command": "true"}, {"name": "a", "notebook": "04", "params": "params/experiment/04_gm_local.yaml",
       "params_from": {"tokens": "d.tokens"}, "set": {"tokens": 5}, "needs": ["d"]}], "both set and params_from"),
    ([{"name": "a", "notebook": "04", "params": "params/experiment/04_gm_local.yaml",
       "params_from": {"tokens": "tokens"}}], "params_from"),
])
def test_bad_plans_are_refused(tmp_path, jobs, message):
    path = tmp_path / "plan.yaml"
    path.write_text(yaml.safe_dump({"run_name": "t", "jobs": jobs}))
    with pytest.raises(ValueError, match=message) as e:
        scheduler.load_plan(path)
    assert str(path) in str(e.value)


def test_committed_plan_is_valid():
    plan = scheduler.load_plan(REPO / "params" / "experiment" / "plan.yaml")
    cmd = scheduler.command(plan["jobs"][0], plan["run_name"])
    assert cmd[0] == sys.executable and "--tag" in cmd


@pytest.mark.parametrize("budget", ["b1", "b2", "b3", "b4", "b4x2"])
def test_frontier_plans_give_every_model_the_same_compute(tmp_path, budget):
    from gmlib.model import make_config
    plan = scheduler.load_plan(REPO / "params" / "frontier" / f"plan_{budget}.yaml")
    jobs = {j["name"]: j for j in plan["jobs"]}
    dense_file = yaml.safe_load((REPO / "params" / "frontier" / "03_dense.yaml").read_text())
    twin = {**dense_file, **jobs["dense30m"]["set"]}
    gms = [j for j in plan["jobs"] if j.get("notebook") == "04"]
    assert len(gms) >= 4 and {j["set"]["seed_fraction"] for j in gms} <= set(twin["branch_fractions"])  # seeds saved
    for j in gms:  # each gm's whole budget is what its twin trained, warmup and all
        assert j["params_from"] == {"tokens": "dense30m.tokens"} and j["set"]["warmup_steps"] == twin["warmup_steps"]
    argv = scheduler.command(gms[1], plan["run_name"])
    i = argv.index("seed_fraction")
    assert argv[i - 1:i + 2] == ["-p", "seed_fraction", "0.75"] and "<dense30m.tokens>" in argv
    # every dense model of the budget: the twin's 6ND compute to within 1%
    flops = lambda d: 6 * make_config(d["model_size"], vocab_size=32000).n_params * d["max_tokens"]  # noqa: E731
    dense = [{**dense_file, **j["set"]} for j in plan["jobs"] if j.get("notebook") == "03"]
    assert len(dense) >= 2 and all(abs(flops(d) / flops(twin) - 1) < 0.01 for d in dense)
    # every trained model is evaluated; an evaluation in parts merges each later part into the parts before it, in
    # order; the first part may score the twin alone (it comes early, so that a lost machine keeps a ledger row), every
    # later part scores all dense models (a merged part rescores every row against the best of them)
    evals = [j for j in plan["jobs"] if j.get("notebook") == "05"]
    trained = {j["name"] for j in plan["jobs"] if j.get("notebook") in ("03", "04")}
    assert set().union(*(e["needs"] for e in evals)) == trained and evals[0]["name"] == "evaluate"
    dense_names = {j["set"]["model_name"] for j in plan["jobs"] if j.get("notebook") == "03"}
    for i, ev in enumerate(evals):
        assert ev["set"]["budget"] == budget and ev["set"]["budget_flops_6nd"] == flops(twin)
        assert "dense30m" in ev["set"]["dense_models"] and (not i or set(ev["set"]["dense_models"]) == dense_names)
        assert not i or (ev["set"]["merge_earlier"] and evals[i - 1]["name"] in ev["after"] and ev["set"]["eval_name"])
        # 05 refuses experts alone of a gm it does not score (05_evaluate.yaml's default names one gm)
        eval_file = yaml.safe_load((REPO / ev["params"]).read_text())
        assert set({**eval_file, **ev["set"]}["gm_experts_alone"]) <= set(ev["set"]["gm_models"]), ev["name"]
    bad = tmp_path / "plan.yaml"
    bad.write_text(yaml.safe_dump({"run_name": "t", "jobs": [{"name": "a", "command": "true", "set": {"x": 1}}]}))
    with pytest.raises(ValueError, match="set maps"):
        scheduler.load_plan(bad)


def test_params_from_passes_what_an_earlier_job_measured(env):
    """A gm trains the tokens its dense baseline reached: the value comes from metrics.json at the
    job's start; while it is missing the job fails with the reason, and what needs it is skipped."""
    gm = {"name": "gm", "notebook": "04", "params": "params/experiment/04_gm_local.yaml", "tag": "gm",
          "params_from": {"tokens": "dense30m.tokens"}}
    assert "<dense30m.tokens>" in scheduler.command(gm, "t")  # the dry run's display
    plan = {"run_name": "t", "jobs": [gm, traced("after_gm", 0.0, needs=["gm"])]}
    rec = scheduler.run_plan(plan, ["cpu"], poll_s=0.02, log=lambda *_: None)
    assert {n: j["status"] for n, j in rec["jobs"].items()} == {"gm": "failed", "after_gm": "skipped"}
    assert "has no dense30m.tokens" in rec["jobs"]["gm"]["reason"]
    RunLog("t", "03_train_dense", tag="dense30m").save_metrics({"dense30m": {"tokens": 123456}})
    assert scheduler.measured(gm, "t") == {"tokens": 123456}
    argv = scheduler.command(gm, "t", scheduler.measured(gm, "t"))
    assert argv[argv.index("-p"):argv.index("-p") + 3] == ["-p", "tokens", "123456"]


def _save(args):
    root, i = args
    import os
    os.environ["GM_RESULTS_DIR"] = root
    RunLog("t", "04_train_gm", tag=f"gm{i}").save_metrics({"gm": {f"gm{i}": {"i": i}}}, nested=("gm",))


def test_parallel_stages_keep_every_metric(tmp_path):
    with mp.get_context("fork").Pool(4) as pool:
        pool.map(_save, [(str(tmp_path), i) for i in range(8)])
    m = json.loads((tmp_path / "t" / "metrics.json").read_text())
    assert m["gm"] == {f"gm{i}": {"i": i} for i in range(8)}
    assert set(m["stages"]) == {f"04_train_gm.gm{i}" for i in range(8)}


def test_run_notebooks_parameter_order(tmp_path):
    """<params-dir>/<stem>.yaml, then --params-file, then -p: the later wins; a bad file names itself."""
    rn = load_script("scripts/run_notebooks.py")
    (tmp_path / "03_train_dense.yaml").write_text("lr: 1.0\nbatch_size: 2\nmax_steps: 5\n")
    p = rn.notebook_params(Path("notebooks/03_train_dense.ipynb"), "r", tmp_path, {"batch_size": 4, "max_steps": 6},
                           {"max_steps": 7})
    assert p == {"run_name": "r", "lr": 1.0, "batch_size": 4, "max_steps": 7}
    assert rn.notebook_params(Path("notebooks/04_train_gm.ipynb"), "r", tmp_path, {}, {}) == {"run_name": "r"}
    (tmp_path / "bad.yaml").write_text("- a list\n")
    with pytest.raises(SystemExit, match="bad.yaml"):
        rn.read_yaml(tmp_path / "bad.yaml")


def test_a_job_that_cannot_start_skips_its_dependents(env):
    plan = {"run_name": "t", "jobs": [{"name": "e", "command": "no-such-program-gm"}, traced("f", 0.0, needs=["e"])]}
    rec = scheduler.run_plan(plan, ["0"], poll_s=0.02, log=lambda *_: None)
    assert {n: j["status"] for n, j in rec["jobs"].items()} == {"e": "failed", "f": "skipped"}


def test_background_watch_on_a_fresh_machine_stops_at_once(tmp_path):
    # a device call that lands on a fresh machine (the one that ran the plan was given back) must say so,
    # not wait out its seconds of device time watching a plan that is not there
    script = REPO / "scripts" / "gpu_machine" / "background_plan.sh"
    env = {**os.environ, "GM_ROOT": str(tmp_path / "root")}
    t0 = time.time()
    p = subprocess.run(["bash", str(script), "watch", "60", str(tmp_path / "out.tgz")], env=env,
                       capture_output=True, text=True)
    assert p.returncode == 3 and "fresh" in p.stderr and time.time() - t0 < 30


def _plan_env(tmp_path):
    """background_plan.sh's environment: its python3 is this interpreter, as on the GPU machine."""
    return {**os.environ, "GM_ROOT": str(tmp_path / "root"),
            "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"}


def test_background_start_refuses_a_machine_missing_a_module(tmp_path):
    # 2026-11-28: fine-tuning failed after all the training, for want of ftfy; start now checks first
    env = _plan_env(tmp_path)
    site = tmp_path / "root" / "site"
    site.mkdir(parents=True)
    (site / "papermill.py").write_text("raise ImportError('no papermill on this machine')\n")
    (tmp_path / "plan.yaml").write_text("run_name: x\njobs: []\n")
    p = subprocess.run(["bash", str(REPO / "scripts" / "gpu_machine" / "background_plan.sh"), "start",
                        str(tmp_path / "plan.yaml")],
                       env=env, capture_output=True, text=True)
    assert p.returncode == 4 and "missing" in p.stderr and "no papermill" in p.stderr
    assert not (tmp_path / "root" / "plan.pid").exists()


def test_background_watch_stops_when_the_plan_process_died(tmp_path):
    script = REPO / "scripts" / "gpu_machine" / "background_plan.sh"
    env = _plan_env(tmp_path)
    (tmp_path / "plan.yaml").write_text("run_name: x\njobs: not-a-list\n")   # run_experiment refuses it at once
    subprocess.run(["bash", str(script), "start", str(tmp_path / "plan.yaml")], env=env, check=True,
                   capture_output=True)
    t0 = time.time()
    p = subprocess.run(["bash", str(script), "watch", "60", str(tmp_path / "out.tgz")], env=env,
                       capture_output=True, text=True)
    assert p.returncode == 0 and time.time() - t0 < 30 and (tmp_path / "out.tgz").is_file()
    assert "no schedule yet" in p.stdout and "plan.log" in subprocess.run(
        ["tar", "tzf", str(tmp_path / "out.tgz")], capture_output=True, text=True).stdout


def test_background_runs_several_plans_in_order(tmp_path):
    # the frontier's budgets are plans of their own (run names frontier/b1, frontier/b3, ...), started together
    script = REPO / "scripts" / "gpu_machine" / "background_plan.sh"
    env = _plan_env(tmp_path)
    for b in ("b1", "b3"):
        (tmp_path / f"{b}.yaml").write_text(f"run_name: f/{b}\njobs:\n  - {{name: a, command: \"true\"}}\n")
    subprocess.run(["bash", str(script), "start", f"{tmp_path / 'b1.yaml'},{tmp_path / 'b3.yaml'}"], env=env,
                   check=True, capture_output=True)
    p = subprocess.run(["bash", str(script), "watch", "60", str(tmp_path / "out.tgz")], env=env,
                       capture_output=True, text=True)
    assert p.returncode == 0 and p.stdout.startswith("done")
    for b in ("b1", "b3"):
        rec = json.loads((tmp_path / "root" / "results" / "f" / b / "schedule.json").read_text())
        assert rec["jobs"]["a"]["status"] == "ok"


def test_background_runs_groups_of_plans_at_the_same_time(tmp_path):
    # b2+b3: two processes; watch waits for both and packs both logs
    script = REPO / "scripts" / "gpu_machine" / "background_plan.sh"
    env = _plan_env(tmp_path)
    for b, cmd in (("b2", "sleep 3"), ("b3", "true")):
        (tmp_path / f"{b}.yaml").write_text(f"run_name: f/{b}\njobs:\n  - {{name: a, command: \"{cmd}\"}}\n")
    p = subprocess.run(["bash", str(script), "start", f"{tmp_path / 'b2.yaml'}+{tmp_path / 'b3.yaml'}"], env=env,
                       check=True, capture_output=True, text=True)
    assert p.stdout.count("started:") == 2
    assert len((tmp_path / "root" / "plan.pid").read_text().split()) == 2
    p = subprocess.run(["bash", str(script), "watch", "60", str(tmp_path / "out.tgz")], env=env,
                       capture_output=True, text=True)
    assert p.returncode == 0 and p.stdout.startswith("done")
    for b in ("b2", "b3"):
        rec = json.loads((tmp_path / "root" / "results" / "f" / b / "schedule.json").read_text())
        assert rec["jobs"]["a"]["status"] == "ok"
    names = subprocess.run(["tar", "tzf", str(tmp_path / "out.tgz")], capture_output=True, text=True).stdout.split()
    assert {"plan.log", "plan-2.log"} <= set(names)


def test_background_start_refuses_a_missing_plan(tmp_path):
    p = subprocess.run(["bash", str(REPO / "scripts" / "gpu_machine" / "background_plan.sh"), "start",
                        str(tmp_path / "nope.yaml")],
                       env=_plan_env(tmp_path), capture_output=True, text=True)
    assert p.returncode == 2 and "nope.yaml" in p.stderr
