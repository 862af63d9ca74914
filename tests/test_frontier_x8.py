"""The frontier past one GPU (issue 22): the 8-GPU plan is consistent (every model at the budget's 6ND
compute, every gm on its twin's tokens and batch, multi-GPU jobs through torch.distributed.run), and
its rehearsal runs end to end on a CPU: dense data-parallel over 2 processes, gm with one rank per
process, the evaluation in two parts appending every model to a ledger of its own."""
import shlex
import shutil
import subprocess
import sys

import pytest
import yaml

from helpers import REPO, load_script

from gmlib.paths import work_dir
from pipeline import plan as scheduler

train_gm = load_script("scripts/train_gm.py")

FRONTIER = REPO / "params" / "frontier"


def _plan_models(plan_path, dense_params):
    """(dense settings by job, gm settings by job, eval jobs) of a b5 plan, as each job would run."""
    plan = scheduler.load_plan(plan_path)
    base = yaml.safe_load((FRONTIER / dense_params).read_text())
    dense = {j["name"]: {**base, **j["set"], "nproc": j["nproc"]} for j in plan["jobs"] if j.get("notebook") == "03"}
    gms = {}
    for j in plan["jobs"]:
        if "command" in j:
            argv = shlex.split(j["command"])
            gm = yaml.safe_load((REPO / argv[argv.index("--config") + 1]).read_text())
            for i in [i for i, a in enumerate(argv) if a == "-s"]:  # -s KEY=VALUE, as train_gm.py reads them
                k, _, v = argv[i + 1].partition("=")
                gm[k] = yaml.safe_load(v)
            gms[j["name"]] = {**gm, "job": j, "argv": argv}
    return plan, dense, gms, [j for j in plan["jobs"] if j.get("notebook") == "05"]


@pytest.mark.parametrize("plan_path, dense_params, nproc", [
    ("plan_b5_x8.yaml", "03_dense.yaml", 8), ("rehearsal/plan.yaml", "rehearsal/03_dense.yaml", 2)])
def test_the_plan_gives_every_model_the_budget_and_runs_training_over_all_ranks(plan_path, dense_params, nproc):
    from gmlib.model import make_config
    plan, dense, gms, evals = _plan_models(FRONTIER / plan_path, dense_params)
    n = lambda d: make_config(d["model_size"], vocab_size=32000).n_params  # noqa: E731
    T = lambda d: make_config(d["model_size"], vocab_size=32000).seq_len  # noqa: E731
    twin = dense[next(iter(dense))]
    budget = 6 * n(twin) * twin["max_tokens"]
    for name, d in dense.items():  # the same 6ND compute, whole steps, a global batch that splits over the ranks
        assert abs(6 * n(d) * d["max_tokens"] / budget - 1) < 0.01, name
        assert d["nproc"] == nproc and d["batch_size"] % nproc == 0 and d["max_tokens"] % (d["batch_size"] * T(d)) == 0
    assert {d["weight_decay"] for d in dense.values()} >= {0.1, 0.8}
    assert len(gms) >= 2
    for name, g in gms.items():  # one rank per GPU; the twin's trajectory and tokens; a seed the twin saves
        # the gm where 05 looks for it: work/<the plan's run>/gm/<its job's name>
        assert g["job"]["nproc"] == nproc and g["gm_name"] == name and g["run_name"] == plan["run_name"]
        assert g["tokens"] == twin["max_tokens"] and g["seed_from"] == twin["model_name"] in g["job"]["needs"]
        assert g["seed_fraction"] in twin["branch_fractions"] and g["n_experts"] % nproc == 0
        for k in ("batch_size", "grad_accum", "lr", "min_lr", "warmup_steps", "schedule", "decay_frac", "model_size"):
            assert g[k] == twin[k], (name, k)
        # as scripts/train_gm.py reads it (notebook 04's flat parameters, checked): the run's folders, the twin's seed
        sets = [g["argv"][i + 1] for i, a in enumerate(g["argv"]) if a == "-s"]
        cfg, run = train_gm.read_config(REPO / g["argv"][g["argv"].index("--config") + 1], sets)
        assert run["out"] == work_dir(plan["run_name"]) / "gm" / name and run["data"] is not None
        assert cfg.seed_from == str(work_dir(plan["run_name"]) / "models" / twin["model_name"])
    # every trained model evaluated on one GPU, each part with every dense model, later parts merged into the first
    assert set().union(*(e["needs"] for e in evals)) == set(dense) | set(gms)
    for i, e in enumerate(evals):
        assert "nproc" not in e and set(e["set"]["dense_models"]) == {d["model_name"] for d in dense.values()}
        assert e["set"]["budget"] == "b5" and e["set"]["budget_flops_6nd"] in (budget, None)
        assert not i or (e["set"]["merge_earlier"] and "evaluate" in e["after"])
    # the dry run: trainings through torch.distributed.run over all ranks, evaluations alone
    out = subprocess.run([sys.executable, str(REPO / "scripts" / "run_experiment.py"), str(FRONTIER / plan_path),
                          "--dry-run"], capture_output=True, text=True, check=True).stdout.splitlines()
    lines = {line.split(":")[0]: line for line in out}
    for name in [*dense, *gms]:
        assert f"torch.distributed.run --standalone --nproc_per_node={nproc}" in lines[name], lines[name]
    for e in evals:
        assert "torch.distributed.run" not in lines[e["name"]] and "run_notebooks.py" in lines[e["name"]]
    assert "train_dense.py" in lines[next(iter(dense))]


