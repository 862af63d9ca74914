"""Checkpoints: exact round trip of weights and AdamW state, clear errors for damaged files,
atomic writes."""
import pytest
import torch

from gmlib import checkpoint
from gmlib.checkpoint import (load_checkpoint, load_model, load_state_tensors, read_checkpoint, save_checkpoint,
                              state_tensors)
from gmlib.model import GPT, GPTConfig
from gmlib.train import TrainConfig, make_optimizer

CFG = GPTConfig(vocab_size=50, n_layer=2, n_head=2, n_embd=16, seq_len=8)


def fresh(seed=0):
    torch.manual_seed(seed)
    model = GPT(CFG)
    return model, make_optimizer(model, TrainConfig(lr=1e-2), "cpu")


def adam_steps(model, opt, n, seed=1):
    g = torch.Generator().manual_seed(seed)
    for _ in range(n):
        idx = torch.randint(0, 50, (2, 8), generator=g)
        model(idx, idx.roll(1, dims=1))[1].backward()
        opt.step()
        opt.zero_grad()


def test_state_tensors_names():
    model, opt = fresh()
    assert set(state_tensors(model, opt)) == {f"model.{k}" for k in model.state_dict()}  # no optimizer state yet
    adam_steps(model, opt, 1)
    keys = state_tensors(model, opt)
    assert {"optim.wte.weight.exp_avg", "optim.wte.weight.exp_avg_sq", "optim.wte.weight.step",
            "optim.blocks.0.norm1.weight.exp_avg"} <= set(keys)
    assert len(keys) == len(model.state_dict()) + 3 * len(list(model.parameters()))


def test_roundtrip_continues_identically(tmp_path):
    """A restored model+optimizer takes exactly the next step the original takes."""
    model, opt = fresh()
    adam_steps(model, opt, 3)
    path = save_checkpoint(tmp_path / "c.safetensors", model, opt, {"step": 3, "note": "ok"})
    model2, opt2 = fresh(seed=99)                      # different weights before loading
    _, meta = load_checkpoint(path, model2, opt2)
    assert meta["step"] == 3 and meta["note"] == "ok" and meta["config"] == model.config_dict()
    assert meta["optimizer"][0]["weight_decay"] == 0.1 and meta["optimizer"][1]["weight_decay"] == 0.0
    adam_steps(model, opt, 2, seed=7)
    adam_steps(model2, opt2, 2, seed=7)
    for (k, a), b in zip(model.state_dict().items(), model2.state_dict().values()):
        assert torch.equal(a, b), k


def test_in_memory_swap_without_files():
    """The expert-store path: state out as tensors, into other objects, same continuation."""
    model, opt = fresh()
    adam_steps(model, opt, 2)
    saved = {k: v.detach().clone() for k, v in state_tensors(model, opt).items()}
    model2, opt2 = fresh(seed=5)
    adam_steps(model2, opt2, 1)                        # stale optimizer state that must be replaced
    load_state_tensors(model2, opt2, saved)
    adam_steps(model, opt, 1, seed=3)
    adam_steps(model2, opt2, 1, seed=3)
    assert all(torch.equal(a, b) for a, b in zip(model.parameters(), model2.parameters()))


def test_load_model_builds_from_stored_config(tmp_path):
    model, opt = fresh()
    path = save_checkpoint(tmp_path / "c.safetensors", model, opt, {})
    loaded = load_model(path)
    assert loaded.cfg == CFG and not loaded.training
    idx = torch.randint(0, 50, (1, 8))
    assert torch.equal(loaded(idx)[0], model.eval()(idx)[0])


def test_damaged_files_fail_clearly(tmp_path):
    model, opt = fresh()
    adam_steps(model, opt, 1)
    path = save_checkpoint(tmp_path / "c.safetensors", model, opt, {})
    data = path.read_bytes()
    (tmp_path / "short.safetensors").write_bytes(data[: len(data) // 2])
    (tmp_path / "junk.safetensors").write_bytes(b"\x00" * 64)
    for name in ("short", "junk"):
        with pytest.raises(ValueError, match=f"{name}.safetensors: unreadable checkpoint"):
            read_checkpoint(tmp_path / f"{name}.safetensors")
    with pytest.raises(FileNotFoundError, match="missing.safetensors"):
        load_model(tmp_path / "missing.safetensors")
    other = GPT(GPTConfig(vocab_size=60, n_layer=2, n_head=2, n_embd=16, seq_len=8))
    with pytest.raises(ValueError, match="c.safetensors: checkpoint config"):
        load_checkpoint(path, other)


def test_failed_save_keeps_previous_checkpoint(tmp_path, monkeypatch):
    model, opt = fresh()
    path = save_checkpoint(tmp_path / "c.safetensors", model, opt, {"step": 1})

    def crash(tensors, filename, metadata=None):
        open(filename, "wb").write(b"half a file")
        raise OSError("disk full")
    monkeypatch.setattr(checkpoint, "save_file", crash)
    with pytest.raises(OSError, match="disk full"):
        save_checkpoint(path, model, opt, {"step": 2})
    assert read_checkpoint(path)[1]["step"] == 1
    assert [p.name for p in tmp_path.iterdir()] == ["c.safetensors"]  # no temporary file left behind
