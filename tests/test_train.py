"""The training engine: learning on real shards, exact resume (in memory, from a file, and
after a real SIGKILL), schedule and accounting against hand values, clear errors."""
import math
import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch

from gmlib.checkpoint import load_state_tensors, state_tensors
from gmlib.data import ShardWriter, TokenShards, WindowSampler
from gmlib.model import GPT, make_config
from gmlib.paths import REPO_ROOT
from gmlib.checkpoint import read_checkpoint
from gmlib.train import Trainer, TrainConfig, branch_path, branch_step, lr_at, run_with_branches, setup

MODEL = make_config("tiny", vocab_size=256, seq_len=32)
TCFG = dict(max_steps=20, batch_size=4, lr=3e-3, warmup_steps=5, eval_every=10, eval_batches=2, log_every=1)


@pytest.fixture(scope="module")
def syn_shards(tmp_path_factory):
    """Synthetic shards (vocab 256) from a noisy deterministic rule, for the resume tests: they
    must run even where the shared corpus (tiny_shards) is absent."""
    root = tmp_path_factory.mktemp("syn")
    rng = np.random.default_rng(0)
    for split, n_docs in (("train", 40), ("val", 5)):
        with ShardWriter(root / split, vocab_size=256, sources=["syn"]) as w:
            for _ in range(n_docs):
                doc = [1]
                for _ in range(200):
                    doc.append((doc[-1] * 7 + 3) % 250 if rng.random() < 0.9 else int(rng.integers(2, 256)))
                w.add(doc)
    return root


def weights(model):
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def assert_same_run(a_hist, a_weights, b_hist, b_weights):
    for k in ("step", "loss", "lr", "grad_norm", "val_step", "val_loss"):
        np.testing.assert_allclose(a_hist[k], b_hist[k], rtol=1e-6, atol=1e-7, err_msg=k)
    for k in a_weights:
        torch.testing.assert_close(a_weights[k], b_weights[k], rtol=1e-6, atol=1e-7, msg=k)


@pytest.fixture(scope="module")
def uninterrupted(syn_shards):
    tr = setup(MODEL, TrainConfig(**TCFG), syn_shards)
    tr.run(progress=False)
    return tr.history, weights(tr.model)


def test_loss_falls_on_real_shards(tiny_shards):
    vocab = TokenShards(tiny_shards / "train").vocab_size  # the tokenizer's, from the shards' meta
    cfg = TrainConfig(max_steps=60, batch_size=8, lr=1e-2, min_lr=1e-3, warmup_steps=10, eval_every=60, eval_batches=4)
    tr = setup(make_config("tiny", vocab_size=vocab, seq_len=64), cfg, tiny_shards)
    start = tr.evaluate()
    assert abs(start - math.log(vocab)) < 0.2  # an untrained model predicts nearly uniformly
    tr.run(progress=False)
    # 60 steps (about 30k tokens) take the held-out loss from ln(1000) = 6.9 to about 5.75 nats
    assert tr.history["val_loss"][-1] < start - 1.0, (start, tr.history["val_loss"])
    assert tr.history["loss"][-1] < tr.history["loss"][0] - 0.5


def test_resume_from_file_equals_uninterrupted(syn_shards, tmp_path, uninterrupted):
    ck = tmp_path / "ck.safetensors"
    first = setup(MODEL, TrainConfig(**TCFG), syn_shards, ckpt_path=ck)
    first.run(steps=10, progress=False)                  # saves at the end of the segment
    second = setup(MODEL, TrainConfig(**TCFG), syn_shards, ckpt_path=ck)  # fresh objects, resumes
    assert second.step == 10 and second.data_pos == 10
    second.run(progress=False)
    assert_same_run(*uninterrupted, second.history, weights(second.model))


def test_resume_in_memory_equals_uninterrupted(syn_shards, uninterrupted):
    """How the multi-expert trainer swaps experts: tensors + Trainer.state_dict(), no files."""
    first = setup(MODEL, TrainConfig(**TCFG), syn_shards)
    first.run(steps=10, progress=False)
    tensors = {k: v.detach().clone() for k, v in state_tensors(first.model, first.optimizer).items()}
    state = first.state_dict()
    model = GPT(MODEL)                                   # any weights: all are overwritten
    second = Trainer(model, TrainConfig(**TCFG), first.train_data, first.val_data)
    load_state_tensors(second.model, second.optimizer, tensors)
    second.load_state_dict(state)
    second.run(progress=False)
    assert_same_run(*uninterrupted, second.history, weights(second.model))


def test_runs_borrowing_one_train_step_continue_exactly(syn_shards, uninterrupted):
    """gm's pattern: the step machinery built once, two runs in turn on it, the second started from
    the first's RunState (the tensors stay in the machinery's model and optimizer); a run whose
    config differs in a machinery setting is refused."""
    first = setup(MODEL, TrainConfig(**TCFG), syn_shards)
    first.run(steps=10, progress=False)
    second = Trainer(first.machine, TrainConfig(**TCFG), first.train_data, first.val_data, state=first.state_dict())
    assert second.model is first.model and second.optimizer is first.optimizer and second.step == 10
    second.run(progress=False)
    assert_same_run(*uninterrupted, second.history, weights(second.model))
    with pytest.raises(ValueError, match="fp8"):
        Trainer(first.machine, TrainConfig(**TCFG, fp8="head"), first.train_data)
    with pytest.raises(ValueError, match="own optimizer"):
        Trainer(first.machine, TrainConfig(**TCFG), first.train_data, optimizer=first.optimizer)


