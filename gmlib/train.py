"""Training one model: the loop every dense baseline and every gm expert goes through.

bf16 autocast on CUDA (fp32 on CPU), fused AdamW with weight decay on 2-D weights only,
linear warmup times a cosine decay or warmup-stable-decay (WSD, gmlib.schedule), gradient
clipping and accumulation, optional torch.compile, periodic validation, compute accounting
and atomic checkpoints. WSD runs can save branch checkpoints along their stable phase
(run_with_branches), from which gm experts continue.

Two objects. The machinery of a step (gmlib.step.TrainStep: the model on its device, FP8
conversion, AdamW, the compiled forward) is built once per model; a run (Trainer: its config,
data, budget and RunState) borrows it. Resumable by construction: the WindowSampler's batch k
depends only on (seed, k), so the whole data state is the position counter `data_pos`, and a
resumed run sees exactly the batches an uninterrupted one would have seen.

The multi-expert trainer keeps one TrainStep per slot and runs each segment of an expert as a
Trainer on it, started from the expert's RunState (`state=`, JSON-able: step, data position,
accounting, history) with checkpoint.state_tensors() / load_state_tensors() for the tensors,
and saved back with `state_dict()`. No files involved.
gmlib.fused trains several Trainers' models in one batched pass through the public parts of a
step (start_step, next_batch, finish_step, log): each keeps its own schedule, optimizer and books.

Data parallelism (DDP, one process per GPU under torchrun; gloo on a CPU for the tests): a
Trainer whose training sampler has world_size > 1 trains on a TrainStep of that world size (its
model in DistributedDataParallel). The sampler's batch_size stays the global batch and each rank
reads its own disjoint rows of it, so the run takes the same optimizer steps on the same windows
as one process would (the same losses and weights, within float noise). Accounting is global:
tokens (and so 6ND FLOPs) count every rank's windows, gpu_seconds sums every rank's device time.
Only rank 0 writes checkpoints (branch checkpoints included, at the same global steps); every rank
resumes from them.
"""
import base64
import math
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from . import atomic, checkpoint, distributed, fp8
from .data import TokenShards, WindowSampler
from .model import GPT, GPTConfig
from .schedule import SCHEDULES, branch_path, branch_step, lr_at, stable_until  # noqa: F401  (train's API)
from .step import TrainStep, make_optimizer, resolve_device  # noqa: F401  (train's API)

VAL_SEED = 12345  # validation batches are the same whatever the training seed
SDPA = (None, "cudnn")  # attention backends: torch's choice, or cuDNN only (gmlib.step applies it)


@dataclass
class TrainConfig:
    # budget: the schedule ends, and training stops, at whichever of these runs out first
    max_steps: int = 300
    max_tokens: int | None = None
    max_seconds: float | None = None   # device wall time of the training loop (compile included; eval, checkpoints not)
    batch_size: int = 16               # sequences per micro-batch
    grad_accum: int = 1                # micro-batches per optimizer step
    lr: float = 3e-3
    min_lr: float = 3e-4
    warmup_steps: int = 20
    schedule: str = "cosine"           # "cosine": warmup, cosine to min_lr; "wsd": warmup, flat lr, decay at the end
    decay_frac: float = 0.2            # wsd: the last fraction of the budget decays lr to min_lr (1 - sqrt)
    weight_decay: float = 0.1
    betas: tuple = (0.9, 0.95)
    grad_clip: float = 1.0             # max global gradient norm; 0 disables
    eval_every: int = 100              # validation every N steps and when the budget ends (0: at the end only)
    eval_batches: int = 10
    log_every: int = 10                # loss history points and progress updates (the only host syncs)
    ckpt_every: int = 0                # checkpoint every N steps (and at the end) when a path is set; 0: end only
    compile: bool = False
    compile_mode: str | None = None    # None (default) or e.g. "max-autotune-no-cudagraphs"
    fp8: str = ""                      # FP8 training matmuls (gmlib.fp8): "" none, "head" or "all"
    fp8_scaling: str = "tensor"        # FP8 scales per "tensor" or per "row" (gmlib.fp8)
    bf16_residual: bool = False        # on CUDA, carry the residual stream in bf16, not fp32 (half its traffic)
    sdpa: str | None = None            # attention kernel on CUDA: None torch's choice, "cudnn" cuDNN's fused attention
    #                                    only (bench/train_speed.py: +0.9% at 124m); process-wide torch flags
    device: str = "auto"               # "auto": cuda if available, else cpu
    seed: int = 0                      # model init (setup()) and training data order

    def __post_init__(self):
        self.betas = tuple(self.betas)  # YAML gives a list
        for k in ("max_steps", "batch_size", "grad_accum", "eval_batches", "log_every"):
            if getattr(self, k) < 1:
                raise ValueError(f"TrainConfig: {k}={getattr(self, k)} must be >= 1")
        if not 0 <= self.min_lr <= self.lr:
            raise ValueError(f"TrainConfig: need 0 <= min_lr ({self.min_lr}) <= lr ({self.lr})")
        if self.schedule not in SCHEDULES:
            raise ValueError(f"TrainConfig: schedule={self.schedule!r}; choose one of {SCHEDULES}")
        if not 0 <= self.decay_frac <= 1:
            raise ValueError(f"TrainConfig: decay_frac={self.decay_frac} must be in [0, 1]")
        if self.fp8 not in fp8.CHOICES:
            raise ValueError(f"TrainConfig: fp8={self.fp8!r}; choose one of {fp8.CHOICES}")
        if self.fp8_scaling not in fp8.SCALINGS:
            raise ValueError(f"TrainConfig: fp8_scaling={self.fp8_scaling!r}; choose one of {fp8.SCALINGS}")
        if self.sdpa not in SDPA:
            raise ValueError(f"TrainConfig: sdpa={self.sdpa!r}; choose one of {SDPA}")


