"""Checkpoints: one safetensors file holding a model, its AdamW state and a JSON metadata blob.

  model.<name>                     weights (fp32, as trained)
  optim.<param name>.exp_avg       AdamW first moment
  optim.<param name>.exp_avg_sq    AdamW second moment
  optim.<param name>.step          AdamW step count (0-d tensor)
  header metadata "gm"             JSON: format, model config, and whatever the trainer adds
                                   (step, tokens seen, data position, RNG states, accounting, ...)

Optimizer state is keyed by parameter *name*, not by position, so a file stays readable if
parameter order changes and the expert store can keep the same flat dict[str, Tensor] per
expert. Files are written atomically: a crash mid-save leaves the previous checkpoint intact.
"""
import json
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from . import atomic
from .model import GPT, GPTConfig

FORMAT = "gm-ckpt-v1"


def state_tensors(model: torch.nn.Module, optimizer: torch.optim.Optimizer | None = None) -> dict:
    """The full trainable state as a flat dict of the live tensors (no copies; detach/copy them
    yourself before the model trains on). Optimizer entries exist only for parameters that
    have optimizer state, i.e. after the first step."""
    out = {f"model.{k}": v for k, v in model.state_dict().items()}
    if optimizer is not None:
        names = {id(p): n for n, p in model.named_parameters()}
        for group in optimizer.param_groups:
            for p in group["params"]:
                st = optimizer.state.get(p)
                if not st:
                    continue
                if id(p) not in names:
                    raise ValueError("optimizer holds a parameter that is not in the model")
                for k in ("exp_avg", "exp_avg_sq", "step"):
                    out[f"optim.{names[id(p)]}.{k}"] = st[k]
    return out


def load_state_tensors(model: torch.nn.Module, optimizer: torch.optim.Optimizer | None, tensors: dict):
    """Copy a state_tensors() dict into an existing model (in place, so a compiled model and
    the optimizer keep pointing at the same parameters) and optimizer (state replaced; without
    optim.* entries the optimizer starts fresh)."""
    own = model.state_dict()
    given = {k[len("model."):]: v for k, v in tensors.items() if k.startswith("model.")}
    missing, unexpected = sorted(set(own) - set(given)), sorted(set(given) - set(own))
    if missing or unexpected:
        raise ValueError(f"model weights do not match the model: missing {missing[:5]}, unexpected {unexpected[:5]}")
    for k, v in given.items():
        if own[k].shape != v.shape:
            raise ValueError(f"model.{k}: shape {tuple(v.shape)} in the state, {tuple(own[k].shape)} in the model")
    with torch.no_grad():
        for k, v in given.items():
            own[k].copy_(v)
    if optimizer is None:
        return
    params = dict(model.named_parameters())
    names = {id(p): n for n, p in params.items()}
    optimizer.state.clear()
    for group in optimizer.param_groups:
        # fused and capturable AdamW keep `step` on the parameter's device, the others on the CPU
        step_on_device = group.get("fused") or group.get("capturable")
        for p in group["params"]:
            key = f"optim.{names[id(p)]}"
            if f"{key}.exp_avg" not in tensors:
                continue
            m, v, step = (tensors[f"{key}.{k}"] for k in ("exp_avg", "exp_avg_sq", "step"))
            if m.shape != p.shape or v.shape != p.shape:
                raise ValueError(f"{key}: optimizer moments of shape {tuple(m.shape)}, parameter {tuple(p.shape)}")
            optimizer.state[p] = {
                "step": step.detach().to(p.device if step_on_device else "cpu", torch.float32).clone(),
                "exp_avg": m.detach().to(p.device, p.dtype).clone(),
                "exp_avg_sq": v.detach().to(p.device, p.dtype).clone(),
            }
    extra = {k.rsplit(".", 1)[0][len("optim."):] for k in tensors if k.startswith("optim.")} - set(params)
    if extra:
        raise ValueError(f"optimizer state for parameters the model lacks: {sorted(extra)[:5]}")


def save_checkpoint(path, model: GPT, optimizer=None, meta: dict | None = None) -> Path:
    """Write model (+ optimizer) state and `meta` (JSON-serialisable) atomically to `path`."""
    path = Path(path)
    tensors = {k: v.detach().cpu().contiguous() for k, v in state_tensors(model, optimizer).items()}
    header = {"format": FORMAT, "config": model.config_dict(), **(meta or {})}
    if optimizer is not None:
        header["optimizer"] = [{k: v for k, v in g.items() if k != "params"} for g in optimizer.param_groups]
    with atomic.atomic_path(path) as tmp:
        save_file(tensors, str(tmp), metadata={"gm": json.dumps(header, default=atomic._jsonable)})
    return path


def _open(path, device, read):
    """read(f) on the open safetensors file, with a clear error for a missing or damaged file."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such checkpoint")
    try:
        with safe_open(str(path), framework="pt", device=str(device)) as f:
            raw = (f.metadata() or {}).get("gm")
            out = read(f)
    except Exception as e:  # safetensors raises its own error type for bad headers and short files
        raise ValueError(f"{path}: unreadable checkpoint (truncated or corrupted?): {e}") from e
    if raw is None:
        raise ValueError(f"{path}: a safetensors file without gm metadata, not a gm checkpoint")
    meta = json.loads(raw)
    if meta.get("format") != FORMAT:
        raise ValueError(f"{path}: unknown checkpoint format {meta.get('format')!r}")
    return out, meta


def read_meta(path) -> dict:
    """The metadata of a checkpoint (config, step, accounting, ...) from its header alone."""
    return _open(path, "cpu", lambda f: None)[1]


def read_checkpoint(path, device="cpu", weights_only: bool = False) -> tuple[dict, dict]:
    """(tensors, meta) of a checkpoint file; weights_only skips the optimizer state (2/3 of
    the bytes), which evaluation never needs."""
    keep = (lambda k: k.startswith("model.")) if weights_only else (lambda k: True)
    return _open(path, device, lambda f: {k: f.get_tensor(k) for k in f.keys() if keep(k)})


def load_checkpoint(path, model: GPT | None = None, optimizer=None, device="cpu") -> tuple[GPT, dict]:
    """Load weights (and optimizer state, if an optimizer is given) into `model`, or into a new
    GPT built from the stored config. Returns (model, meta)."""
    tensors, meta = read_checkpoint(path, device, weights_only=optimizer is None)
    if model is None:
        model = GPT(GPTConfig(**meta["config"])).to(device)
    elif GPTConfig(**meta["config"]) != model.cfg:  # compared as configs, so new fields take their defaults
        raise ValueError(f"{path}: checkpoint config {meta['config']} differs from the model's {model.config_dict()}")
    try:
        load_state_tensors(model, optimizer, tensors)
    except ValueError as e:
        raise ValueError(f"{path}: {e}") from e
    return model, meta


def load_model(path, device="cpu") -> GPT:
    """The trained GPT of a checkpoint, in eval mode (for evaluation and generation)."""
    model, _ = load_checkpoint(path, device=device)
    return model.eval()
