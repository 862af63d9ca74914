"""Data-parallel dense training (DDP over gloo, two CPU processes) against one process at the same
global batch: the same windows, losses, weights and branch checkpoints (also across a stop and a
resume from rank 0's checkpoint), and the compute accounted for the whole run (tokens of every
rank, device-seconds summed over ranks)."""
import json
import multiprocessing as mp
import os
import socket

import numpy as np
import pytest
import torch

from gmlib.checkpoint import read_checkpoint
from gmlib.data import ShardWriter, TokenShards, WindowSampler
from gmlib.model import make_config
from gmlib.train import TrainConfig, branch_path, run_with_branches, setup

MODEL = make_config("tiny", vocab_size=256, seq_len=32)
# grad_accum 2: DDP must average gradients once per optimizer step, not per micro-batch
TCFG = dict(max_steps=8, batch_size=4, grad_accum=2, lr=3e-3, warmup_steps=2, schedule="wsd", decay_frac=0.25,
            eval_every=4, eval_batches=2, log_every=2)


@pytest.fixture(scope="module")
def syn_shards(tmp_path_factory):
    root = tmp_path_factory.mktemp("syn")
    rng = np.random.default_rng(0)
    for split, n_docs in (("train", 20), ("val", 4)):
        with ShardWriter(root / split, vocab_size=256, sources=["syn"]) as w:
            for _ in range(n_docs):
                w.add(rng.integers(1, 256, 150))
    return root


def test_ranks_read_disjoint_rows_of_the_global_batch(syn_shards):
    shards = TokenShards(syn_shards / "train")
    one = WindowSampler(shards, 32, 6, seed=3)
    parts = [WindowSampler(shards, 32, 6, seed=3, rank=r, world_size=3) for r in range(3)]
    for step in (0, 7):
        x, y = one.batch(step)
        got = [p.batch(step) for p in parts]
        assert all(g[0].shape == (2, 32) for g in got)
        np.testing.assert_array_equal(np.concatenate([g[0] for g in got]), x)
        np.testing.assert_array_equal(np.concatenate([g[1] for g in got]), y)
    with pytest.raises(ValueError, match="divisible"):
        WindowSampler(shards, 32, 5, rank=0, world_size=2)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _rank(rank, world, port, shards, ckpt_dir, out, stop_at=None):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world),
                      LOCAL_RANK=str(rank))
    torch.set_num_threads(1)
    from gmlib import distributed
    with distributed.group("gloo"):
        _train(rank, world, shards, ckpt_dir, out, stop_at)


def _train(rank, world, shards, ckpt_dir, out, stop_at):
    tr = setup(MODEL, TrainConfig(**TCFG, device="cpu"), shards, ckpt_path=ckpt_dir / "checkpoint.safetensors",
               rank=rank, world_size=world)
    if stop_at:  # a run cut short: its checkpoint (rank 0's) is where the next launch resumes, on every rank
        tr.run(steps=stop_at, progress=False)
        (out / f"rank{rank}_first.json").write_text(json.dumps({"seconds": tr.acct["seconds"]}))
        return
    start = tr.acct["seconds"]  # resumed: rank 0's clock of the first launch, on every rank
    acct, paths = run_with_branches(tr, [0.5], ckpt_dir, progress=False)
    val = tr.evaluate(batches=3)
    with open(out / f"rank{rank}.json", "w") as f:
        json.dump({"history": tr.history, "acct": acct, "seconds": tr.acct["seconds"] - start, "val": val,
                   "branches": sorted(paths)}, f)


def test_ddp_on_two_processes_is_the_one_process_run(syn_shards, tmp_path):
    torch.set_num_threads(1)
    ref = setup(MODEL, TrainConfig(**TCFG, device="cpu"), syn_shards,
                ckpt_path=tmp_path / "one" / "checkpoint.safetensors")
    ref_acct, ref_paths = run_with_branches(ref, [0.5], tmp_path / "one", progress=False)
    ref_val = ref.evaluate(batches=3)

    # spawn, not fork: a process forked after torch has run (the reference above, other tests) can hang
    ctx = mp.get_context("spawn")
    for stop_at in (4, None):  # stopped at step 4, then resumed to the end: its branch at step 4 is saved on resuming
        port = _free_port()
        procs = [ctx.Process(target=_rank, args=(r, 2, port, syn_shards, tmp_path / "two", tmp_path, stop_at))
                 for r in range(2)]
        for p in procs:
            p.start()
        for p in procs:
            p.join(120)
        assert [p.exitcode for p in procs] == [0, 0]
    got = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(2)]
    first = [json.loads((tmp_path / f"rank{r}_first.json").read_text()) for r in range(2)]

    for g in got:  # every rank logs the global loss: the mean over both ranks' rows
        for k in ("step", "loss", "lr", "grad_norm", "val_step", "val_loss"):
            np.testing.assert_allclose(g["history"][k], ref.history[k], rtol=2e-5, atol=1e-6, err_msg=k)
        assert abs(g["val"] - ref_val) < 1e-5
        assert g["branches"] == sorted(ref_paths)
    # rank 0's checkpoints (it alone writes): the one-process weights and optimizer state
    for name in ("checkpoint.safetensors", branch_path("", sorted(ref_paths)[0]).name):
        a, meta_a = read_checkpoint(tmp_path / "one" / name)
        b, meta_b = read_checkpoint(tmp_path / "two" / name)
        assert a.keys() == b.keys() and meta_a["step"] == meta_b["step"] and meta_a["data_pos"] == meta_b["data_pos"]
        for k in a:  # fp32 sums in another order, amplified by Adam's 1/sqrt(v): a few 1e-6 after 8 steps of
            # lr 3e-3 (weights move by about 2e-2), so 3e-5 is a thousandth of the training's own movement
            torch.testing.assert_close(b[k], a[k], rtol=1e-3, atol=3e-5, msg=f"{name}: {k}")
    assert sorted(p.name for p in (tmp_path / "two").iterdir()) == sorted(p.name for p in (tmp_path / "one").iterdir())
    # compute of the whole run: every rank's tokens, device-seconds summed over the ranks
    acct = got[0]["acct"]
    assert acct["tokens"] == ref_acct["tokens"] == 8 * 4 * 2 * 32 and acct["flops_6nd"] == ref_acct["flops_6nd"]
    assert acct["world_size"] == 2 and got[1]["acct"]["gpu_seconds"] == acct["gpu_seconds"]
    # both launches, each rank's own seconds (the ranks' clocks differ, and a resumed rank reads rank 0's)
    launches = sum(f["seconds"] for f in first) + sum(g["seconds"] for g in got)
    assert acct["gpu_seconds"] == pytest.approx(launches, rel=1e-3, abs=1e-3)


def test_ddp_needs_a_process_group_and_a_token_budget(syn_shards):
    with pytest.raises(RuntimeError, match="torch.distributed"):
        setup(MODEL, TrainConfig(**TCFG, device="cpu"), syn_shards, rank=0, world_size=2)


def test_a_state_from_before_data_parallelism_reads_its_seconds_as_gpu_seconds():
    from gmlib.train import RunState
    old = {"step": 3, "data_pos": 3, "acct": {"tokens": 96, "seconds": 1.5, "eval_seconds": 0.25},
           "history": {"step": [3], "loss": [5.0]}}
    state = RunState.from_dict(old)
    assert state.acct == {"tokens": 96, "seconds": 1.5, "gpu_seconds": 1.5, "eval_seconds": 0.25}
    assert RunState.from_dict(state.to_dict()) == state and RunState().acct["gpu_seconds"] == 0.0