HISTORY = ("step", "loss", "lr", "grad_norm", "tokens_per_s", "val_step", "val_loss")


@dataclass
class RunState:
    """What a run has done, JSON-able: the step, the data position (the WindowSampler's batch
    counter), the accounting (tokens, seconds, gpu_seconds, eval_seconds) and the history. It travels
    with a checkpoint or a gm expert's store entry; the machinery (gmlib.step.TrainStep) does not.
    seconds is this process's device wall time, gpu_seconds the sum over the ranks of a data-parallel
    run (the same on one device; a state from before data parallelism has seconds only)."""
    step: int = 0
    data_pos: int = 0
    acct: dict = field(default_factory=lambda: {"tokens": 0, "seconds": 0.0, "gpu_seconds": 0.0, "eval_seconds": 0.0})
    history: dict = field(default_factory=lambda: {k: [] for k in HISTORY})

    def to_dict(self) -> dict:
        return {"step": self.step, "data_pos": self.data_pos, "acct": dict(self.acct),
                "history": {k: list(v) for k, v in self.history.items()}}

    @classmethod
    def from_dict(cls, d: dict) -> "RunState":
        acct = dict(d["acct"])
        acct.setdefault("gpu_seconds", acct.get("seconds", 0.0))  # a state from before data parallelism
        return cls(d["step"], d["data_pos"], acct, {k: list(v) for k, v in d["history"].items()})


def _on_state(name: str) -> property:
    """Trainer.<name> reads and writes Trainer.state.<name>."""
    return property(lambda self: getattr(self.state, name), lambda self, v: setattr(self.state, name, v))


