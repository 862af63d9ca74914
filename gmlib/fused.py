"""Several experts of one shape trained as one batched model: small experts fill the GPU together.

Why. A 30m expert trains at about 27% MFU on an H200 where the 124M model reaches 52% (issue 19),
and gm trains its experts one after another. Experts exchange nothing, so G of them can
share one forward and backward pass in which every matmul is one batched matmul over the G experts
(HFTA, Wang et al., "Horizontally Fused Training Array", MLSys 2021: 2-15x for small models on one
GPU, where small kernels leave it idle). Each expert still trains on its own batch of its own routed
data. Where it pays (a batch per expert small enough that one expert's kernels leave the GPU idle)
is measured by bench/fused_experts.py, for several batch and group sizes.

How. The experts stay G ordinary GPT modules, each with its own AdamW (gmlib.train.make_optimizer),
gradient clipping, learning-rate schedule, data position and bookkeeping: one gmlib.train.Trainer
each. Only the forward and backward are shared. Each step `stack_state` stacks the G experts'
parameters along a new leading dimension and `fused_loss` runs GPT.forward on the stack: torch.bmm
for every linear layer, one embedding lookup into the G tables side by side, attention over a batch
of G·B sequences. The backward of the summed losses hands every expert exactly its own gradient (no
weight of expert g touches another expert's loss), through the stack's backward, into the expert's
own .grad; then each Trainer clips, steps and counts as it does alone (Trainer.finish_step).

Why not keep the weights stacked for good. Per-expert AdamW, clipping and learning rates would then
need an optimizer written here for stacked tensors (the fused CUDA AdamW takes one lr per group),
and every checkpoint and store entry would be cut out of the stack. Stacking each step costs one
read and one write of the fp32 weights (estimated: 2 GB for 8 x 30m, about 1% of their step at
batch 32; autocast casts every weight to bf16 each step anyway), and it keeps ONE optimizer path for
fused and separate training. A lost first attempt matched on the CPU and differed by nats on the GPU,
for a cause not found; here whatever differs can only be in the forward and backward, which the
benchmark's first-step loss difference isolates. The state dicts are the GPTs' own; `stack_state` and
`unstack_state` convert between G of them and the stacked form, exactly.

Numerics. In fp32 on the CPU fused and separate training agree to about 1e-6 (tests/test_fused.py):
only the order of sums inside the matmuls differs. Under bf16 autocast on CUDA the batched matmuls
round as F.linear does (bf16 inputs, fp32 accumulation), the loss comes from bf16 logits upcast in
the cross-entropy as in GPT.forward, so the two should differ by bf16 rounding, which training then
amplifies as any change of kernel does; bench/fused_experts.py measures that per expert and step
against the same amplification between the compiled and the eager separate runs.

GPU time. The members of a group train the same tokens a step, so the group's wall time is charged
to them in equal parts; summed over experts it is the device time spent, as in separate training.

Limits: identical model configs; one batch size, sequence length, grad_accum and device for the
group; no FP8 (gmlib.fp8 replaces the GPT modules' matmuls, which the fused pass does not call);
no checkpoint files (gm's expert store keeps the state between segments).
"""
import time

import torch
import torch.nn.functional as F

from .model import ACTIVATIONS, GATED, GPTConfig, apply_rope
from .train import Trainer


def stack_state(states: list[dict]) -> dict:
    """G state dicts (or named_parameters dicts) of one shape -> one dict of tensors with a leading
    expert dimension G. Stacking parameters keeps the autograd graph: the stack's backward gives
    each expert its own slice of the gradient."""
    keys = list(states[0])
    for g, s in enumerate(states[1:], 1):
        if list(s) != keys or any(s[k].shape != states[0][k].shape for k in keys):
            raise ValueError(f"stack_state: expert {g}'s tensors do not match expert 0's (names or shapes)")
    return {k: torch.stack([s[k] for s in states]) for k in keys}


def unstack_state(stacked: dict) -> list[dict]:
    """The inverse of stack_state: G state dicts (views into the stacked tensors; clone to keep)."""
    G = len(next(iter(stacked.values())))
    return [{k: v[g] for k, v in stacked.items()} for g in range(G)]


