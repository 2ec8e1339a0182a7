"""Devices and processes: one process, or one of ``torchrun``'s; the collectives the loop needs; AMP, memory
format and per-epoch seeding.

Under ``torchrun`` every process trains on its shard (gloo on CPU, nccl on CUDA); rank 0 alone validates,
logs and writes checkpoints, and broadcasts what the other ranks must agree on (the run id, the validation
score that can trigger the next unfreezing stage).

Several machines: ``LOCAL_RANK`` (this node's process index) picks the GPU, ``RANK`` (the global one) picks the
data shard, the seed and who tracks. When torchrun's elastic agent restarts the group (``--max-restarts``), every
rank learns it from :func:`restart_count`, and the train stage continues the job's run from its last checkpoint.
"""

from __future__ import annotations

import os
import random
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from medxfer.config.recipe import Recipe
from medxfer.core import ui
from medxfer.core.errors import MedxferError
from torch import nn


@dataclass
class Dist:
    rank: int = 0
    world: int = 1
    local_rank: int = 0
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))

    @property
    def main(self) -> bool:
        return self.rank == 0

    @property
    def active(self) -> bool:
        return self.world > 1


def will_start_group() -> bool:
    """True when this process runs under torchrun and the group is not up yet: whoever starts it ends it."""
    return int(os.environ.get("WORLD_SIZE", "1")) > 1 and not dist.is_initialized()


def setup_device(device: str | None) -> Dist:
    """One process, or one of `torchrun`'s: gloo on CPU, nccl on CUDA, one GPU per local rank."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local = int(os.environ.get("LOCAL_RANK", "0"))
    want = device or ("cuda" if torch.cuda.is_available() else "cpu")
    if want.startswith("cuda") and not torch.cuda.is_available():
        raise MedxferError(f"--device {want}: CUDA is not available here; use --device cpu")
    if want.startswith("cuda") and world > 1 and local >= torch.cuda.device_count():
        raise MedxferError(
            f"LOCAL_RANK {local}, but this node sees {torch.cuda.device_count()} GPU(s): one GPU per process, so "
            "start torchrun with --nproc-per-node at most the GPU count (check CUDA_VISIBLE_DEVICES)"
        )
    if want.startswith("cuda"):
        # LOCAL_RANK, not RANK: on the second node RANK starts at nproc-per-node, past the last local GPU
        dev = torch.device("cuda", local if world > 1 else (torch.device(want).index or 0))
        torch.cuda.set_device(dev)
        torch.backends.cudnn.benchmark = True  # fixed input size: let cuDNN pick the fastest kernels once
    else:
        dev = torch.device("cpu")
    if world > 1 and not dist.is_initialized():
        if rank == 0 and stale_store_on_restart():
            ui.warn(
                "torchrun --max-restarts with the rendezvous store shared across restarts: a restarted worker can "
                "read the dead attempt's addresses and fail the job; start torchrun with "
                "TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1 in its environment"
            )
        dist.init_process_group("nccl" if dev.type == "cuda" else "gloo")
    if world > 1 and dev.type == "cpu":
        # processes share the cores; oversubscribed intra-op threads make every rank slower
        torch.set_num_threads(max(1, usable_cpus() // int(os.environ.get("LOCAL_WORLD_SIZE", world))))
    return Dist(rank, world, local, dev)


def usable_cpus() -> int:
    """The cores this process may run on (its CPU affinity: a cgroup cpuset, SLURM's binding, taskset), not the
    machine's. Two torchrun "nodes" on a 2-core box each took os.cpu_count() = 2 threads, and an epoch took 4.9 s
    instead of 0.1 s at one thread each (the four threads spin-waited on two cores); pinned to a core each, the
    affinity says 1 and the run matches one node with two processes bit for bit."""
    try:
        return len(os.sched_getaffinity(0)) or 1
    except AttributeError:  # macOS, Windows: no affinity call
        return os.cpu_count() or 1


def stale_store_on_restart() -> bool:
    """True when torchrun may restart this job and hands its workers the agents' shared TCP store.

    torch 2.x keeps that store for the whole job and its workers use it without a per-attempt prefix, so the
    previous attempt's keys are still there: measured, a restarted rank 1 that reached ``init_process_group``
    6 s before the new rank 0 connected to the dead rank 0's gloo address and failed ("Gloo connectFullMesh
    failed ... Connection refused"), using up the restart. ``TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1`` (read by
    torchrun) gives every attempt a fresh store hosted by its rank 0, and the same restart passed.
    """
    return (
        os.environ.get("TORCHELASTIC_USE_AGENT_STORE") == "True"
        and int(os.environ.get("TORCHELASTIC_MAX_RESTARTS", "0") or 0) > 0
    )


def restart_count(d: Dist) -> int:
    """How often torchrun's elastic agents restarted this job's workers (0: the first attempt), the same on every
    rank. Each node's agent counts only its own failures: a node whose worker died says 1, one that was only
    pulled into the new rendezvous says 0 ("membership changes do not count as retries", torch 2.x
    ``SimpleElasticAgent._invoke_run``), and group ranks may move between nodes: so the largest over all ranks."""
    n = int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0") or 0)
    if d.active:
        t = torch.tensor([n], dtype=torch.int64, device=d.device)
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
        n = int(t.item())
    return n


def elastic_job_id() -> str | None:
    """torchrun's job id (``--rdzv-id``; ``--standalone`` draws one), the same on every node and every restart;
    None outside torchrun. The default id of a c10d rendezvous is "none": two jobs on one workspace need their own."""
    return os.environ.get("TORCHELASTIC_RUN_ID") or None


def close(d: Dist, started_group: bool, finished: bool) -> None:
    """Wait for every rank after a finished run; end the process group if this process started it."""
    if d.active and finished:
        dist.barrier()
    if started_group and dist.is_initialized():
        dist.destroy_process_group()


def broadcast(obj: Any, d: Dist) -> Any:
    """Rank 0's `obj` on every rank."""
    if not d.active:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def sum_over_ranks(t: torch.Tensor, d: Dist) -> torch.Tensor:
    if d.active:
        dist.all_reduce(t)
    return t