class Trainer:
    """One run: a config (budget, schedule), its data, a RunState, and the step machinery it trains
    with. `model` is a GPT (a TrainStep is built for it, around `optimizer` if given) or a TrainStep
    built earlier, which the run borrows: gm's trainer lends one to each segment of every expert of
    that shape, so fp8 conversion and compilation happen once. `state` (a RunState.to_dict()) starts
    the run where an earlier one stopped."""

    def __init__(self, model: GPT | TrainStep, cfg: TrainConfig, train: WindowSampler, val: WindowSampler | None = None,
                 optimizer: torch.optim.Optimizer | None = None, ckpt_path=None, state: dict | None = None):
        built = isinstance(model, TrainStep)
        check_data((model.model if built else model).cfg, train, cfg)
        if built:
            if optimizer is not None:
                raise ValueError("Trainer: a TrainStep brings its own optimizer")
            model.check(cfg)
            if model.world_size != train.world_size:
                raise ValueError(f"Trainer: a TrainStep of {model.world_size} ranks for a sampler of "
                                 f"{train.world_size}")
        self.rank, self.world_size = train.rank, train.world_size
        if self.world_size > 1 and cfg.max_seconds:  # ranks would stop at different steps, and wait forever
            raise ValueError("Trainer: data parallelism needs a step or token budget (max_seconds unset)")
        self.machine = model if built else TrainStep(model, cfg, optimizer, world_size=train.world_size)
        self.cfg, self.train_data, self.val_data = cfg, train, val
        self.ckpt_path = Path(ckpt_path) if ckpt_path else None
        self.tokens_per_step = train.batch_size * train.seq_len * cfg.grad_accum
        self.max_steps = cfg.max_steps
        if cfg.max_tokens:
            self.max_steps = min(self.max_steps, math.ceil(cfg.max_tokens / self.tokens_per_step))
        self.state = RunState.from_dict(state) if state else RunState()
        self._t = None  # start of the timed stretch while run() runs

    # ---- the machinery and the state, by their usual names ----
    model = property(lambda self: self.machine.model)
    optimizer = property(lambda self: self.machine.optimizer)
    forward = property(lambda self: self.machine.forward)
    device = property(lambda self: self.machine.device)

    step, data_pos, acct, history = (_on_state(k) for k in ("step", "data_pos", "acct", "history"))

    # ---- state without files (the multi-expert trainer swaps these) ----
    def state_dict(self) -> dict:
        return self.state.to_dict()

    def load_state_dict(self, state: dict):
        self.state = RunState.from_dict(state)

    # ---- budget and schedule ----
    def seconds(self) -> float:
        """Training seconds so far, including the current stretch (unsynchronised: an estimate)."""
        return self.acct["seconds"] + (time.perf_counter() - self._t if self._t is not None else 0.0)

    def progress(self) -> float:
        p = self.step / self.max_steps
        return max(p, self.seconds() / self.cfg.max_seconds) if self.cfg.max_seconds else p

    @property
    def done(self) -> bool:
        return self.progress() >= 1.0

    # ---- the loop ----
    def autocast(self):
        return self.machine.autocast()

    # ---- one optimizer step in three public parts: gmlib.fused drives several Trainers through them ----
    def start_step(self) -> float:
        """Set this step's learning rate (the schedule at the current step and progress); returns it."""
        lr = lr_at(self.cfg, self.step, self.progress())
        self.machine.set_lr(lr)
        return lr

    def next_batch(self):
        """The next training micro-batch (inputs, targets) on the device; advances the data position."""
        x, y = self.machine.batch(self.train_data, self.data_pos)
        self.data_pos += 1
        return x, y

    def finish_step(self):
        """After the micro-batches' backward: clip, step the optimizer, clear the gradients, count the
        step and its tokens. Returns the gradient norm before clipping (a device tensor)."""
        norm = self.machine.update(self.cfg.grad_clip)
        self.step += 1
        self.acct["tokens"] += self.tokens_per_step
        return norm

    def _train_step(self):
        lr = self.start_step()
        total = 0.0
        for i in range(self.cfg.grad_accum):
            # DDP averages gradients over ranks once per optimizer step: in the last micro-batch's backward
            with self.machine.sync(i == self.cfg.grad_accum - 1):
                loss = self.machine.loss(*self.next_batch())
                (loss / self.cfg.grad_accum).backward()
            total = total + loss.detach()
        return total / self.cfg.grad_accum, self.finish_step(), lr

    def _sync_time(self):
        """Close the current timed stretch (synchronising the device so the time is real)."""
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        now = time.perf_counter()
        self.acct["seconds"] += now - self._t
        self.acct["gpu_seconds"] += distributed.all_sum(now - self._t) if self.world_size > 1 else now - self._t
        self._t = now

    def run(self, steps: int | None = None, progress: bool = True, callback=None) -> dict:
        """Train `steps` more optimizer steps (default: until the budget is spent), logging every
        log_every steps (then callback(self) is called, e.g. to redraw a plot), validating every
        eval_every steps and when the budget ends, checkpointing every ckpt_every steps and at
        the end. Returns accounting()."""
        cfg = self.cfg
        end = self.max_steps if steps is None else min(self.step + steps, self.max_steps)
        bar = tqdm(total=self.max_steps, initial=self.step, disable=not progress, unit="step", mininterval=1.0)
        self.model.train()
        last = self.step >= end or self.done
        pending, t_log, tok_log, self._t = [], self.acct["seconds"], self.acct["tokens"], time.perf_counter()
        while not last:
            pending.append(self._train_step())
            finished = self.done  # the whole budget, not just this call's steps
            last = self.step >= end or finished
            if self.step % cfg.log_every == 0 or last:
                self._sync_time()
                self.log(pending, (self.acct["tokens"] - tok_log) / max(self.acct["seconds"] - t_log, 1e-9), bar)
                pending, t_log, tok_log = [], self.acct["seconds"], self.acct["tokens"]
                if callback:
                    callback(self)
                    self._t = time.perf_counter()  # plotting is not training time
            if self.val_data is not None and ((cfg.eval_every and self.step % cfg.eval_every == 0) or finished):
                self._sync_time()
                self.history["val_step"].append(self.step)
                self.history["val_loss"].append(self.evaluate())
                bar.set_postfix(loss=f"{self.history['loss'][-1]:.3f}", val=f"{self.history['val_loss'][-1]:.3f}")
                self._t = time.perf_counter()
            if self.ckpt_path and ((cfg.ckpt_every and self.step % cfg.ckpt_every == 0) or last):
                self._sync_time()
                self.save(self.ckpt_path)
                self._t = time.perf_counter()
        self._sync_time()
        self._t = None
        bar.close()
        return self.accounting()

    def log(self, pending, tokens_per_s, bar=None):
        """Append one history point for the steps in `pending` ((loss, grad norm, lr) per step, device
        tensors: this is the interval's host sync); FloatingPointError if the loss diverged."""
        losses, norms, lrs = zip(*pending)
        losses = torch.stack(list(losses)).float()
        if self.world_size > 1:  # each rank's loss is the mean over its rows: the global mean is their mean
            losses = distributed.all_reduce(losses, "mean")
        losses = losses.tolist()  # the host sync of this interval
        norms = torch.stack(list(norms)).float().tolist()
        loss = sum(losses) / len(losses)
        if not math.isfinite(loss):
            raise FloatingPointError(f"training loss is {loss} at step {self.step} (lr {lrs[-1]:.2e}): diverged")
        for k, v in (("step", self.step), ("loss", loss), ("lr", lrs[-1]), ("grad_norm", max(norms)),
                     ("tokens_per_s", tokens_per_s)):
            self.history[k].append(v)
        if bar is not None:
            bar.update(self.step - bar.n)
            bar.set_postfix(loss=f"{loss:.3f}", tok_s=f"{tokens_per_s:,.0f}")

    def evaluate(self, batches: int | None = None, sampler: WindowSampler | None = None) -> float:
        """Mean loss over the first `batches` batches of the validation sampler: the same batches
        every time, so successive values are comparable. Eager (the compiled graph is for training)."""
        sampler = sampler or self.val_data
        if sampler is None:
            raise ValueError("Trainer.evaluate: no validation sampler")
        t0 = time.perf_counter()
        loss = self.machine.evaluate(sampler, batches or self.cfg.eval_batches)
        self.acct["eval_seconds"] += time.perf_counter() - t0
        return loss

    # ---- accounting and checkpoints ----
    def accounting(self) -> dict:
        """Compute spent so far: the numbers that make runs compute-matched. `gpu_seconds` is the
        device wall time of training (compile included, evaluation and checkpoints excluded),
        summed over the ranks of a data-parallel run; tokens are every rank's, and tokens_per_s
        is over wall time (the whole machine's rate); flops_6nd uses N = all parameters (tied
        embedding once); flops uses flops_per_token (6N + attention 12·L·d·T, PaLM)."""
        n, tokens, secs = self.model.cfg.n_params, self.acct["tokens"], self.acct["seconds"]
        out = {"step": self.step, "tokens": tokens, "gpu_seconds": round(self.acct["gpu_seconds"], 3),
               "eval_seconds": round(self.acct["eval_seconds"], 3), "params": n,
               "flops_6nd": 6 * n * tokens, "flops": self.model.cfg.flops_per_token(self.train_data.seq_len) * tokens,
               "tokens_per_s": tokens / secs if secs else 0.0, "device": str(self.device)}
        if self.world_size > 1:
            out.update(world_size=self.world_size, wall_seconds=round(secs, 3))
        return out

    def save(self, path):
        """Write a checkpoint at path (rank 0 only: the other ranks of a data-parallel run hold the same state)."""
        if self.rank != 0:
            return None
        rng = {"torch": _b64(torch.get_rng_state())}
        if self.device.type == "cuda":
            rng["cuda"] = _b64(torch.cuda.get_rng_state(self.device))
        meta = {**self.state_dict(), "accounting": self.accounting(), "train_config": asdict(self.cfg), "rng": rng,
                "max_steps": self.max_steps}
        return checkpoint.save_checkpoint(path, self.model, self.optimizer, meta)

    def resume(self, path) -> dict:
        """Continue from a checkpoint written by save(): weights, optimizer, step, data position,
        accounting, history, RNG. The train config is this Trainer's (so a budget can be extended)."""
        _, meta = checkpoint.load_checkpoint(path, self.model, self.optimizer, device=self.device)
        self.load_state_dict(meta)
        torch.set_rng_state(_unb64(meta["rng"]["torch"]))
        if self.device.type == "cuda" and "cuda" in meta["rng"]:
            torch.cuda.set_rng_state(_unb64(meta["rng"]["cuda"]), self.device)
        return meta