def _mm(x, w):
    # x (G, N, in) @ w (G, out, in)^T: nn.Linear's x·Wᵀ for G experts in one batched matmul
    return torch.bmm(x, w.transpose(1, 2))


def _norm(x, w):
    # nn.RMSNorm (eps as GPT's) with a gain per expert: normalise, then scale by w (G, d), as RMSNorm does
    return F.rms_norm(x, (x.shape[-1],), eps=1e-6) * w.unsqueeze(1)


def fused_loss(w: dict, cfg: GPTConfig, idx, targets, cos, sin, residual_dtype=None):
    """GPT.forward(idx, targets, return_logits=False)'s loss for G experts at once: w holds their
    stacked parameters (stack_state, GPT's parameter names), idx and targets are (G, B, T), cos and
    sin GPT's RoPE tables. Returns the G experts' mean losses (G,)."""
    G, B, T = idx.shape
    d, H = cfg.n_embd, cfg.n_head
    wte = w["wte.weight"]                                       # (G, V, d), also the output projection
    V = wte.shape[1]
    # one lookup for all experts: expert g's table is rows g·V .. g·V + V - 1 of the G tables side by side
    offset = torch.arange(G, device=idx.device).view(G, 1, 1) * V
    x = F.embedding(idx + offset, wte.view(G * V, d)).view(G, B * T, d)
    if residual_dtype is not None:
        x = x.to(residual_dtype)
    cos, sin = cos[:T], sin[:T]
    for i in range(cfg.n_layer):
        p = f"blocks.{i}."
        qkv = _mm(_norm(x, w[p + "norm1.weight"]), w[p + "attn.qkv.weight"])
        # the G experts' B sequences are one batch of G·B for attention (they never see each other)
        q, k, v = qkv.view(G * B, T, 3, H, d // H).permute(2, 0, 3, 1, 4)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        x = x + _mm(y.transpose(1, 2).reshape(G, B * T, d), w[p + "attn.proj.weight"])
        h = _mm(_norm(x, w[p + "norm2.weight"]), w[p + "mlp.fc.weight"])
        if cfg.gated:
            gate, up = h.chunk(2, dim=-1)
            h = GATED[cfg.activation](gate) * up
        else:
            h = ACTIVATIONS[cfg.activation](h)
        x = x + _mm(h, w[p + "mlp.proj.weight"])
    logits = _mm(_norm(x, w["norm.weight"]), wte)               # (G, B·T, V), tied output projection
    loss = F.cross_entropy(logits.reshape(G * B * T, V).float(), targets.reshape(-1), ignore_index=-1,
                           reduction="none").view(G, B * T)
    # each expert's mean over its own counted targets, as GPT's mean cross-entropy with ignore_index
    return loss.sum(1) / (targets != -1).view(G, B * T).sum(1)


_COMPILED = {}  # compile mode -> torch.compile(fused_loss): one dynamo cache for every group


def check_group(trainers: list[Trainer]):
    """A clear error for Trainers that cannot share a fused pass."""
    t0 = trainers[0]
    if len({id(t.model) for t in trainers}) < len(trainers):
        raise ValueError("GroupTrainer: two members share one model; each expert needs its own")
    for t in trainers:
        same = {"model config": (t.model.cfg, t0.model.cfg), "batch_size": (t.cfg.batch_size, t0.cfg.batch_size),
                "seq_len": (t.train_data.seq_len, t0.train_data.seq_len),
                "grad_accum": (t.cfg.grad_accum, t0.cfg.grad_accum), "device": (t.device, t0.device),
                "compile": ((t.cfg.compile, t.cfg.compile_mode), (t0.cfg.compile, t0.cfg.compile_mode)),
                "residual dtype": (t.model.residual_dtype, t0.model.residual_dtype)}
        if bad := [k for k, (a, b) in same.items() if a != b]:
            raise ValueError(f"GroupTrainer: the members differ in {bad}; a fused group needs them equal")
        if t.cfg.fp8:
            raise ValueError("GroupTrainer: fp8 is not supported in a fused group (use group_size 1)")
        if t.ckpt_path:
            raise ValueError("GroupTrainer: a fused group writes no checkpoint files; save each Trainer yourself")


class GroupTrainer:
    """Train several Trainers' models together: one fused forward and backward a step, then each
    member's own clipping, AdamW step, schedule, logging, validation and accounting.
    A member leaves the group when it reaches its steps or its budget; the rest go on."""

    def __init__(self, trainers: list[Trainer]):
        check_group(trainers)
        self.trainers = trainers
        cfg = trainers[0].cfg
        if cfg.compile:
            # shapes and dtypes are its only guards (the weights are inputs), so every group of a run shares
            # the graph; a group of another size recompiles once, then dynamo takes G as a dynamic size
            self.loss_fn = _COMPILED.setdefault(cfg.compile_mode, torch.compile(fused_loss, mode=cfg.compile_mode))
        else:
            self.loss_fn = fused_loss

    def step(self, members: list[Trainer]) -> list[tuple]:
        """One optimizer step of every member; returns (loss, grad norm, lr) per member, as Trainer's."""
        t0, accum = members[0], members[0].cfg.grad_accum
        m0 = t0.model
        lrs = [t.start_step() for t in members]
        total = 0.0
        for _ in range(accum):
            xs, ys = zip(*(t.next_batch() for t in members))
            # stacked anew for each backward: the stack is part of the graph that backward frees
            w = stack_state([dict(t.model.named_parameters()) for t in members])
            with t0.autocast():
                losses = self.loss_fn(w, m0.cfg, torch.stack(xs), torch.stack(ys), m0.rope_cos, m0.rope_sin,
                                      m0.residual_dtype)
            (losses.sum() / accum).backward()  # expert g's gradient is that of its own loss / accum
            total = total + losses.detach()
        norms = [t.finish_step() for t in members]
        total = total / accum
        return [(total[g], norms[g], lrs[g]) for g in range(len(members))]

    def _charge(self, members, sync: bool):
        """Split the wall time since the last charge evenly over the members (sync: make it real)."""
        dev = members[0].device
        if sync and dev.type == "cuda":
            torch.cuda.synchronize(dev)
        now = time.perf_counter()
        for t in members:  # one device: gpu_seconds (the sum over ranks) is seconds
            t.acct["seconds"] += (now - self._t) / len(members)
            t.acct["gpu_seconds"] += (now - self._t) / len(members)
        self._t = now

    def run(self, steps: list[int]) -> list[dict]:
        """Train member g steps[g] more optimizer steps (fewer where its budget ends first), logging,
        validating and accounting per member as Trainer.run does (no progress bar, no checkpoint files).
        Returns every member's accounting()."""
        ends = {id(t): min(t.step + s, t.max_steps) for t, s in zip(self.trainers, steps)}
        for t in self.trainers:
            t.model.train()
        active = [t for t in self.trainers if not (t.step >= ends[id(t)] or t.done)]
        pending = {id(t): [] for t in active}
        marks = {id(t): (t.acct["seconds"], t.acct["tokens"]) for t in active}  # at each member's last log
        self._t = time.perf_counter()
        while active:
            for t, out in zip(active, self.step(active)):
                pending[id(t)].append(out)
            # host time, unsynchronised, charged every step: a max_seconds budget reads it (as Trainer.seconds)
            self._charge(active, sync=False)
            finished = {id(t): t.done for t in active}
            last = {id(t): t.step >= ends[id(t)] or finished[id(t)] for t in active}
            log = [t for t in active if t.step % t.cfg.log_every == 0 or last[id(t)]]
            val = [t for t in active if t.val_data is not None
                   and ((t.cfg.eval_every and t.step % t.cfg.eval_every == 0) or finished[id(t)])]
            if log or val:
                self._charge(active, sync=True)
            for t in log:
                s0, n0 = marks[id(t)]
                t.log(pending[id(t)], (t.acct["tokens"] - n0) / max(t.acct["seconds"] - s0, 1e-9))
                pending[id(t)], marks[id(t)] = [], (t.acct["seconds"], t.acct["tokens"])
            for t in val:
                t.history["val_step"].append(t.step)
                t.history["val_loss"].append(t.evaluate())
            if val:
                self._t = time.perf_counter()  # validation is not training time (Trainer.evaluate counts it)
            active = [t for t in active if not last[id(t)]]
        return [t.accounting() for t in self.trainers]