KILLED_RUN = textwrap.dedent("""
    import os, signal, sys
    from gmlib.model import make_config
    from gmlib.train import TrainConfig, setup
    root, ck, cfg = sys.argv[1], sys.argv[2], eval(sys.argv[3])
    def die(tr):
        if tr.step == 13:                 # mid-interval: the last checkpoint is at step 10
            os.kill(os.getpid(), signal.SIGKILL)
    tr = setup(make_config("tiny", vocab_size=256, seq_len=32), TrainConfig(**cfg, ckpt_every=5), root, ckpt_path=ck)
    tr.run(progress=False, callback=die)
""")


def test_resume_after_sigkill_equals_uninterrupted(syn_shards, tmp_path, uninterrupted):
    ck = tmp_path / "ck.safetensors"
    proc = subprocess.run([sys.executable, "-c", KILLED_RUN, str(syn_shards), str(ck), repr(TCFG)], cwd=REPO_ROOT,
                          env={**os.environ, "PYTHONPATH": str(REPO_ROOT)}, capture_output=True, text=True, timeout=120)
    assert proc.returncode == -9, proc.stderr[-2000:]
    tr = setup(MODEL, TrainConfig(**TCFG, ckpt_every=5), syn_shards, ckpt_path=ck)
    assert tr.step == 10
    tr.run(progress=False)
    assert_same_run(*uninterrupted, tr.history, weights(tr.model))


def test_schedule_hand_values():
    cfg = TrainConfig(lr=1.0, min_lr=0.1, warmup_steps=10)
    assert lr_at(cfg, 0, 0.0) == pytest.approx(0.1)            # (0+1)/10 of lr
    assert lr_at(cfg, 9, 0.0) == pytest.approx(1.0)
    assert lr_at(cfg, 50, 0.5) == pytest.approx(0.55)          # cosine midpoint: (lr+min_lr)/2
    assert lr_at(cfg, 100, 1.0) == pytest.approx(0.1)
    assert lr_at(cfg, 100, 1.7) == pytest.approx(0.1)          # past the budget: stays at min_lr


def test_wsd_schedule_hand_values():
    cfg = TrainConfig(lr=1.0, min_lr=0.1, warmup_steps=10, schedule="wsd", decay_frac=0.2)
    assert lr_at(cfg, 0, 0.0) == pytest.approx(0.1)            # the same warmup: (0+1)/10 of lr
    assert lr_at(cfg, 9, 0.0) == pytest.approx(1.0)
    assert lr_at(cfg, 50, 0.5) == pytest.approx(1.0)           # stable: flat at lr
    assert lr_at(cfg, 80, 0.8) == pytest.approx(1.0)           # the decay starts at 1 - decay_frac
    # 1 - sqrt: a quarter into the decay, lr falls by half of (lr - min_lr): 0.1 + 0.9 * (1 - 0.5)
    assert lr_at(cfg, 85, 0.85) == pytest.approx(0.55)
    assert lr_at(cfg, 90, 0.9) == pytest.approx(0.1 + 0.9 * (1 - 0.5 ** 0.5))   # 0.3636
    assert lr_at(cfg, 100, 1.0) == pytest.approx(0.1) and lr_at(cfg, 100, 1.7) == pytest.approx(0.1)
    flat = TrainConfig(lr=1.0, min_lr=0.1, warmup_steps=0, schedule="wsd", decay_frac=0.0)
    assert lr_at(flat, 99, 0.99) == 1.0                        # no decay at all
    with pytest.raises(ValueError, match="schedule"):
        TrainConfig(schedule="linear")
    with pytest.raises(ValueError, match="decay_frac"):
        TrainConfig(schedule="wsd", decay_frac=1.5)
    assert TrainConfig().schedule == "cosine"                  # old params keep their schedule


def test_branch_checkpoints_hold_the_run_at_their_step(syn_shards, tmp_path):
    """run_with_branches saves the full state at each branch step; resuming from one of them
    finishes exactly as the uninterrupted run did."""
    cfg = TrainConfig(**{**TCFG, "schedule": "wsd", "decay_frac": 0.3})
    tr = setup(MODEL, cfg, syn_shards)
    _, paths = run_with_branches(tr, [0.5, 0.25], tmp_path, progress=False)
    assert sorted(paths) == [branch_step(0.25, 20), branch_step(0.5, 20)] == [5, 10]
    tensors, meta = read_checkpoint(paths[10])
    assert meta["step"] == 10 and meta["data_pos"] == 10 and meta["max_steps"] == 20
    assert tensors["optim.wte.weight.step"].item() == 10       # AdamW's own step count too
    again = setup(MODEL, cfg, syn_shards, ckpt_path=branch_path(tmp_path, 10))
    assert again.step == 10
    again.run(progress=False)
    assert_same_run(tr.history, weights(tr.model), again.history, weights(again.model))
    with pytest.raises(ValueError, match="schedule='wsd'"):
        run_with_branches(setup(MODEL, TrainConfig(**TCFG), syn_shards), [0.5], tmp_path)
    with pytest.raises(ValueError, match="lies in the decay"):
        run_with_branches(setup(MODEL, cfg, syn_shards), [0.9], tmp_path)