def run_with_branches(tr: Trainer, fractions, ckpt_dir, **run_kw) -> tuple[dict, dict]:
    """Run tr to the end of its budget, saving a full checkpoint (branch_path) when it passes
    each fraction of its budget, so gm experts can continue from there. Returns (accounting,
    {step: path}). Needs a step- or token-bound WSD run: a time-bound run's branch steps are not
    known in advance, and a cosine run's state depends on its length from step 1, so a gm of a
    different length could not share it."""
    steps = sorted({branch_step(f, tr.max_steps) for f in fractions})
    if steps and (tr.cfg.schedule != "wsd" or tr.cfg.max_seconds):
        raise ValueError("branch_fractions need schedule='wsd' and a step or token budget (max_seconds unset)")
    if steps and steps[-1] > stable_until(tr.cfg, tr.max_steps):
        raise ValueError(f"branch step {steps[-1]} lies in the decay (from step {stable_until(tr.cfg, tr.max_steps)}):"
                         f" a branch point must be at most 1 - decay_frac = {1 - tr.cfg.decay_frac} of the budget")
    paths = {}
    for s in steps:
        path = branch_path(ckpt_dir, s)
        if tr.step < s:
            tr.run(steps=s - tr.step, **run_kw)
        if not path.is_file():
            if tr.step != s:
                raise ValueError(f"{path}: missing, and the run (resumed at step {tr.step}) is past its step {s}")
            tr.save(path)
        paths[s] = path
    return tr.run(**run_kw), paths


