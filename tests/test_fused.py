"""Fused expert groups (gmlib.fused) against the reference, separate training: G experts trained in
one batched pass and one by one give the same per-expert losses, gradient norms and weights (CPU
fp32, 1e-5), with different learning rates, schedules, data and budgets per expert and with
gradient clipping active; the stacked form converts to and from G GPT state dicts exactly."""
import numpy as np
import pytest
import torch

from gmlib.data import ShardWriter, TokenShards, WindowSampler
from gmlib.fused import GroupTrainer, fused_loss, stack_state, unstack_state
from gmlib.model import GPT, make_config
from gmlib.train import Trainer, TrainConfig

V, T, B = 256, 32, 4
TOL = dict(rtol=1e-5, atol=1e-5)
# three experts that differ in everything a member may differ in; clip 0.3 is below every gradient
# norm of these runs (asserted), so clipping acts at every step
MEMBERS = [dict(lr=3e-3, min_lr=3e-4, warmup_steps=3, schedule="cosine", weight_decay=0.1, max_steps=8, seed=1),
           dict(lr=1e-2, min_lr=1e-3, warmup_steps=0, schedule="wsd", decay_frac=0.5, weight_decay=0.0, max_steps=6,
                seed=2),
           dict(lr=2e-2, min_lr=2e-3, warmup_steps=2, schedule="cosine", weight_decay=0.3, max_steps=8, seed=3)]
COMMON = dict(batch_size=B, grad_clip=0.3, log_every=1, eval_every=4, eval_batches=2, device="cpu")

pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    """Random tokens, with structure enough that the loss moves (a noisy rule, as test_train's)."""
    root = tmp_path_factory.mktemp("fused")
    rng = np.random.default_rng(0)
    for split, n in (("train", 30), ("val", 4)):
        with ShardWriter(root / split, vocab_size=V, sources=["syn"]) as w:
            for _ in range(n):
                doc = [1]
                for _ in range(150):
                    doc.append((doc[-1] * 5 + 1) % 240 if rng.random() < 0.8 else int(rng.integers(2, V)))
                w.add(doc)
    return root


def trainers(shards, activation="gelu", grad_accum=1, members=MEMBERS):
    """One Trainer per member, each on its own init and its own stream of batches."""
    cfg = make_config("tiny", vocab_size=V, seq_len=T, activation=activation)
    out = []
    for m in members:
        torch.manual_seed(100 + m["seed"])
        tc = TrainConfig(**COMMON, **m, grad_accum=grad_accum)
        out.append(Trainer(GPT(cfg), tc, WindowSampler(TokenShards(shards / "train"), T, B, seed=m["seed"]),
                           WindowSampler(TokenShards(shards / "val"), T, B, seed=7)))
    return out


def test_stacked_state_converts_exactly():
    cfg = make_config("tiny", vocab_size=V, seq_len=T, activation="swiglu")
    models = [GPT(cfg) for _ in range(3)]
    states = [m.state_dict() for m in models]
    stacked = stack_state(states)
    assert stacked["wte.weight"].shape == (3, V, cfg.n_embd)
    back = unstack_state({k: v.clone() for k, v in stacked.items()})
    for s, b in zip(states, back):
        assert list(s) == list(b) and all(torch.equal(s[k], b[k]) for k in s)
    fresh = GPT(cfg)
    fresh.load_state_dict(back[1])
    idx = torch.randint(0, V, (2, T))
    assert torch.equal(fresh(idx)[0], models[1](idx)[0])
    with pytest.raises(ValueError, match="do not match"):
        stack_state([states[0], {k: v for k, v in states[1].items() if k != "norm.weight"}])


@pytest.mark.parametrize("activation", ["gelu", "swiglu"])
def test_fused_loss_is_each_experts_own(activation):
    """The forward alone: G experts' losses in one pass are GPT.forward's, and so is each one's gradient."""
    cfg = make_config("tiny", vocab_size=V, seq_len=T, activation=activation)
    models = [GPT(cfg) for _ in range(3)]
    idx, tgt = torch.randint(0, V, (3, B, T)), torch.randint(0, V, (3, B, T))
    tgt[1, 0, :5] = -1  # ignored targets count in no mean
    ref = torch.stack([m(idx[g], tgt[g], return_logits=False)[1] for g, m in enumerate(models)])
    ref.sum().backward()
    ref_grads = [{n: p.grad.clone() for n, p in m.named_parameters()} for m in models]
    for m in models:
        m.zero_grad(set_to_none=True)
    got = fused_loss(stack_state([dict(m.named_parameters()) for m in models]), cfg, idx, tgt,
                     models[0].rope_cos, models[0].rope_sin)
    torch.testing.assert_close(got, ref.detach(), rtol=1e-6, atol=1e-6)
    got.sum().backward()
    for m, rg in zip(models, ref_grads):
        for n, p in m.named_parameters():
            torch.testing.assert_close(p.grad, rg[n], rtol=1e-5, atol=1e-6, msg=n)


