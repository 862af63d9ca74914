"""torch.distributed for gm's runs: one process per GPU under torchrun, or two on a CPU (gloo) in tests.

Two users, two patterns. Dense data parallelism (gmlib.train's Trainer over a WindowSampler with
rank/world_size): gradients are averaged every step by DDP, and the few numbers a run logs (loss,
seconds) are reduced here. gm (gmlib.gm, scripts/train_gm.py): experts need no communication, so
ranks only meet at barriers. Without torchrun (no WORLD_SIZE in the environment) everything here is
the single-process case: rank 0 of 1, no process group, reductions return their input.
"""
import os
from contextlib import contextmanager
from datetime import timedelta

import torch
import torch.distributed as dist


def env() -> tuple[int, int, int]:
    """(rank, world_size, local_rank) as torchrun sets them; (0, 1, 0) outside torchrun."""
    return (int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1)),
            int(os.environ.get("LOCAL_RANK", 0)))


def init(backend: str | None = None, timeout: timedelta | None = None) -> tuple[int, int]:
    """(rank, world_size) from torchrun's environment, with a process group when world_size > 1.
    backend None: nccl where CUDA is available, else gloo. On CUDA each process is bound to its
    LOCAL_RANK's GPU, so that "cuda" means that GPU from here on."""
    rank, world, local = env()
    if world > 1 and not dist.is_initialized():
        if backend is None:
            backend = "nccl" if torch.cuda.is_available() else "gloo"
        if backend == "nccl":
            torch.cuda.set_device(local % torch.cuda.device_count())
        dist.init_process_group(backend, rank=rank, world_size=world,
                                **({"timeout": timeout} if timeout else {}))
    return rank, world


def close(wait: bool = True):
    """Tear the process group down. wait: meet every rank first; a rank that destroys its group while
    another still tears its own down can abort at exit (gloo: "terminate called without an active
    exception", about one run in three of tests/test_distributed.py without the barrier). On an error
    path pass wait=False: another rank may be gone, and the barrier would hang until the timeout."""
    if dist.is_initialized():
        if wait:
            dist.barrier()
        dist.destroy_process_group()


@contextmanager
def group(backend: str | None = None, timeout: timedelta | None = None):
    """`with group() as (rank, world):` init() on entry; on exit close(), with the barrier only when the
    body ended without an exception."""
    ranks = init(backend, timeout)
    try:
        yield ranks
    except BaseException:
        close(wait=False)
        raise
    close()


def active() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def rank() -> int:
    return dist.get_rank() if active() else 0


def world_size() -> int:
    return dist.get_world_size() if active() else 1


def barrier():
    if active():
        dist.barrier()


def _on_backend(t: torch.Tensor) -> torch.Tensor:
    """gloo reduces CPU tensors, nccl tensors on this rank's GPU."""
    if dist.get_backend() == "nccl":
        return t.to(torch.device("cuda", torch.cuda.current_device()))
    return t.cpu()


def all_reduce(t: torch.Tensor, op: str = "sum") -> torch.Tensor:
    """The sum (or mean) of t over ranks, as a new tensor on t's device; t itself outside torchrun."""
    if not active():
        return t
    out = _on_backend(t.detach().clone())
    dist.all_reduce(out, op=dist.ReduceOp.SUM)
    if op == "mean":
        out = out / dist.get_world_size()
    return out.to(t.device)


def all_sum(x: float) -> float:
    """A Python number summed over ranks (e.g. each rank's training seconds)."""
    return float(all_reduce(torch.tensor(float(x), dtype=torch.float64))) if active() else float(x)