def check_data(model_cfg: GPTConfig, sampler: WindowSampler, cfg: TrainConfig | None = None):
    """Clear errors for a model that cannot train on these shards."""
    shards = sampler.shards
    if shards.vocab_size > model_cfg.vocab_size:
        raise ValueError(f"{shards.root}: tokens come from a vocabulary of {shards.vocab_size}, but the model's "
                         f"vocab_size is {model_cfg.vocab_size}; set vocab_size >= {shards.vocab_size}")
    if sampler.seq_len > model_cfg.seq_len:
        raise ValueError(f"sampler windows of {sampler.seq_len} tokens exceed the model's seq_len {model_cfg.seq_len}")
    if cfg is not None and sampler.batch_size != cfg.batch_size:
        raise ValueError(f"sampler batch size {sampler.batch_size} != TrainConfig.batch_size {cfg.batch_size}")


def setup(model_cfg: GPTConfig, cfg: TrainConfig, shards_dir, ckpt_path=None, resume: bool = True,
          rank: int = 0, world_size: int = 1) -> Trainer:
    """A Trainer for a fresh model (seeded by cfg.seed) on shards_dir/{train,val}; resumes from
    ckpt_path when that file exists and resume is set. rank/world_size > 1: this process's part
    of a data-parallel run (under gmlib.distributed.init), the same run as one process's."""
    shards_dir = Path(shards_dir)
    train = TokenShards(shards_dir / "train")
    val = TokenShards(shards_dir / "val") if (shards_dir / "val").is_dir() else None
    torch.manual_seed(cfg.seed)
    model = GPT(model_cfg)
    T = model_cfg.seq_len
    part = {"rank": rank, "world_size": world_size}
    tr = Trainer(model, cfg, WindowSampler(train, T, cfg.batch_size, seed=cfg.seed, **part),
                 WindowSampler(val, T, cfg.batch_size, seed=VAL_SEED, **part) if val else None, ckpt_path=ckpt_path)
    if ckpt_path and rank == 0:
        atomic.remove_stale(Path(ckpt_path).parent, recursive=False)  # a save cut short by a kill
    distributed.barrier()  # no rank looks for a checkpoint while rank 0 clears stale files
    if resume and ckpt_path and Path(ckpt_path).is_file():
        tr.resume(ckpt_path)
    return tr


def plot_history(history: dict, ax=None):
    """Training loss (per log interval) and validation loss against step, on `ax` (or a new figure)."""
    import matplotlib.pyplot as plt
    if ax is None:
        _, ax = plt.subplots(figsize=(7, 4))
    ax.plot(history["step"], history["loss"], label="train")
    if history["val_step"]:
        ax.plot(history["val_step"], history["val_loss"], "o-", label="validation")
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("cross-entropy (nats/token)")
    ax.grid(alpha=0.3)
    ax.legend()
    return ax.figure


def _b64(t: torch.Tensor) -> str:
    return base64.b64encode(t.cpu().numpy().tobytes()).decode()


def _unb64(s: str) -> torch.Tensor:
    return torch.from_numpy(np.frombuffer(base64.b64decode(s), dtype=np.uint8).copy())