@pytest.mark.parametrize("activation, grad_accum", [("gelu", 1), ("swiglu", 2)])
def test_fused_training_equals_separate_training(shards, activation, grad_accum):
    """The reference test: three experts with their own lr, schedule, weight decay, data, budget and
    init, trained one by one and as one group (the group shrinks when expert 1's budget ends)."""
    alone = trainers(shards, activation, grad_accum)
    for t in alone:
        t.run(progress=False)
    together = trainers(shards, activation, grad_accum)
    accts = GroupTrainer(together).run([100] * len(together))
    for g, (a, b) in enumerate(zip(alone, together)):
        n = MEMBERS[g]["max_steps"]
        assert (b.step, b.data_pos, b.acct["tokens"]) == (a.step, a.data_pos, a.acct["tokens"]) == \
               (n, n * grad_accum, n * B * T * grad_accum)
        assert min(a.history["grad_norm"]) > COMMON["grad_clip"]  # clipping acted at every step
        for k in ("step", "lr", "val_step"):
            assert a.history[k] == b.history[k], (g, k)
        for k in ("loss", "grad_norm", "val_loss"):
            np.testing.assert_allclose(b.history[k], a.history[k], **TOL, err_msg=f"expert {g} {k}")
        for (n, p), q in zip(a.model.named_parameters(), b.model.parameters()):
            torch.testing.assert_close(q, p, **TOL, msg=f"expert {g} {n}")
        # the optimizer state is each expert's own and continues as separate training's would
        sa, sb = a.optimizer.state_dict()["state"], b.optimizer.state_dict()["state"]
        for i in sa:
            torch.testing.assert_close(sb[i]["exp_avg_sq"], sa[i]["exp_avg_sq"], rtol=1e-4, atol=1e-9)
            assert float(sb[i]["step"]) == float(sa[i]["step"])
        assert accts[g]["tokens"] == a.acct["tokens"] and accts[g]["gpu_seconds"] > 0


def test_a_group_continues_in_segments_like_one_run(shards):
    """run() in two calls of a few steps each (gm's segments) ends where one call ends."""
    one, two = trainers(shards), trainers(shards)
    GroupTrainer(one).run([8, 8, 8])
    g = GroupTrainer(two)
    g.run([3, 3, 3])
    g.run([5, 5, 5])
    for a, b in zip(one, two):
        assert a.step == b.step and a.data_pos == b.data_pos
        for p, q in zip(a.model.parameters(), b.model.parameters()):
            assert torch.equal(p, q)


def test_group_time_is_shared_by_its_members(shards):
    """The group's wall time is split between the members that trained in it: the sum is the wall
    time, and a member that left early was charged less."""
    import time
    ts = trainers(shards)
    t0 = time.perf_counter()
    GroupTrainer(ts).run([8, 8, 8])
    wall = time.perf_counter() - t0
    secs = [t.acct["seconds"] for t in ts]
    assert 0 < sum(secs) <= wall and secs[1] < secs[0]   # expert 1 stops at 6 steps, the others at 8
    assert secs[0] == pytest.approx(secs[2])


def test_members_that_cannot_share_a_pass_are_refused(shards):
    a, b, _ = trainers(shards)
    with pytest.raises(ValueError, match="share one model"):
        GroupTrainer([a, Trainer(a.model, a.cfg, a.train_data)])
    c = trainers(shards, activation="swiglu")[0]
    with pytest.raises(ValueError, match="model config"):
        GroupTrainer([a, c])
    with pytest.raises(ValueError, match="no checkpoint files"):
        GroupTrainer([a, Trainer(b.model, b.cfg, b.train_data, ckpt_path=shards / "ck.safetensors")])


# ---- in the gm trainer: group_size G trains G experts of a rank together, with the same outcome

GM = dict(n_experts=3, router="random", model={"seq_len": T}, budget="share", tokens=60 * B * T, segment_steps=4,
          seed_fraction=0.25, schedule="wsd", decay_frac=0.3, batch_size=B, lr=1e-2, min_lr=1e-3, warmup_steps=3,
          eval_every=0, eval_batches=2, log_every=2, device="cpu")


def store_weights(out, names):
    from gmlib.store import ExpertStore
    with ExpertStore(out / "store", 1 << 30, 1 << 30) as st:
        return {n: {k: v.clone() for k, v in st.read(n)[0].items() if k.startswith("model.")} for n in names}


