"""The multi-expert trainer on real shards: experts learn their own data, every document is routed
once, compute adds up, a crashed run resumes bit-identically, experts are independent, load_gm
serves them to the mixture, and two torchrun processes train different experts."""
import hashlib
import math
import json
import os
import shutil
import subprocess

import numpy as np
import pytest
import torch
import yaml

from gmlib import gm, serve
from gmlib.checkpoint import read_checkpoint, state_tensors
from gmlib.data import ShardWriter, TokenShards
from gmlib.lm import window_logprobs
from gmlib.mixture import MixtureConfig, MixtureLM
from gmlib.paths import REPO_ROOT
from gmlib.step import TrainStep
from gmlib.store import ExpertStore
from gmlib.train import Trainer

ROUTER_CFG = {"n_features": 4096, "n_units": 4096, "wta_k": 32, "epochs": 2}
TRAIN = dict(batch_size=8, lr=1e-2, min_lr=1e-3, warmup_steps=5, eval_every=0, eval_batches=3, log_every=5)
# the main run: 4 experts by the local rule, budgets by share, two phases with one refinement
MAIN = dict(n_experts=4, router="local", router_cfg=ROUTER_CFG, model={"seq_len": 64}, budget="share",
            tokens=4 * 40 * 8 * 64, segment_steps=15, refine_rounds=1, refine_docs=48, device="cpu", **TRAIN)
# small runs for resume and independence: hash routing, fixed budgets, a BTM seed run
SMALL = dict(n_experts=3, router="random", model={"seq_len": 64}, budget="fixed", tokens=16 * 8 * 64,
             segment_steps=6, seed_steps=6, device="cpu", **TRAIN)


pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


def weights(out, name):
    with ExpertStore(out / "store", 1 << 30, 1 << 30) as st:
        return {k: v.clone() for k, v in st.read(name)[0].items() if k.startswith("model.")}


def doc_hashes(shards: TokenShards):
    return sorted(hashlib.sha1(shards.doc(i).tobytes()).hexdigest() for i in range(shards.n_docs))


@pytest.fixture(scope="module")
def main_run(tiny_shards, tmp_path_factory):
    out = tmp_path_factory.mktemp("gm_main")
    return out, gm.train_gm(gm.GMConfig.from_dict(MAIN), tiny_shards, out)


@pytest.fixture(scope="module")
def small_run(tiny_shards, tmp_path_factory):
    out = tmp_path_factory.mktemp("gm_small")
    return out, gm.train_gm(gm.GMConfig.from_dict(SMALL), tiny_shards, out)


def test_config_round_trip_and_errors():
    cfg = gm.GMConfig.from_dict(MAIN)
    assert cfg.train.batch_size == 8 and cfg.n_experts == 4
    assert gm.GMConfig.from_dict(json.loads(json.dumps(cfg.to_dict()))) == cfg
    with pytest.raises(ValueError, match="unknown gm settings"):
        gm.GMConfig.from_dict({"n_expert": 3})
    with pytest.raises(ValueError, match="budget"):
        gm.GMConfig(budget="equal")


