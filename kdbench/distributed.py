"""The process group of one run trained across several processes (DistributedDataParallel).

A run with ``RunSpec.processes`` = W > 1 is W processes, one per GPU (NCCL) or W CPU processes
(gloo), that join one torch.distributed process group from the environment, with the names
torchrun uses: MASTER_ADDR, MASTER_PORT, RANK, WORLD_SIZE, LOCAL_RANK. The local launcher
(kdbench/ranks.py) sets them for each process it starts; on SLURM, kdbench/slurm.py exports
them with submitit's ``TorchDistributedEnvironment`` (DESIGN.md: only slurm.py imports
submitit).

What a run computes across its ranks (kdbench/train.py):
- every rank draws the same global batch from the run's seeded stream and trains on its own
  contiguous 1/W of it (``shard``): the global batch, its order and the learning rate are
  the setting's; each rank's batch is batch/W; no learning-rate scaling;
- the student is wrapped in DistributedDataParallel, which averages its gradients; the
  gradients of the method's own trainable modules (connectors, regressors) are averaged by
  ``average_gradients``, as are all gradients under a method's custom gradient rule or in a
  pre-training stage (see train.py);
- the loss sums, correct counts and non-finite flags of an epoch are summed over the ranks
  once per epoch (``sum_across``); rank 0 evaluates, writes the checkpoints and the record,
  and tells the others the evaluation (``from_writer``), so every rank holds the same history.
"""

from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass
from datetime import timedelta
from typing import Any, Iterable, Iterator

import torch
import torch.distributed as dist
from torch import Tensor, nn

# How long a rank waits in a collective for the others (evaluation on rank 0, a dead rank):
# longer than an ImageNet evaluation, short enough that a hang ends in a failed attempt.
COLLECTIVE_TIMEOUT = timedelta(minutes=30)
# Each rank's shard of a batch must hold at least this many samples: BatchNorm cannot train
# on one (the stream's own rule for a last batch of one, kdbench.data.BatchStream).
MIN_SHARD = 2


@dataclass(frozen=True)
class Ranks:
    """Where this process stands in its run's process group."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    backend: str | None = None  # "nccl" | "gloo"; None: a run of one process
    # The launcher's attempt at this run, from 1 (ranks.py restarts a group that lost a rank).
    attempt: int = 1

    @property
    def is_writer(self) -> bool:
        """Rank 0 writes the run's checkpoints, logs and record; the others write nothing."""
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


SOLO = Ranks()
_current = SOLO

# What ranks.py sets besides torchrun's variables: its attempt number.
ATTEMPT_VARIABLE = "KDBENCH_RANKS_ATTEMPT"


def current() -> Ranks:
    """The process group this process has joined (``process_group``), or SOLO."""
    return _current


def backend_for(device_type: str) -> str:
    # NCCL is the GPU collective library; gloo the CPU one (torch.distributed's documented
    # choice for each).
    return "nccl" if device_type == "cuda" else "gloo"


@contextlib.contextmanager
def process_group(device_type: str) -> Iterator[Ranks]:
    """Join the process group the environment describes for the block (WORLD_SIZE unset or
    1: nothing to join, SOLO), and leave it after. On CUDA the process uses GPU LOCAL_RANK."""
    global _current
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    if world_size <= 1:
        yield SOLO
        return
    rank = int(os.environ["RANK"])
    local_rank = int(os.environ.get("LOCAL_RANK", rank))
    backend = backend_for(device_type)
    if device_type == "cuda":
        torch.cuda.set_device(local_rank)
    dist.init_process_group(backend, init_method="env://", rank=rank, world_size=world_size,
                            timeout=COLLECTIVE_TIMEOUT)
    _current = Ranks(rank, world_size, local_rank, backend,
                     int(os.environ.get(ATTEMPT_VARIABLE, "1")))
    try:
        yield _current
    finally:
        _current = SOLO
        dist.destroy_process_group()


def device_of(device: torch.device, ranks: Ranks) -> torch.device:
    """A rank's device: on CUDA its local GPU (one process per GPU), else the one asked."""
    if ranks.distributed and device.type == "cuda":
        return torch.device("cuda", ranks.local_rank)
    return device


def trains_on(batch_size: int, ranks: Ranks) -> bool:
    """Whether a global batch of ``batch_size`` gives every rank a shard BatchNorm can train
    on. The same answer on every rank, so all of them skip the same (last) batch."""
    return batch_size // ranks.world_size >= MIN_SHARD


def shard(tensor: Tensor, ranks: Ranks) -> Tensor:
    """This rank's contiguous part of a global batch (dimension 0): the W parts are disjoint,
    cover the batch in order, and differ in size by at most one (torch.tensor_split)."""
    if not ranks.distributed:
        return tensor
    return torch.tensor_split(tensor, ranks.world_size)[ranks.rank]


def wrap(student: nn.Module, device: torch.device, ranks: Ranks) -> nn.Module:
    """The student under DistributedDataParallel: it broadcasts rank 0's parameters and
    buffers at construction (every rank starts from rank 0's checkpoint or initialisation),
    rank 0's BatchNorm running statistics before each forward (broadcast_buffers, DDP's
    default: per-process batch statistics, one set of running ones), and averages the
    gradients during backward."""
    from torch.nn.parallel import DistributedDataParallel

    device_ids = [device.index] if device.type == "cuda" else None
    return DistributedDataParallel(student, device_ids=device_ids)


def average_gradients(parameters: Iterable[nn.Parameter], ranks: Ranks) -> None:
    """Average the gradients of ``parameters`` over the ranks, as DDP does for the modules it
    wraps: one all-reduce of all of them flattened. A parameter without a gradient has none
    on every rank (the ranks run the same graph) and is left alone."""
    if not ranks.distributed:
        return
    with_grad = [parameter for parameter in parameters if parameter.grad is not None]
    if not with_grad:
        return
    flat = torch.cat([parameter.grad.reshape(-1) for parameter in with_grad])
    dist.all_reduce(flat)
    flat /= ranks.world_size
    offset = 0
    for parameter in with_grad:
        count = parameter.grad.numel()
        parameter.grad.copy_(flat[offset:offset + count].view_as(parameter.grad))
        offset += count


def sum_across(values: Tensor, ranks: Ranks) -> Tensor:
    """``values`` summed over the ranks (in place; the same tensor on every rank after)."""
    if ranks.distributed:
        dist.all_reduce(values)
    return values


def max_across(values: Tensor, ranks: Ranks) -> Tensor:
    if ranks.distributed:
        dist.all_reduce(values, op=dist.ReduceOp.MAX)
    return values


def from_writer(value: Any, ranks: Ranks) -> Any:
    """Rank 0's ``value`` (a picklable object) on every rank."""
    if not ranks.distributed:
        return value
    box = [value if ranks.is_writer else None]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def provenance(ranks: Ranks, sync_bn: bool) -> dict[str, Any]:
    """What a record says of its process group (only a run of several processes has one)."""
    return {"world_size": ranks.world_size, "backend": ranks.backend, "sync_bn": sync_bn,
            "attempt": ranks.attempt}
