"""Several processes: `torchrun --nproc_per_node=K -m src.main ...` (docs/distributed.md).

Each process trains on its share of every batch and DistributedDataParallel averages the
gradients, so all hold the same weights; rank 0 alone evaluates and writes files. `Ranks`
holds the few collectives the trainer needs, and does nothing in a single process.
"""

import os

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel


def world() -> tuple[int, int]:
    """(rank, number of processes) as torchrun sets them; (0, 1) for a plain run."""
    return int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))


def init_distributed(device_name: str) -> None:
    """Join torchrun's process group: nccl between GPUs, gloo between CPU processes."""
    cuda = torch.cuda.is_available() and device_name in ("auto", "cuda")
    dist.init_process_group("nccl" if cuda else "gloo")


def rank_device(device: torch.device) -> torch.device:
    """One process per GPU: process LOCAL_RANK of a machine takes its GPU LOCAL_RANK."""
    if device.type == "cuda" and dist.is_initialized():
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
        torch.cuda.set_device(device)
    return device


def from_rank0(obj):
    """Rank 0's `obj` on every rank; `obj` itself in a single process."""
    if not dist.is_initialized():
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


class Ranks:
    """This process' place among the processes of a run, and their collectives."""

    def __init__(self):
        self.rank, self.world = (dist.get_rank(), dist.get_world_size()) if \
            dist.is_initialized() else (0, 1)
        self.lead = self.rank == 0  # rank 0 evaluates and writes every file

    def wrap(self, model, several_sessions: bool):
        """The module to call in training: DDP over several processes. A stitched step
        leaves the other sessions' read-ins and read-outs without gradient."""
        if self.world == 1:
            return model
        return DistributedDataParallel(model, find_unused_parameters=several_sessions)

    def share(self, idx: torch.Tensor) -> torch.Tensor:
        """This process' part of a batch's trial indices."""
        return idx.tensor_split(self.world)[self.rank]

    def gather(self, obj) -> list:
        """[rank 0's obj, rank 1's, ...]; [obj] in a single process."""
        if self.world == 1:
            return [obj]
        out = [None] * self.world
        dist.all_gather_object(out, obj)
        return out

    def agree(self, *flags: float) -> list:
        """The largest of each flag over all ranks. Ranks take every decision (skip a step,
        stop) together, or one would wait forever for the others' gradients."""
        if self.world == 1:
            return list(flags)
        t = torch.tensor(flags, dtype=torch.float64)
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
        return t.tolist()

    def mean(self, sums: dict) -> dict:
        """Loss sums averaged over ranks, so that every rank logs and schedules the same."""
        if self.world == 1:
            return sums
        keys = sorted(sums)
        t = torch.tensor([float(sums[k]) for k in keys], dtype=torch.float64)
        dist.all_reduce(t)
        return dict(zip(keys, (t / self.world).tolist()))