def test_state_bytes_sizes_a_gated_expert():
    """fp32 weights + two Adam moments (12 bytes a parameter), each tensor padded to 256 bytes plus 256 for its
    step: for tiny with swiglu, the hand count of its 2 + 6·L tensors (the gated fc is 2·192 rows of 64)."""
    cfg = gm.GPTConfig(n_layer=2, n_head=2, n_embd=64, seq_len=128, vocab_size=1000, activation="swiglu")
    pad = lambda n: 3 * (-(-4 * n // 256) * 256) + 256  # noqa: E731
    layer = [64, 3 * 64 * 64, 64 * 64, 64, 2 * 192 * 64, 64 * 192]
    assert gm.state_bytes(cfg) == pad(1000 * 64) + pad(64) + 2 * sum(pad(n) for n in layer)


def test_experts_learn_their_own_data(main_run):
    out, s = main_run
    assert (out / "gm.json").is_file() and json.loads((out / "gm.json").read_text()) == json.loads(json.dumps(s))
    assert s["experts"] == [gm.expert_name(e) for e in range(4)] and s["router"] == "local"
    assert sum(s["shares"]) == pytest.approx(1.0)
    for r in s["records"]:
        assert r["steps"] == r["max_steps"] >= 10, r["name"]
        # each expert's held-out loss on its own routed val documents fell well below its start
        assert r["val_loss"] < r["val_loss_start"] - 0.5, (r["name"], r["val_loss_start"], r["val_loss"])
    # budgets follow the shares: steps = floor(tokens * share / tokens per step), never past the total
    tok_step = 8 * 64
    assert [r["max_steps"] for r in s["records"]] == [int(MAIN["tokens"] * sh / tok_step) for sh in s["shares"]]
    # the local rule keeps the shares fair (capacity slack 5%, plus token-length noise)
    assert max(s["shares"]) / min(s["shares"]) < 1.6, s["shares"]


def test_every_document_routed_exactly_once(main_run, tiny_shards):
    out, s = main_run
    for split in ("train", "val"):
        src = TokenShards(tiny_shards / split)
        for rnd in ("round_000", "round_001"):  # before and after the refinement
            parts = [TokenShards(out / "routed" / rnd / split / n) for n in s["experts"]]
            assert sum(p.n_docs for p in parts) == src.n_docs and sum(p.n_tokens for p in parts) == src.n_tokens
            assert sorted(h for p in parts for h in doc_hashes(p)) == doc_hashes(src)
    labels = np.load(out / "routed" / "round_000" / "train" / "assign.npy")
    assert labels.shape == (TokenShards(tiny_shards / "train").n_docs,) and set(labels) == {0, 1, 2, 3}
    # the refinement scored its sample with every expert and moved some documents
    losses = np.stack([np.load(out / "refine" / "round_001" / f"{n}.npy") for n in s["experts"]], 1)
    assert losses.shape == (48, 4) and np.isfinite(losses).all()
    after = np.load(out / "routed" / "round_001" / "train" / "assign.npy")
    assert 0 < (after != labels).sum() < len(labels)
    assert s["router_path"] == "router/round_001"


def test_accounting_adds_up(main_run):
    out, s = main_run
    a, recs = s["accounting"], s["records"]
    tok_step = 8 * 64
    for r in recs:  # each expert's own Trainer accounting
        assert r["accounting"]["tokens"] == r["steps"] * tok_step and r["accounting"]["step"] == r["steps"]
        assert r["accounting"]["flops"] == a["flops_per_token"] * r["accounting"]["tokens"]
    for k in ("tokens", "flops", "flops_6nd", "step"):
        assert a[k] == sum(r["accounting"][k] for r in recs), k
    assert a["gpu_seconds"] == pytest.approx(sum(r["accounting"]["gpu_seconds"] for r in recs))
    assert a["flops_6nd"] == 6 * a["params_per_expert"] * a["tokens"] and a["params"] == 4 * a["params_per_expert"]
    sw = s["swap"]
    assert sw["bytes_moved"] > 0 and sw["wall_s"] > 0 and 0 <= sw["wait_frac"] < 1
    assert s["ranks"][0]["store"]["prefetches"] > 0 and s["ranks"][0]["experts"] == s["experts"]


def test_resume_after_a_crash_continues_bit_identically(small_run, tiny_shards, tmp_path, monkeypatch):
    ref_out, ref = small_run
    assert ref["accounting"]["seed_run"]["step"] == 6
    out, calls, trained = tmp_path / "gm", [0], []
    real_run = Trainer.run

    def crashing_run(self, steps=None, **kw):
        calls[0] += 1
        if calls[0] == 5:  # the seed run (1 segment), the 3 experts' first segments, then a crash
            raise KeyboardInterrupt("simulated kill")
        before = self.step
        acct = real_run(self, steps, **kw)
        trained.append(self.step - before)
        return acct

    monkeypatch.setattr(Trainer, "run", crashing_run)
    with pytest.raises(KeyboardInterrupt):
        gm.train_gm(gm.GMConfig.from_dict(SMALL), tiny_shards, out)
    first = sum(trained)
    assert first == 6 + 3 * 6 and not (out / "gm.json").exists()
    s = gm.train_gm(gm.GMConfig.from_dict(SMALL), tiny_shards, out)
    # the rerun trained only what was missing: no seed run again, each expert from step 12 to 16
    # (the experts branched at the seed's step 6 and continue its trajectory of 16 steps)
    assert sum(trained) - first == 3 * (16 - 12)
    assert [r["steps"] for r in s["records"]] == [16, 16, 16]
    for name in [gm.SEED] + s["experts"]:
        for k, v in weights(ref_out, name).items():
            assert torch.equal(v, weights(out, name)[k]), (name, k)
    assert [r["val_loss"] for r in s["records"]] == [r["val_loss"] for r in ref["records"]]
    # a finished gm reruns as a no-op, and its config cannot be changed under it
    trained.clear()
    gm.train_gm(gm.GMConfig.from_dict(SMALL), tiny_shards, out)
    assert sum(trained) == 0
    with pytest.raises(ValueError, match="n_experts"):
        gm.train_gm(gm.GMConfig.from_dict({**SMALL, "n_experts": 2}), tiny_shards, out)


def test_experts_are_independent(small_run, tiny_shards, tmp_path):
    """Give expert 0 other documents: experts 1 and 2 come out bit-identical, expert 0 does not."""
    ref_out, ref = small_run
    out = tmp_path / "gm"
    for d in ("routed", "router"):
        shutil.copytree(ref_out / d, out / d)
    e0 = out / "routed" / "round_000" / "train" / "expert_000"
    src = TokenShards(ref_out / "routed" / "round_000" / "train" / "expert_001")  # expert 1's documents
    shutil.rmtree(e0)
    with ShardWriter(e0, src.vocab_size, src.sources) as w:
        for i in range(src.n_docs):
            w.add(src.doc(i), int(src.doc_source[i]), int(src.doc_nbytes[i]))
    gm.train_gm(gm.GMConfig.from_dict(SMALL), tiny_shards, out)
    for name in ("expert_001", "expert_002"):
        a, b = weights(ref_out, name), weights(out, name)
        assert all(torch.equal(a[k], b[k]) for k in a), name
    a, b = weights(ref_out, "expert_000"), weights(out, "expert_000")
    assert not all(torch.equal(a[k], b[k]) for k in a)


def test_load_gm_serves_the_mixture(main_run, tiny_shards):
    out, s = main_run
    one = gm.state_bytes(gm.GPTConfig(**s["model_config"])) // 3 + 256
    g = serve.load_gm(out, "cpu", gpu_bytes=one, ram_bytes=2 * one)  # 1 expert on the "GPU"
    router, load_expert = g.router, g.expert
    assert g.n_experts == 4 and router.n_experts == 4
    docs = [TokenShards(tiny_shards / "val").doc(i)[:100] for i in range(6)]
    for e in (0, 3, 1, 0):  # more experts than the tiers hold: they cycle through disk
        m = load_expert(e)
        ref = weights(out, gm.expert_name(e))
        assert all(torch.equal(v, ref[f"model.{k}"]) for k, v in m.state_dict().items())
    lm = MixtureLM(load_expert, 4, router, MixtureConfig(k=2, reroute_every=32), base_prior=g.shares,
                   expert_n_params=g.params_per_expert)
    lp = lm.token_logprobs_many(docs)
    assert all(np.isfinite(x).all() and len(x) == len(d) - 1 for x, d in zip(lp, docs))
    # with k = 1 and eta = 0 the first tokens follow the best expert under the base prior alone
    single = window_logprobs(load_expert(int(np.argmax(g.shares))), docs[:1])[0]
    lm1 = MixtureLM(load_expert, 4, None, MixtureConfig(k=1, eta=0.0), base_prior=g.shares,
                    expert_n_params=g.params_per_expert)
    np.testing.assert_allclose(lm1.token_logprobs(docs[0]), single, rtol=1e-6, atol=1e-6)
    g.close()


def test_mixtures_sharing_passes_score_as_alone(main_run, tiny_shards):
    # 05 scores k = 1, 2, K and both pools of one gm; with share_passes they share the experts' passes. A first
    # load of an expert inside log-linear pooling's inference mode once broke every later copy of the store
    out, _ = main_run
    docs = [TokenShards(tiny_shards / "val").doc(i)[:150] for i in range(5)]
    shared, alone = serve.mixture_loader(out.parent), serve.mixture_loader(out.parent)
    for spec in ({"k": 2, "pool": "log-linear"}, {"k": 1}, {"k": 4}, {"k": 4, "pool": "log-linear"}):
        spec = {"kind": "gm", "run": out.name, "reroute_every": 32, **spec}
        want = alone(spec, "cpu").token_logprobs_many(docs)
        got = shared({**spec, "share_passes": True}, "cpu").token_logprobs_many(docs)
        assert all(np.array_equal(a, b) for a, b in zip(want, got)), spec


def test_torchrun_two_processes_train_different_experts(tiny_shards, tmp_path):
    torchrun = shutil.which("torchrun", path=str(REPO_ROOT / ".venv" / "bin")) or shutil.which("torchrun")
    if torchrun is None:
        pytest.skip("torchrun is not installed (it comes with torch)")
    cfg = tmp_path / "gm.yaml"
    # with a refinement: both ranks score their experts' columns, rank 0 re-routes, both go on
    cfg.write_text(yaml.safe_dump({**SMALL, "n_experts": 4, "seed_steps": 0, "tokens": 8 * 8 * 64,
                                   "refine_rounds": 1, "refine_docs": 16}))
    out = tmp_path / "gm"
    cmd = [torchrun, "--standalone", "--nproc_per_node=2", str(REPO_ROOT / "scripts" / "train_gm.py"),
           "--config", str(cfg), "--data", str(tiny_shards), "--out", str(out)]
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=120, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    s = json.loads((out / "gm.json").read_text())
    assert s["world_size"] == 2
    assert {r["name"]: r["rank"] for r in s["records"]} == \
        {"expert_000": 0, "expert_001": 1, "expert_002": 0, "expert_003": 1}
    pids = {r["rank"]: r["pid"] for r in s["records"]}
    assert pids[0] != pids[1]  # two processes
    assert [r["experts"] for r in s["ranks"]] == [["expert_000", "expert_002"], ["expert_001", "expert_003"]]
    assert all(r["steps"] == 8 for r in s["records"])
    assert s["router_path"] == "router/round_001" and len(list((out / "refine" / "round_001").glob("*.npy"))) == 4


def test_the_seed_run_loads_alone_with_its_compute(small_run, main_run):
    """A seeded gm's seed is one more model (<gm>-seed): the store's "seed" weights, charged the seed run's seconds."""
    out, info = small_run
    model, acct = serve.load_seed(out)
    seed_w = weights(out, gm.SEED)
    assert all(torch.equal(v, seed_w[f"model.{k}"]) for k, v in model.state_dict().items())
    lm = serve.mixture_loader(out.parent)({"run": out.name, "seed": True}, "cpu")
    assert lm.train_gpu_seconds == acct["gpu_seconds"] == info["accounting"]["seed_run"]["gpu_seconds"]
    with pytest.raises(FileNotFoundError, match="no seed run"):
        serve.load_seed(main_run[0])


# ---------------------------------------------------------------- branching from a shared seed (issue 17)

WSD = dict(TRAIN, log_every=1, schedule="wsd", decay_frac=0.2)
TWIN_TOKENS = 30 * 8 * 64  # 30 steps of 8 x 64 tokens


@pytest.fixture(scope="module")
def dense_twin(tiny_shards, tmp_path_factory):
    """The dense run every branched gm below must reproduce: wsd, 30 steps, branch checkpoints
    at 0.3 and 0.7 of its budget."""
    from gmlib.model import make_config
    from gmlib.train import TrainConfig, run_with_branches, setup
    out = tmp_path_factory.mktemp("dense_twin")
    mcfg = make_config("tiny", vocab_size=TokenShards(tiny_shards / "train").vocab_size, seq_len=64)
    tr = setup(mcfg, TrainConfig(**WSD, max_steps=10**6, max_tokens=TWIN_TOKENS, device="cpu"), tiny_shards)
    _, paths = run_with_branches(tr, [0.3, 0.7], out, progress=False)
    assert sorted(paths) == [9, 21]
    return out, tr.history, {k: v.detach().clone() for k, v in tr.model.state_dict().items()}, tr.accounting()


def one_expert_gm(tiny_shards, out, **kw):
    base = dict(n_experts=1, router="random", model={"seq_len": 64}, tokens=TWIN_TOKENS, segment_steps=7, device="cpu")
    return gm.train_gm(gm.GMConfig.from_dict({**base, **WSD, **kw}), tiny_shards, out)


def at_steps(hist, steps, key="loss"):
    where = {s: i for i, s in enumerate(hist["step"])}
    return [hist[key][where[s]] for s in steps]


@pytest.mark.parametrize("fraction, from_dense", [(0.3, False), (0.7, True)])
def test_one_expert_gm_is_its_dense_twin(dense_twin, tiny_shards, tmp_path, monkeypatch, fraction, from_dense):
    """A gm of one expert (r = 1) branched at any fraction, with the seed trained here or taken
    from the dense run's branch checkpoint, follows the dense run's curve step for step; the
    expert starts at its branch step in exactly the seed's state (weights, moments, step)."""
    dense_dir, dense_hist, dense_w, dense_acct = dense_twin
    starts = []
    real_run = Trainer.run

    def spy(self, steps=None, **kw):
        if self.acct["tokens"] == 0:  # the first segment of a run: what it starts from
            starts.append((self.step, self.data_pos, {k: v.detach().clone()
                                                       for k, v in state_tensors(self.model, self.optimizer).items()}))
        return real_run(self, steps, **kw)

    monkeypatch.setattr(Trainer, "run", spy)
    s = one_expert_gm(tiny_shards, tmp_path / "gm", seed_fraction=fraction,
                      seed_from=str(dense_dir) if from_dense else None)
    b = gm.branch_step(fraction, 30)
    assert s["branch_step"] == b and s["seed_fraction"] == pytest.approx(b / 30) and s["schedule"] == "wsd"
    seed_tensors, seed_meta = ExpertStore(tmp_path / "gm" / "store", 1 << 30, 1 << 30).read(gm.SEED)
    assert seed_meta["trainer"]["step"] == b and json.loads((tmp_path / "gm" / "experts" / "seed.json").read_text())
    # the seed is the dense run's stable phase: bit for bit its branch checkpoint (also when trained here)
    ck, _ = read_checkpoint(dense_dir / f"branch_{b:07d}.safetensors")
    if b in (9, 21):
        assert set(ck) == set(seed_tensors) and all(torch.equal(ck[k], seed_tensors[k]) for k in ck)
    step, pos, state = starts[-1]  # the expert's first segment
    assert step == b and pos == b and set(state) == set(seed_tensors) and any(k.startswith("optim.") for k in state)
    assert all(torch.equal(state[k], seed_tensors[k]) for k in state)
    rec = s["records"][0]
    assert rec["steps"] == 30 and rec["own_steps"] == 30 - b
    # the loss and lr curves after the branch are the dense run's (same data order, same decay)
    own = rec["history"]["step"]
    assert own == list(range(b + 1, 31))
    for key in ("loss", "lr"):
        np.testing.assert_allclose(rec["history"][key], at_steps(dense_hist, own, key), rtol=1e-5, atol=1e-6)
    w = weights(tmp_path / "gm", "expert_000")
    for k, v in dense_w.items():
        torch.testing.assert_close(w[f"model.{k}"], v, rtol=1e-5, atol=1e-6)
    # the same compute as the twin: seed + expert tokens = the dense run's
    assert s["accounting"]["tokens"] == dense_acct["tokens"] and s["accounting"]["flops_6nd"] == dense_acct["flops_6nd"]
    assert s["accounting"]["seed_run"]["tokens"] == b * 8 * 64
    model, acct = serve.load_seed(tmp_path / "gm")
    assert acct == s["accounting"]["seed_run"]
    assert all(torch.equal(v, seed_tensors[f"model.{k}"]) for k, v in model.state_dict().items())


def test_a_seed_checkpoint_of_another_run_is_refused(dense_twin, tiny_shards, tmp_path):
    dense_dir = dense_twin[0]
    with pytest.raises(ValueError, match=r"differ from this gm's"):  # another learning rate: not its twin
        one_expert_gm(tiny_shards, tmp_path / "a", seed_fraction=0.3, seed_from=str(dense_dir),
                      lr=5e-3)
    with pytest.raises(FileNotFoundError, match="branch_0000015"):   # no checkpoint at the gm's branch step
        one_expert_gm(tiny_shards, tmp_path / "b", seed_fraction=0.5, seed_from=str(dense_dir))


def test_budget_never_gives_a_gm_more_compute_than_its_dense_twin():
    """plan_budget over many gm: seed + experts <= the dense twin's steps (so 6ND compute, with
    experts of the dense model's size), and the experts' share follows their routed tokens."""
    rng = np.random.default_rng(0)
    for _ in range(500):
        K = int(rng.integers(1, 9))
        r = int(rng.integers(1, K + 1))
        routed = rng.dirichlet(np.ones(K)) * r * 1e6
        frac = float(rng.choice([0.0, 0.1, 0.5, 0.75, 0.9]))
        cfg = gm.GMConfig(n_experts=K, train_top_r=r, seed_fraction=frac, tokens=int(rng.integers(1000, 10**8)))
        tok_step = int(rng.choice([512, 4096, 16384]))
        p = gm.plan_budget(cfg, tok_step, routed)
        dense_steps = math.ceil(cfg.tokens / tok_step)  # gmlib.train: max_tokens -> steps
        assert p["total_steps"] == dense_steps
        if p["branch_step"] or min(p["own_steps"]) > 0:
            assert p["branch_step"] + sum(p["own_steps"]) <= dense_steps, (cfg, p)
        assert sum(p["own_steps"]) >= (dense_steps - p["branch_step"]) - K   # nothing but rounding left over
        assert p["max_steps"] == [p["branch_step"] + o for o in p["own_steps"]]
    with pytest.raises(ValueError, match="leave nothing"):
        gm.plan_budget(gm.GMConfig(seed_steps=10, tokens=10 * 512), 512, [1.0, 1.0])
    with pytest.raises(ValueError, match="not both"):
        gm.GMConfig(seed_steps=5, seed_fraction=0.5)
    with pytest.raises(ValueError, match="train_top_r"):
        gm.GMConfig(n_experts=2, train_top_r=3)
    with pytest.raises(ValueError, match="refinement"):
        gm.GMConfig(n_experts=2, train_top_r=2, refine_rounds=1)


def test_top_r_equal_k_gives_every_expert_all_data(tiny_shards, tmp_path, monkeypatch):
    """train_top_r = K: every expert's shard holds every training document; the budget is split
    evenly; the experts branch from one seed but differ (each its own data order); the weight
    decay of the config reaches the seed run and every expert."""
    cfg = dict(n_experts=3, router="random", model={"seq_len": 64}, tokens=30 * 8 * 64,
               segment_steps=10, device="cpu", seed_fraction=0.5, train_top_r=3, **{**WSD, "weight_decay": 0.7})
    out, decays = tmp_path / "gm", []
    real_run = Trainer.run

    def spy(self, steps=None, **kw):
        decays.append([g["weight_decay"] for g in self.optimizer.param_groups])
        return real_run(self, steps, **kw)

    monkeypatch.setattr(Trainer, "run", spy)
    s = gm.train_gm(gm.GMConfig.from_dict(cfg), tiny_shards, out)
    assert len(decays) == 2 + 3 and all(d == [0.7, 0.0] for d in decays)  # seed: 2 segments; matrices decay, gains not
    src = TokenShards(tiny_shards / "train")
    for n in s["experts"]:
        part = TokenShards(out / "routed" / "round_000" / "train" / n)
        assert part.n_docs == src.n_docs and doc_hashes(part) == doc_hashes(src)
    assert s["shares"] == pytest.approx([1 / 3] * 3) and s["train_top_r"] == 3
    assert [r["own_steps"] for r in s["records"]] == [5, 5, 5] and s["accounting"]["tokens"] == 30 * 8 * 64
    a, b = weights(out, "expert_000"), weights(out, "expert_001")
    assert not all(torch.equal(a[k], b[k]) for k in a)


def test_the_step_machinery_is_built_once_and_lent_to_every_segment(tiny_shards, tmp_path, monkeypatch):
    """One gmlib.step.TrainStep for the rank's slot (fp8 conversion and compilation once), borrowed
    by every segment of the seed and of every expert."""
    built, lent = [], []
    real_init, real_run = TrainStep.__init__, Trainer.run

    def init(self, *a, **kw):
        built.append(self)
        real_init(self, *a, **kw)

    def spy(self, steps=None, **kw):
        lent.append(self.machine)
        return real_run(self, steps, **kw)

    monkeypatch.setattr(TrainStep, "__init__", init)
    monkeypatch.setattr(Trainer, "run", spy)
    gm.train_gm(gm.GMConfig.from_dict(SMALL), tiny_shards, tmp_path / "gm")
    assert len(built) == 1 and len(lent) > 3 and all(m is built[0] for m in lent)