def test_a_multi_gpu_job_waits_for_its_gpus_and_nothing_overtakes_it(tmp_path, monkeypatch):
    monkeypatch.setenv("GM_RESULTS_DIR", str(tmp_path / "results"))
    trace, script = tmp_path / "trace.txt", tmp_path / "trace.py"
    script.write_text("import os, sys, time\n"  # under torch.distributed.run: rank 0 says where it runs
                      f"if os.environ.get('RANK', '0') == '0': open({str(trace)!r}, 'a').write("
                      "sys.argv[1] + ' ' + os.environ['CUDA_VISIBLE_DEVICES'] + ' ' + os.environ['GM_MACHINE_GPUS'] "
                      "+ ' ' + os.environ.get('WORLD_SIZE', '1') + '\\n')\n"
                      "time.sleep(float(sys.argv[2]))\n")
    job = lambda n, s, **k: {"name": n, "command": f"python {script} {n} {s}", **k}  # noqa: E731
    plan = {"run_name": "t", "jobs": [job("one", 0.5), job("wide", 0.1, nproc=3), job("small", 0.0),
                                      job("huge", 0.0, nproc=5)]}
    rec = scheduler.run_plan(plan, ["0", "1", "2"], poll_s=0.02, log=lambda *_: None)
    assert {n: j["status"] for n, j in rec["jobs"].items()} == {"one": "ok", "wide": "ok", "small": "ok",
                                                               "huge": "failed"}
    assert "needs 5 GPUs" in rec["jobs"]["huge"]["reason"]
    # "wide" needs all three: it waits for "one" to end, and "small" (later in the plan) does not start before it
    lines = trace.read_text().split("\n")[:-1]
    assert lines[0] == "one 0 3 1" and lines[1].split()[0] == "wide" and lines[1].split()[3] == "3"
    assert sorted(lines[1].split()[1].split(",")) == ["0", "1", "2"]
    assert lines[2].split()[0] == "small"


def test_bad_nproc_is_refused(tmp_path):
    for job, msg in [({"name": "a", "command": "true", "nproc": 0}, "nproc"),
                     ({"name": "a", "command": "bash x.sh", "nproc": 2}, "Python script"),
                     ({"name": "a", "notebook": "05", "params": "params/frontier/05_evaluate.yaml", "nproc": 2},
                      "has none")]:
        (tmp_path / "p.yaml").write_text(yaml.safe_dump({"run_name": "t", "jobs": [job]}))
        with pytest.raises(ValueError, match=msg):
            scheduler.load_plan(tmp_path / "p.yaml")


def test_the_rehearsal_runs_the_whole_plan_on_two_cpu_processes(tiny_shards, tiny_tokenizer_path, tmp_path,
                                                                  monkeypatch):
    import json
    from gmlib import frontier
    work, results = tmp_path / "work", tmp_path / "results"
    monkeypatch.setenv("GM_WORK_DIR", str(work))
    monkeypatch.setenv("GM_RESULTS_DIR", str(results))
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    (work / "rehearsal").mkdir(parents=True)
    shutil.copytree(tiny_shards, work / "rehearsal" / "shards")
    shutil.copy(tiny_tokenizer_path, work / "rehearsal" / "tokenizer.model")
    plan = scheduler.load_plan(FRONTIER / "rehearsal" / "plan.yaml")
    rec = scheduler.run_plan(plan, ["cpu"], poll_s=0.2, log=lambda *_: None)
    log_of = lambda n: results / "rehearsal" / "b5" / "logs" / f"{n}.log"  # noqa: E731
    # a job skipped for a failed input has no log: say so, and the failed input's log tells why
    logs = {n: log_of(n).read_text()[-3000:] if log_of(n).is_file() else f"no log ({j['status']})"
            for n, j in rec["jobs"].items()}
    assert all(j["status"] == "ok" for j in rec["jobs"].values()), {n: logs[n] for n, j in rec["jobs"].items()
                                                                   if j["status"] != "ok"}
    metrics = json.loads((results / "rehearsal" / "b5" / "metrics.json").read_text())
    for d in ("dense", "dense_wd08"):  # data-parallel: 2 ranks, global tokens, the device-seconds of both
        m = metrics[d]
        assert m["world_size"] == 2 and m["tokens"] == 40960 and m["gpu_seconds"] > m["wall_seconds"]
    assert sorted(metrics["dense"]["branches"]) == ["20", "30"]
    for g in ("gm_s75_r1", "gm_s75_r2"):  # one rank per process, seeded by the data-parallel twin
        info = json.loads((work / "rehearsal" / "b5" / "gm" / g / "gm.json").read_text())
        assert info["world_size"] == 2 and {r["rank"] for r in info["records"]} == {0, 1}
        assert info["accounting"]["tokens"] <= 40960 and info["accounting"]["seed_run"]["tokens"] == 30 * 8 * 128
    ledger = frontier.read(results / "rehearsal" / "frontier" / "runs.csv")
    assert set(ledger["budget"]) == {"b5"}
    assert {"dense", "dense_wd08", "gm_s75_r1-k2", "gm_s75_r2-k2-log-linear", "gm_s75_r2-seed"} <= set(ledger["model"])
    assert ledger["n_docs"].nunique() == 1 and ledger["best_dense"].nunique() == 1
    assert set(ledger.query("kind == 'dense'")["weight_decay"]) == {0.1, 0.8}