@pytest.fixture(scope="module")
def gm_alone(shards, tmp_path_factory):
    from gmlib import gm
    out = tmp_path_factory.mktemp("gm_g1")
    return out, gm.train_gm(gm.GMConfig.from_dict(GM), shards, out)


@pytest.mark.parametrize("group_size", [2, 3])
def test_gm_with_groups_trains_the_same_experts(gm_alone, shards, tmp_path, group_size):
    """group_size 2 (a group of two and a lone expert) and 3 (one group that shrinks as the experts'
    shares of the budget run out at different steps) give group_size 1's experts and records."""
    from gmlib import gm
    out1, s1 = gm_alone
    s = gm.train_gm(gm.GMConfig.from_dict({**GM, "group_size": group_size}), shards, tmp_path)
    assert len({r["steps"] for r in s1["records"]}) > 1  # the budgets differ, so a group shrinks
    for a, b in zip(s1["records"], s["records"]):
        assert (b["steps"], b["own_steps"], b["accounting"]["tokens"]) == \
               (a["steps"], a["own_steps"], a["accounting"]["tokens"])
        assert b["history"]["step"] == a["history"]["step"] and b["accounting"]["gpu_seconds"] > 0
        np.testing.assert_allclose(b["history"]["loss"], a["history"]["loss"], **TOL)
        assert b["val_loss"] == pytest.approx(a["val_loss"], abs=1e-5)
        assert b["val_loss_start"] == pytest.approx(a["val_loss_start"], abs=1e-5)
    w1, w = store_weights(out1, s1["experts"]), store_weights(tmp_path, s["experts"])
    for n in w1:
        for k in w1[n]:
            torch.testing.assert_close(w[n][k], w1[n][k], **TOL, msg=f"{n} {k}")
    assert s["accounting"]["tokens"] == s1["accounting"]["tokens"]


def test_group_size_is_checked():
    from gmlib import gm
    with pytest.raises(ValueError, match="group_size"):
        gm.GMConfig(group_size=0)
    with pytest.raises(ValueError, match="fused group"):
        gm.GMConfig.from_dict({"group_size": 2, "fp8": "all"})
    assert gm.GMConfig().group_size == 1  # one expert at a time unless asked


def test_fused_loss_compiles_as_one_graph():
    """torch.compile sees the whole fused pass as one graph (a break would split the GPU's kernels
    and cost a host round trip each step); dynamo's trace alone, no code generation."""
    torch._dynamo.reset()
    cfg = make_config("tiny", vocab_size=V, seq_len=T, activation="swiglu")
    models = [GPT(cfg) for _ in range(2)]
    idx = torch.randint(0, V, (2, B, T))
    w = stack_state([dict(m.named_parameters()) for m in models])
    ex = torch._dynamo.explain(fused_loss)(w, cfg, idx, idx, models[0].rope_cos, models[0].rope_sin)
    assert (ex.graph_count, ex.graph_break_count) == (1, 0), ex.break_reasons


@pytest.mark.parametrize("resume_with", [3, 1])
def test_gm_group_resumes_after_a_crash(gm_alone, shards, tmp_path, monkeypatch, resume_with):
    """A gm killed in its second group segment resumes from the store: with the same group size it ends
    bit-identical to an uninterrupted run; group_size may change in the rerun (it changes only rounding)."""
    from gmlib import fused, gm
    ref = gm.train_gm(gm.GMConfig.from_dict({**GM, "group_size": 3}), shards, tmp_path / "ref")
    calls, real_run = [0], fused.GroupTrainer.run

    def crashing_run(self, steps):
        calls[0] += 1
        if calls[0] == 2:
            raise KeyboardInterrupt("simulated kill")
        return real_run(self, steps)

    monkeypatch.setattr(fused.GroupTrainer, "run", crashing_run)
    with pytest.raises(KeyboardInterrupt):
        gm.train_gm(gm.GMConfig.from_dict({**GM, "group_size": 3}), shards, tmp_path / "gm")
    s = gm.train_gm(gm.GMConfig.from_dict({**GM, "group_size": resume_with}), shards, tmp_path / "gm")
    want_out, want = (tmp_path / "ref", ref) if resume_with == 3 else gm_alone
    assert [r["steps"] for r in s["records"]] == [r["steps"] for r in want["records"]]
    w_ref, w = store_weights(want_out, s["experts"]), store_weights(tmp_path / "gm", s["experts"])
    for n in w_ref:
        for k in w_ref[n]:
            if resume_with == 3:
                assert torch.equal(w[n][k], w_ref[n][k]), (n, k)
            else:
                torch.testing.assert_close(w[n][k], w_ref[n][k], **TOL, msg=f"{n} {k}")