def test_accounting_and_budgets(syn_shards):
    tr = setup(MODEL, TrainConfig(**{**TCFG, "max_tokens": 5 * 4 * 32, "grad_accum": 2, "eval_every": 0}), syn_shards)
    assert tr.max_steps == 3                                   # ceil(640 / (4*32*2))
    acct = tr.run(progress=False)
    n = 256 * 64 + 2 * (12 * 64 * 64 + 2 * 64) + 64           # tiny at vocab 256, by hand: 115008
    tokens = 3 * 2 * 4 * 32
    assert acct["step"] == 3 and tr.data_pos == 6 and acct["params"] == n and acct["tokens"] == tokens
    assert acct["flops_6nd"] == 6 * n * tokens
    assert acct["flops"] == (6 * n + 12 * 2 * 64 * 32) * tokens
    assert acct["gpu_seconds"] > 0 and tr.history["val_step"] == [3]   # validated when the budget ended
    # a time budget stops the run: 1 microsecond allows exactly one step
    tr = setup(MODEL, TrainConfig(**{**TCFG, "max_seconds": 1e-6, "eval_every": 0}), syn_shards)
    assert tr.run(progress=False)["step"] == 1


def test_bad_setups_fail_clearly(syn_shards, tmp_path):
    with pytest.raises(ValueError, match=r"syn\d*/train: tokens come from a vocabulary of 256.*vocab_size is 200"):
        setup(make_config("tiny", vocab_size=200), TrainConfig(**TCFG), syn_shards)
    model = GPT(MODEL)
    with pytest.raises(ValueError, match="exceed the model's seq_len 32"):
        Trainer(model, TrainConfig(**TCFG), WindowSampler(TokenShards(syn_shards / "train"), 64, 4))
    with pytest.raises(ValueError, match="min_lr"):
        TrainConfig(lr=1e-3, min_lr=1e-2)
    (tmp_path / "bad.safetensors").write_bytes(b"not a checkpoint")
    with pytest.raises(ValueError, match="bad.safetensors: unreadable checkpoint"):
        setup(MODEL, TrainConfig(**TCFG), syn_shards, ckpt_path=tmp_path / "bad.safetensors")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_compiled_resume_restores_state(syn_shards, tmp_path):
    """On a GPU (bf16 autocast, fused AdamW with its step on the device, torch.compile): a resumed
    trainer holds exactly the saved state and continues close to the original. GPU kernels with
    atomics (embedding and attention backward) are not bit-reproducible, hence the tolerance."""
    kw = {**TCFG, "device": "cuda", "compile": True, "max_steps": 8, "eval_every": 0}
    ck = tmp_path / "ck.safetensors"
    first = setup(MODEL, TrainConfig(**kw), syn_shards, ckpt_path=ck)
    first.run(steps=4, progress=False)
    saved = {k: v.detach().clone() for k, v in state_tensors(first.model, first.optimizer).items()}
    assert saved["optim.wte.weight.step"].item() == 4
    second = setup(MODEL, TrainConfig(**kw), syn_shards, ckpt_path=ck)
    for k, v in state_tensors(second.model, second.optimizer).items():
        assert torch.equal(v.to(saved[k].device), saved[k]), k
    first.run(progress=False)
    second.run(progress=False)
    np.testing.assert_allclose(first.history["loss"], second.history["loss"], rtol=2e-2)
    assert second.accounting()["tokens"] == 8 * 4 * 32


def test_bf16_residual_stream_stays_bf16_and_close_to_fp32(syn_shards):
    """bf16_residual: every block reads and writes bf16 under bf16 autocast, and the loss moves by
    bf16's rounding only. The Trainer applies it on CUDA alone (on the CPU there is no autocast)."""
    torch.manual_seed(0)
    model = GPT(MODEL)
    idx = torch.randint(0, 256, (4, 33), generator=torch.Generator().manual_seed(1))
    seen = []
    model.blocks[0].register_forward_hook(lambda m, args, out: seen.append((args[0].dtype, out.dtype)))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        ref = model(idx[:, :-1], idx[:, 1:], return_logits=False)[1]
        model.residual_dtype = torch.bfloat16
        low = model(idx[:, :-1], idx[:, 1:], return_logits=False)[1]
    assert seen == [(torch.float32, torch.float32), (torch.bfloat16, torch.bfloat16)]
    assert abs(low.item() - ref.item()) < 0.02 * ref.item()
    tr = setup(MODEL, TrainConfig(**TCFG, bf16_residual=True, device="cpu"), syn_shards)
    assert tr.model.residual_dtype is None