def all_finite(loss: torch.Tensor, d: Dist) -> bool:
    """Under DDP every rank must skip the same step, or the gradient all-reduce waits forever."""
    ok = torch.isfinite(loss.detach()).to(torch.int32)
    if d.active:
        dist.all_reduce(ok, op=dist.ReduceOp.MIN)
    return bool(ok.item())


def wrap(model: nn.Module, d: Dist) -> nn.Module:
    """DDP registers the parameters that require grad when it is built: rebuild it whenever a stage changes."""
    if not d.active:
        return model
    from torch.nn.parallel import DistributedDataParallel as DDP

    return DDP(model, device_ids=[d.device.index] if d.device.type == "cuda" else None)


def amp_dtype(recipe: Recipe, device: torch.device) -> torch.dtype | None:
    if device.type != "cuda" or recipe.amp == "off":
        return None
    if recipe.amp == "bf16" or (recipe.amp == "auto" and torch.cuda.is_bf16_supported()):
        return torch.bfloat16
    return torch.float16


def memory_format(spatial_dims: int) -> torch.memory_format:
    return torch.channels_last if spatial_dims == 2 else torch.channels_last_3d


def to_memory_format(model: nn.Module, fmt: torch.memory_format) -> nn.Module:
    """Like ``model.to(memory_format=fmt)``, but skips tensors of another rank: ACS convolutions keep 4D (2D)
    weights inside a 3D model, on which ``.to(memory_format=channels_last_3d)`` raises."""
    rank = 4 if fmt == torch.channels_last else 5
    with torch.no_grad():
        for t in [*model.parameters(), *model.buffers()]:
            if t.dim() == rank:
                t.data = t.data.contiguous(memory_format=fmt)
    return model


def seed_epoch(seed: int, epoch: int, rank: int) -> int:
    """Every epoch's randomness is a function of (seed, epoch, rank): a resumed run replays it exactly."""
    s = (seed * 1_000_003 + epoch * 9_973 + rank) % (2**31 - 1)
    torch.manual_seed(s)
    np.random.seed(s)
    random.seed(s)
    return s
