"""gmlib.config: a notebook's parameters are its parameters cell's names, checked once (unknown names,
types), handed to the dataclasses they are fields of; one flat YAML dialect for notebooks, scripts and
benchmarks; named presets of the fast training settings."""
import importlib.util
import json
import sys

import pytest
import yaml

from gmlib import config, gm
from gmlib.model import GPTConfig
from gmlib.paths import REPO_ROOT
from gmlib.router import RouterConfig, make_router
from gmlib.train import TrainConfig

NOTEBOOKS = sorted((REPO_ROOT / "notebooks").glob("*.ipynb"))


def test_no_notebook_keeps_a_hand_written_list_of_its_parameters():
    for nb in NOTEBOOKS:
        text = "".join("".join(c["source"]) for c in json.loads(nb.read_text())["cells"])
        assert "_known" not in text, nb.name
        assert f'config.notebook_params(_given, "{nb.stem}"' in text, nb.name


@pytest.mark.parametrize("nb", NOTEBOOKS, ids=lambda p: p.stem)
def test_each_notebook_accepts_its_own_defaults(nb):
    params = config.declared(nb.stem)
    assert params["run_name"] == "demo"
    assert config.check(params, nb.stem) == dict(sorted(params.items()))


def test_unknown_names_and_wrong_types_are_refused():
    with pytest.raises(ValueError, match="unknown parameter.*'batchsize'"):
        config.check({"batchsize": 8}, "03_train_dense", TrainConfig, GPTConfig)
    with pytest.raises(TypeError, match="batch_size='8'"):
        config.check({"batch_size": "8"}, "03_train_dense", TrainConfig, GPTConfig)
    with pytest.raises(TypeError, match="compile=1"):
        config.check({"compile": 1}, "03_train_dense", TrainConfig, GPTConfig)
    with pytest.raises(TypeError, match="gm_experts_alone"):
        config.check({"gm_experts_alone": "yes"}, "05_evaluate")
    # what YAML and papermill give: an int for a float, a list for a tuple, None where the cell's default is None
    ok = config.check({"lr": 1, "seq_len": None, "max_seconds": 300, "branch_fractions": [0.5, 0.75]},
                      "03_train_dense", TrainConfig, GPTConfig)
    assert ok["lr"] == 1 and ok["seq_len"] is None
    assert config.check({"gm_experts_alone": ["gm"], "max_docs": None}, "05_evaluate")["max_docs"] is None


def test_fields_hands_each_dataclass_its_own_and_none_means_its_default():
    params = config.declared("03_train_dense")
    tc = TrainConfig(**config.fields(params, TrainConfig))
    assert (tc.max_steps, tc.batch_size, tc.schedule, tc.ckpt_every, tc.max_tokens) == (150, 8, "wsd", 100, None)
    assert config.fields(params, GPTConfig) == {"activation": "swiglu"}  # seq_len, n_head None: the preset's


def test_a_preset_replaces_the_cells_settings_and_a_given_name_wins():
    ns = {**config.declared("03_train_dense"), "preset": "fastest", "batch_size": 16,
          "In": ["", "run_name = 'demo'", "# Parameters\npreset = \"fastest\"\nbatch_size = 16\n"]}
    p = config.notebook_params(ns, "03_train_dense", TrainConfig, GPTConfig)
    assert p["batch_size"] == 16  # given to papermill: wins
    assert (p["compile"], p["sdpa"], p["activation"], p["n_head"], p["fp8"], p["bf16_residual"]) == \
        (True, "cudnn", "relu2", 6, "all", True)
    assert TrainConfig(**config.fields(p, TrainConfig)).sdpa == "cudnn"
    with pytest.raises(ValueError, match="preset='fastest-ever'"):
        config.check({"preset": "fastest-ever"}, "03_train_dense")
    for name, preset in config.PRESETS.items():  # every preset's names are parameters of 03 and 04
        assert set(preset) <= set(config.declared("03_train_dense")) & set(config.declared("04_train_gm")), name


def _notebook_of(path):
    return next((nb.stem for nb in NOTEBOOKS if path.name.startswith(nb.stem[:3])), None)


PARAM_FILES = [p for p in sorted((REPO_ROOT / "params").rglob("*.yaml")) if _notebook_of(p)]


