"""One model's step machinery, built once and reused by every run that trains the model.

TrainStep holds what depends on the model and the machine, not on a run: the model on its device
(FP8 training matmuls, the bf16 residual stream), its AdamW, the forward (torch.compile'd or
eager), autocast, the host-to-device batch copy, clipping and the optimizer step, and the
validation pass. A run (gmlib.train.Trainer: its config, data, budget and RunState) borrows one.
The dense trainer builds one per model; gm's trainer builds one per slot of its rank and lends it
to every expert of that shape in turn, so fp8.convert and the compile wrapper run once per slot,
not once per segment, and the compiled graph is shared by all of them.

The settings a TrainStep is built with (MACHINE) are fixed for its life; a run whose config
differs in one of them is a clear error (TrainStep.check), not a silent mix.

Data parallelism (DDP, one process per GPU under torchrun; gloo on a CPU in the tests): a TrainStep
built with world_size > 1 wraps its model in DistributedDataParallel before compiling it, so the
backward of a micro-batch averages gradients over the ranks; `sync(False)` holds that back for the
micro-batches before an optimizer step's last (DDP's no_sync). world_size 1 is the plain model.
"""
from contextlib import nullcontext

import numpy as np
import torch

from . import distributed, fp8

# TrainConfig fields the machinery is built from: equal for every run that borrows one TrainStep
MACHINE = ("device", "compile", "compile_mode", "fp8", "fp8_scaling", "bf16_residual", "sdpa", "weight_decay",
           "betas")


def resolve_device(name: str) -> torch.device:
    """"auto", "cpu", "cuda" or "cuda:N"; asking for a GPU where none is usable is a clear error
    here rather than a CUDA trace from the first tensor moved."""
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    try:
        dev = torch.device(name)
    except (RuntimeError, TypeError) as e:
        raise ValueError(f"device={name!r}: not a device name; use 'auto', 'cpu' or 'cuda'") from e
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            why = ("this torch has no CUDA" if torch.version.cuda is None
                   else "no GPU is visible (CUDA_VISIBLE_DEVICES?)")
            raise RuntimeError(f"device={name!r} asked for a GPU, but {why}; use device='auto' or 'cpu'")
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise RuntimeError(f"device={name!r}: only {torch.cuda.device_count()} GPU(s) visible")
    return dev


def make_optimizer(model: torch.nn.Module, cfg, device) -> torch.optim.AdamW:
    """AdamW (cfg: a TrainConfig); decay only matrices (weights, embedding), not norm gains.
    Fused kernel on CUDA."""
    params = [p for p in model.parameters() if p.requires_grad]
    groups = [{"params": [p for p in params if p.dim() >= 2], "weight_decay": cfg.weight_decay},
              {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=cfg.betas, fused=torch.device(device).type == "cuda")


class TrainStep:
    """TrainStep(model, cfg, optimizer=None): the model moved to cfg.device and converted (cfg.fp8,
    cfg.bf16_residual), its optimizer (make_optimizer unless given) and its forward (compiled when
    cfg.compile). cfg is a TrainConfig; only its MACHINE fields are kept. world_size > 1: this process's
    part of a data-parallel run (under gmlib.distributed.init with as many processes), the model in DDP."""

    def __init__(self, model: torch.nn.Module, cfg, optimizer: torch.optim.Optimizer | None = None,
                 world_size: int = 1):
        self.settings = {k: getattr(cfg, k) for k in MACHINE}
        self.world_size = world_size
        if world_size > 1 and distributed.world_size() != world_size:
            raise RuntimeError(f"TrainStep: a data-parallel step of {world_size} ranks needs torch.distributed with "
                               f"as many (gmlib.distributed.init under torchrun); found {distributed.world_size()}")
        self.device = self._asked = resolve_device(cfg.device)
        if self.device.type == "cuda" and self.device.index is None and world_size > 1:
            self.device = torch.device("cuda", torch.cuda.current_device())  # this rank's GPU (distributed.init)
        if self.device.type == "cuda":
            torch.backends.cuda.matmul.allow_tf32 = True  # any fp32 matmul left outside autocast
            torch.backends.cudnn.allow_tf32 = True
            if cfg.sdpa == "cudnn":  # only cuDNN (or the slow math fallback, which would show) may serve SDPA
                torch.backends.cuda.enable_flash_sdp(False)
                torch.backends.cuda.enable_mem_efficient_sdp(False)
                torch.backends.cuda.enable_cudnn_sdp(True)
        self.model = fp8.convert(model.to(self.device), cfg.fp8, cfg.fp8_scaling)
        if cfg.bf16_residual and self.device.type == "cuda":
            self.model.residual_dtype = torch.bfloat16
        self.optimizer = optimizer or make_optimizer(self.model, cfg, self.device)
        self.ddp = None  # the DDP wrapper: gradients averaged over ranks in backward
        if world_size > 1:
            self.ddp = torch.nn.parallel.DistributedDataParallel(
                self.model, device_ids=[self.device.index] if self.device.type == "cuda" else None)
        fwd = self.ddp or self.model
        self.forward = torch.compile(fwd, mode=cfg.compile_mode) if cfg.compile else fwd

    def check(self, cfg):
        """ValueError unless a run's config `cfg` agrees with the settings this machinery was built with."""
        own = dict(self.settings, device=self._asked)
        theirs = {k: resolve_device(cfg.device) if k == "device" else getattr(cfg, k) for k in MACHINE}
        if bad := [k for k in MACHINE if own[k] != theirs[k]]:
            raise ValueError(f"TrainStep: the run's {bad} differ from those this step was built with "
                             f"({ {k: own[k] for k in bad} }); build a TrainStep for them")

    def sync(self, sync: bool = True):
        """The context of a micro-batch's forward and backward: with sync False a data-parallel step
        keeps its gradients on this rank (DDP's no_sync) until the optimizer step's last micro-batch."""
        return nullcontext() if sync or self.ddp is None else self.ddp.no_sync()

    def autocast(self):
        return torch.autocast("cuda", dtype=torch.bfloat16) if self.device.type == "cuda" else nullcontext()

    def batch(self, sampler, i: int):
        """Batch i of a WindowSampler as (inputs, targets) on the device."""
        xy = torch.from_numpy(np.stack(sampler.batch(i)))  # one host-to-device copy for inputs and targets
        if self.device.type == "cuda":
            xy = xy.pin_memory().to(self.device, non_blocking=True)
        return xy[0], xy[1]

    def set_lr(self, lr: float):
        for g in self.optimizer.param_groups:
            g["lr"] = lr

    def loss(self, x, y):
        """The training loss of one micro-batch through the (compiled) forward."""
        with self.autocast():
            return self.forward(x, y, return_logits=False)[1]

    def update(self, grad_clip: float):
        """Clip (0: no clipping), step the optimizer, clear the gradients; returns the gradient norm
        before clipping (a device tensor)."""
        norm = torch.nn.utils.clip_grad_norm_(self.model.parameters(), grad_clip or float("inf"))
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        return norm

    @torch.no_grad()
    def evaluate(self, sampler, batches: int) -> float:
        """Mean loss over the first `batches` batches of `sampler`. Eager (the compiled graph is for
        training); the model's train/eval mode is restored."""
        was_training = self.model.training
        self.model.eval()
        total = torch.zeros((), device=self.device)
        for i in range(batches):
            x, y = self.batch(sampler, i)
            with self.autocast():
                total += self.model(x, y, return_logits=False)[1].float()
        self.model.train(was_training)
        if sampler.world_size > 1:  # every rank scored its rows of the same batches
            total = distributed.all_reduce(total, "mean")
        return total.item() / batches
