"""Several processes: `torchrun --nproc_per_node=K -m src.main ...` (docs/distributed.md).

Each process trains on its share of every batch and DistributedDataParallel averages the
gradients, so all hold the same weights; rank 0 alone validates and writes files. src/main.py
imports this module only under torchrun: `main_ranks` joins the process group, and the
`Distributed` extension of the Trainer adds the few collectives the loop needs.
"""

import argparse
import gc
import os
from datetime import timedelta

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel

from src.data import DataError
from src.stitch import Stitched
from src.trainer import Trainer
from src.utils import rng_state

# how long a collective waits for the slowest rank. Rank 0 validates, exports and decodes alone
# while the others wait in one, which can outlast gloo's default 30 minutes (NCCL's is 10) on a
# large session; torchrun stops every process when one fails, so this only bounds a hang
WAIT = timedelta(hours=24)


def main_ranks(args, run) -> int:
    """`run(args, rank, n_proc)` in torchrun's process group. The group is gloo, on CPU
    tensors: Python objects, the loop's flags and loss sums, the waits for rank 0. Gradients on
    GPUs go over NCCL in a group of their own, made once the device is known (`grad_group`)."""
    rank, n_proc = int(os.environ.get("RANK", 0)), int(os.environ["WORLD_SIZE"])
    dist.init_process_group("gloo", timeout=WAIT)
    try:
        code = run(args, rank, n_proc)
        dist.barrier()  # the others wait while rank 0 writes: one that left early aborted gloo
        return code
    finally:
        # the trainer sits in a reference cycle, so its DDP wrapper (which holds the process
        # group) would live on until shutdown, and gloo's threads torn down then could abort
        gc.collect()
        dist.destroy_process_group()


def prepare_ranks(args, rank: int, n_proc: int, prepare) -> tuple:
    """`prepare` on rank 0; the other processes follow it into the same run folder, or stop
    with its error."""
    prepared, error = None, None
    if rank == 0:
        try:
            prepared = prepare(args, n_proc=n_proc)
        except DataError as e:
            error = str(e)
    error, run_dir = from_rank0((error, prepared and prepared[3]))
    if error:
        raise DataError(error)
    if rank > 0:
        args = argparse.Namespace(**{**vars(args), "results_dir": os.path.dirname(run_dir),
                                     "run": os.path.basename(run_dir)})
        prepared = prepare(args, lead=False, n_proc=n_proc)
    return prepared


def rank_device(device: torch.device) -> torch.device:
    """One process per GPU: process LOCAL_RANK of a machine takes its GPU LOCAL_RANK (src.main's
    build makes it the current one)."""
    if device.type == "cuda":
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
    return device


def grad_group(device: torch.device):
    """The process group of DDP's gradients: NCCL between GPUs, the gloo group otherwise (None).
    Made after the GPU is the current one, by every rank, as torch asks of new_group."""
    return dist.new_group(backend="nccl") if device.type == "cuda" else None


def from_rank0(obj):
    """Rank 0's `obj` on every rank."""
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


class Distributed:
    """What several processes change in the Trainer's loop; every decision (skip a step,
    stop) is taken by all ranks together, or one would wait forever for the others'
    gradients."""

    def __init__(self, *args, **kw):
        self.rank, self.world = dist.get_rank(), dist.get_world_size()
        super().__init__(*args, **kw)
        self.lead = self.rank == 0
        # DDP starts every rank from rank 0's weights; a stitched step leaves the other
        # sessions' read-ins and read-outs without gradient
        gpu = [self.device.index] if self.device.type == "cuda" else None
        self.net = DistributedDataParallel(self.model, device_ids=gpu,
                                           process_group=grad_group(self.device),
                                           find_unused_parameters=len(self.sessions) > 1)

    def batch(self, step: int) -> tuple:
        data, idx, kw = super().batch(step)
        return data, idx.tensor_split(self.world)[self.rank], kw  # this rank's share

    def finite(self, loss: float, norm: float) -> bool:
        return not self.largest(not super().finite(loss, norm))[0]

    def period_sums(self) -> dict:
        """Loss sums averaged over ranks, so that every rank logs and schedules the same."""
        sums = super().period_sums()
        keys = sorted(sums)
        t = torch.tensor([float(sums[k]) for k in keys], dtype=torch.float64)
        dist.all_reduce(t)
        return dict(zip(keys, (t / self.world).tolist()))

    def validate(self) -> dict:
        return from_rank0(super().validate() if self.lead else None)

    def agree(self, signum: int, out_of_time: bool) -> tuple:
        return tuple(self.largest(signum, out_of_time))

    def checkpoint(self) -> dict:
        ckpt = super().checkpoint()
        ckpt["loop"]["sums"] = self.period_sums()
        out = [None] * self.world
        dist.all_gather_object(out, rng_state())
        ckpt["rng"] = out  # [rank 0's, rank 1's, ...]
        return ckpt

    def largest(self, *flags: float) -> list:
        t = torch.tensor(flags, dtype=torch.float64)  # on the CPU: the gloo group's
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
        return t.tolist()


class DistributedTrainer(Distributed, Trainer):
    """The Trainer of one session in one of several processes (src/main.py's build picks it)."""


class DistributedStitchedTrainer(Distributed, Stitched, Trainer):
    """The Trainer of several sessions in one of several processes."""