@pytest.mark.parametrize("path", PARAM_FILES, ids=lambda p: str(p.relative_to(REPO_ROOT / "params")))
def test_every_params_file_speaks_its_notebooks_dialect(path):
    config.check(yaml.safe_load(path.read_text()) or {}, _notebook_of(path), *_configs(_notebook_of(path)))


def _configs(stem):
    return {"03_train_dense": (TrainConfig, GPTConfig),
            "04_train_gm": (gm.GMConfig, TrainConfig, GPTConfig)}.get(stem, ())


def test_notebook_04_and_scripts_train_gm_build_one_gm_from_one_file(tmp_path):
    """params/gm124m/04_train_gm.yaml is the only description of that gm: the notebook fills what it
    does not set from its parameters cell, the script from the dataclasses; both must agree."""
    path = REPO_ROOT / "params" / "gm124m" / "04_train_gm.yaml"
    given = yaml.safe_load(path.read_text())
    cfgs = _configs("04_train_gm")
    nb = config.check({**config.declared("04_train_gm"), **given}, "04_train_gm", *cfgs, given=given)
    from_nb = gm.GMConfig.from_dict({**config.fields(nb, *cfgs), "seed_from": None})
    spec = importlib.util.spec_from_file_location("train_gm", REPO_ROOT / "scripts" / "train_gm.py")
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    from_script, run = script.read_config(path, [])
    assert from_script.to_dict() == from_nb.to_dict()
    assert run["data"].parts[-2:] == ("data", "shards") and run["out"] is None  # the file names no run: --out


def test_gm_config_reads_the_flat_dialect_and_the_nested_one_alike():
    flat = gm.GMConfig.from_dict({"n_experts": 2, "activation": "relu2", "seq_len": 64, "lr": 1e-3, "device": "cpu"})
    nested = gm.GMConfig.from_dict({"n_experts": 2, "model": {"activation": "relu2", "seq_len": 64},
                                    "train": {"lr": 1e-3}, "device": "cpu"})
    assert flat.to_dict() == nested.to_dict() and flat.train.device == "auto"  # device: GMConfig's own
    with pytest.raises(ValueError, match="unknown gm settings"):
        gm.GMConfig.from_dict({"n_expert": 2})


def test_n_experts_has_one_home():
    assert RouterConfig().n_experts is None  # the router takes the gm's
    assert make_router("random", gm.GMConfig().n_experts, 16).n_experts == gm.GMConfig().n_experts
    with pytest.raises(TypeError, match="n_experts"):  # router_cfg cannot set it beside the gm
        make_router("random", 4, 16, **{"n_experts": 8})
    with pytest.raises(ValueError, match="n_experts is unset"):
        make_router("random", None, 16)


def test_bench_variants_are_a_preset_plus_overrides():
    sys.path.insert(0, str(REPO_ROOT / "bench"))
    try:
        import train_speed
    finally:
        sys.path.remove(str(REPO_ROOT / "bench"))
    for name in train_speed.VARIANTS:
        v = train_speed.settings(name)
        assert v["preset"] in config.PRESETS, name
        TrainConfig(**config.fields(v, TrainConfig))
        GPTConfig(**config.fields(v, GPTConfig))
    v = train_speed.settings("124m-b64-relu2-cudnn-h6-bf16res-fp8")
    assert {k: v[k] for k in config.PRESETS["fastest"]} == config.PRESETS["fastest"]


PLANS = sorted((REPO_ROOT / "params").rglob("plan*.yaml"))


@pytest.mark.parametrize("path", PLANS, ids=lambda p: str(p.relative_to(REPO_ROOT / "params")))
def test_every_plan_job_gives_its_notebook_parameters_it_declares(path):
    plan = yaml.safe_load(path.read_text())
    jobs = [j for j in plan["jobs"] if j.get("notebook")]
    for job in jobs:
        stem = next(nb.stem for nb in NOTEBOOKS if nb.stem.startswith(str(job["notebook"])))
        given = yaml.safe_load((REPO_ROOT / job["params"]).read_text()) if job.get("params") else {}
        config.check({**(given or {}), **job.get("set", {})}, stem, *_configs(stem))
