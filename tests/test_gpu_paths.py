"""The GPU paths, checked on a CPU: stand-ins for torch.distributed (recording each collective's
group, tensor devices and timeout) and for torch.cuda (GPUs, the current one, their random
states), and hooks that read dtypes under CPU autocast. Each stand-in does what torch does at
the point it replaces (the torch source it follows is named beside it)."""

import argparse
import ast
import contextlib
import glob
import os
import sys
import types
from datetime import timedelta

import pytest
import torch
import torch.distributed as dist

import src.distributed as distributed
import src.main as lfads_main
import src.scan as scan
import src.utils as utils
from src.data import DataError
from src.model import LFADS, LFADSConfig
from src.resume import set_rng_state
from tests.conftest import ROOT, TINY_MODEL

# -----------------------------------------------------------------------------
# stand-ins


class FakeCuda:
    """torch.cuda of a machine with `n` GPUs, on a CPU build: the current GPU and one random
    state per GPU. An index past the last fails, as torch.cuda.random.set_rng_state's
    `default_generators[idx]` does."""

    NAMES = ("is_available", "device_count", "current_device", "set_device", "is_initialized",
             "get_rng_state", "set_rng_state", "get_rng_state_all", "set_rng_state_all",
             "is_bf16_supported", "get_device_name", "synchronize", "device")

    def __init__(self, n: int = 1, bf16: bool = True):
        self.n, self.current, self.bf16, self.log = n, 0, bf16, []
        self.states = [torch.tensor([i, 7], dtype=torch.uint8) for i in range(n)]

    def install(self, mp):
        for name in self.NAMES:
            mp.setattr(torch.cuda, name, getattr(self, name))
        return self

    def index(self, device) -> int:
        if isinstance(device, int):
            i = device
        else:
            d = torch.device(device)
            i = self.current if d.index is None else d.index
        if i >= self.n:
            raise IndexError("tuple index out of range")
        return i

    def is_available(self):
        return True

    def device_count(self):
        return self.n

    def current_device(self):
        return self.current

    def set_device(self, device):
        self.current = self.index(device)
        self.log.append(("set_device", self.current))

    def is_initialized(self):
        return True

    def get_rng_state(self, device="cuda"):
        return self.states[self.index(device)].clone()

    def set_rng_state(self, state, device="cuda"):
        self.states[self.index(device)] = state.clone()
        self.log.append(("set_rng_state", self.index(device)))

    def get_rng_state_all(self):  # torch.cuda.random: one per GPU of device_count()
        return [self.get_rng_state(i) for i in range(self.n)]

    def set_rng_state_all(self, states):  # torch.cuda.random: state i to GPU i
        for i, state in enumerate(states):
            self.set_rng_state(state, i)

    def is_bf16_supported(self, including_emulation=True):
        return self.bf16

    def get_device_name(self, device=None):
        return "the stand-in GPU"

    def synchronize(self, device=None):
        self.log.append(("synchronize", device))

    @contextlib.contextmanager
    def device(self, device):
        before, self.current = self.current, self.index(device)
        yield
        self.current = before


class Group:
    def __init__(self, backend: str, timeout):
        self.backend, self.timeout = backend, timeout


class FakeDist:
    """torch.distributed as rank `rank` of `world` sees it. Each collective is recorded as
    (name, group, tensor devices, current GPU). Like torch 2.13's distributed_c10d: a group made
    with "nccl" alone has a backend for CUDA tensors only (`_parse_backend_string`; a CPU tensor
    fails with "No backend type associated with device type cpu"), and its object collectives
    put their bytes on the current GPU (`_get_object_coll_device` -> "cuda"). NCCL on a GPU
    that another rank uses (each rank r of the machine has GPU r) fails as NCCL does. Ranks
    above 0 receive `sent`, rank 0's objects, in order."""

    ReduceOp = dist.ReduceOp

    def __init__(self, cuda: FakeCuda | None = None, rank: int = 0, world: int = 2, sent=()):
        self.cuda, self.rank, self.world, self.sent = cuda, rank, world, list(sent)
        self.calls, self.default = [], None

    def gpu(self):
        return self.cuda.current if self.cuda else None

    def init_process_group(self, backend=None, timeout=None, **kw):
        self.default = self.new_group(backend, timeout)

    def new_group(self, backend=None, timeout=None, **kw):
        group = Group(backend or self.default.backend, timeout)
        self.calls.append(("new_group", group, set(), self.gpu()))
        return group

    def get_rank(self, group=None):
        return self.rank

    def get_world_size(self, group=None):
        return self.world

    def collective(self, name, group, tensors=(), objects=False):
        group = group or self.default
        devices = {"cuda"} if objects and group.backend == "nccl" else set()
        devices |= {t.device.type for t in tensors}
        if group.backend == "nccl" and devices - {"cuda"}:
            raise RuntimeError("No backend type associated with device type cpu")
        if group.backend == "nccl" and self.gpu() != self.rank:
            raise RuntimeError(f"Duplicate GPU detected: rank {self.rank} and rank "
                               f"{self.gpu()} both on CUDA device {self.gpu()}")
        self.calls.append((name, group, devices, self.gpu()))

    def broadcast_object_list(self, objs, src=0, group=None, device=None):
        self.collective("broadcast_object_list", group, objects=True)
        if self.rank != src:
            objs[:] = [self.sent.pop(0)]

    def all_gather_object(self, out, obj, group=None):
        self.collective("all_gather_object", group, objects=True)
        out[:] = [obj] * len(out)

    def all_reduce(self, t, op=dist.ReduceOp.SUM, group=None, async_op=False):
        self.collective("all_reduce", group, [t])
        if op == dist.ReduceOp.SUM:  # every rank with the same numbers
            t.mul_(self.world)

    def barrier(self, group=None, **kw):
        self.collective("barrier", group)

    def destroy_process_group(self, group=None):
        self.calls.append(("destroy_process_group", None, set(), self.gpu()))


class FakeDDP(torch.nn.Module):
    """DistributedDataParallel without the gradient averaging; records its arguments."""

    made = []

    def __init__(self, module, **kw):
        super().__init__()
        self.module, self.kw = module, kw
        FakeDDP.made.append(kw)

    def forward(self, *args, **kw):
        return self.module(*args, **kw)


def torchrun_env(mp, rank: int, local_rank: int, world: int = 2):
    mp.setenv("RANK", str(rank))
    mp.setenv("LOCAL_RANK", str(local_rank))
    mp.setenv("WORLD_SIZE", str(world))


def args_for(**kw) -> argparse.Namespace:
    return argparse.Namespace(**{"device": None, "results_dir": "results", "run": "r", **kw})


def collectives(fake: FakeDist) -> list:
    return [c for c in fake.calls if c[0] not in ("new_group", "destroy_process_group")]


# -----------------------------------------------------------------------------
# torchrun


def test_each_rank_keeps_to_its_gpu_and_cpu_tensors_travel_over_gloo(monkeypatch):
    """Rank 1 on GPU 1: rank 0's objects and the loop's flags reach it without touching a
    GPU, the GPU becomes current before any NCCL group exists, and NCCL is used on that GPU
    only. Before the mend the objects went over NCCL while GPU 0 was current on every rank."""
    cuda = FakeCuda(n=2).install(monkeypatch)
    torchrun_env(monkeypatch, rank=1, local_rank=1)
    fake = FakeDist(cuda, rank=1, sent=[(None, "/runs/r"), {"recon": 1.0}])
    monkeypatch.setattr(distributed, "dist", fake)

    def run(args, rank, n_proc):  # src.main.run's order: prepare, build, the loop's collectives
        prepared = distributed.prepare_ranks(args, rank, n_proc, lambda a, **kw: ("ok", a.run))
        assert prepared == ("ok", "r")
        device = utils.use_device(distributed.rank_device(utils.pick_device("cuda")))
        assert device == torch.device("cuda", 1)
        distributed.grad_group(device)
        assert distributed.Distributed.largest(None, 1.0, 0.0) == [1.0, 0.0]
        assert distributed.from_rank0(None) == {"recon": 1.0}
        return 0

    assert distributed.main_ranks(args_for(device="cuda"), run) == 0
    assert ("set_device", 1) in cuda.log
    for name, group, devices, gpu in fake.calls:  # NCCL: CUDA tensors on GPU 1 only
        if group is not None and group.backend == "nccl":
            assert gpu == 1 and devices <= {"cuda"}, f"{name} on NCCL with GPU {gpu} current"
    objects = [c for c in fake.calls if c[0] == "broadcast_object_list"]
    assert objects and all(g.backend == "gloo" for _, g, _, _ in objects)
    assert [g.backend for n, g, _, _ in fake.calls if n == "new_group"] == ["gloo", "nccl"]


def test_a_cpu_run_on_a_gpu_machine_makes_no_nccl_group(monkeypatch):
    """The device a run trains on decides NCCL, not the --device flag: a resumed run (no
    --device given) whose checkpoint trains on the CPU, on a machine with GPUs."""
    cuda = FakeCuda(n=2).install(monkeypatch)
    torchrun_env(monkeypatch, rank=0, local_rank=0)
    fake = FakeDist(cuda)
    monkeypatch.setattr(distributed, "dist", fake)

    def run(args, rank, n_proc):
        device = utils.use_device(distributed.rank_device(utils.pick_device("cpu")))
        assert distributed.grad_group(device) is None  # DDP takes the gloo group
        distributed.Distributed.largest(None, 0.0)
        return 0

    assert distributed.main_ranks(args_for(device=None), run) == 0
    assert {g.backend for _, g, _, _ in fake.calls if g is not None} == {"gloo"}


def test_a_torchrun_training_waits_for_rank0_long_enough(tiny_h5, tmp_path, monkeypatch):
    """src.main's whole run as rank 0 of two: every collective is on CPU tensors in the gloo
    group, and the waits while rank 0 validates, exports and decodes alone allow hours (the
    default is 30 minutes for gloo, 10 for NCCL: torch's constants.py, ProcessGroupNCCL.hpp)."""
    torchrun_env(monkeypatch, rank=0, local_rank=0)
    fake = FakeDist()
    monkeypatch.setattr(distributed, "dist", fake)
    monkeypatch.setattr(distributed, "DistributedDataParallel", FakeDDP)
    used = []
    monkeypatch.setattr(lfads_main, "use_device", lambda d, p: used.append((d, p)) or d)
    FakeDDP.made.clear()
    argv = ["--data", str(tiny_h5), "--results-dir", str(tmp_path / "runs"), "--run-name", "r",
            "--max_steps", "4", "--eval_every", "2", "--no-plots", *TINY_MODEL]
    assert lfads_main.main(argv) == 0
    assert os.path.isfile(tmp_path / "runs" / "r" / "lfads_output.h5")
    assert used == [(torch.device("cpu"), "fp32")]
    assert FakeDDP.made and FakeDDP.made[0]["process_group"] is None  # the gloo group
    calls = collectives(fake)
    assert {n for n, *_ in calls} >= {"broadcast_object_list", "all_reduce", "barrier",
                                      "all_gather_object"}
    for name, group, devices, _ in calls:
        assert group.backend == "gloo" and devices <= {"cpu"}, name
        assert group.timeout is not None and group.timeout >= timedelta(hours=1), name


# -----------------------------------------------------------------------------
# precision


def tiny_model() -> LFADS:
    cfg = LFADSConfig(n_in=5, n_out=6, t_enc=7, t_rec=8, ic_enc_dim=4, ci_enc_dim=4, con_dim=4,
                      co_dim=2, ic_dim=3, gen_dim=6, fac_dim=3)
    return LFADS(cfg)


def tiny_batch():
    g = torch.Generator().manual_seed(0)
    encod = torch.poisson(torch.full((4, 7, 5), 2.0), generator=g)
    recon = torch.poisson(torch.full((4, 8, 6), 2.0), generator=g)
    return encod, recon


def record_inputs(module, seen: list, arg: int = 0):
    """A hook that appends (autocast on for CPU, dtype of input `arg`) at each call."""
    def hook(mod, args):
        seen.append((torch.is_autocast_enabled("cpu"), args[arg].dtype))
    return module.register_forward_pre_hook(hook)


def test_the_recurrences_step_in_float32_outside_a_bf16_autocast(monkeypatch):
    """Every GRU step (src/scan.py) sees autocast off and float32 states and inputs, under a
    bf16 autocast that still rounds the products outside the recurrences (here the IC
    posterior's). Under CUDA autocast a recurrent product in half precision would compound its
    rounding over the steps, and cuDNN RNNs would run in float16 (torch's
    aten/src/ATen/cudnn/AutocastRNN.cpp casts them to kHalf): the model steps no cuDNN RNN."""
    model, (encod, recon) = tiny_model(), tiny_batch()
    seen, post = [], []

    def spy(fn, *names):
        def wrapped(*args):
            tensors = [a for a in args if isinstance(a, torch.Tensor)]
            seen.append((torch.is_autocast_enabled("cpu"), {a.dtype for a in tensors}))
            return fn(*args)
        return wrapped
    monkeypatch.setattr(scan, "gate", spy(scan.gate))
    monkeypatch.setitem(scan.COMPILE, "setting", "off")  # the Python step, where the spy sits
    model.ic_post.register_forward_hook(lambda m, a, out: post.append(out.dtype))
    with utils.autocast("cpu", "bf16"):
        out = model(encod, recon)
    assert len(seen) == encod.shape[1] + 2 * recon.shape[1]  # encoders, controller, generator
    assert all(not enabled and dtypes == {torch.float32} for enabled, dtypes in seen)
    assert post == [torch.bfloat16]
    assert torch.isfinite(out.losses["recon"]).all()


def test_fp32_enters_no_autocast_and_mps_without_autocast_is_left_alone(monkeypatch):
    """torch 2.1 to 2.4 raise in torch.autocast's constructor for device type mps, enabled or
    not ("User specified an unsupported autocast device_type"; MPS autocast came in 2.5)."""
    def old_autocast(device_type, dtype=None, enabled=True):
        if device_type not in ("cpu", "cuda"):
            raise RuntimeError(f"User specified an unsupported autocast device_type "
                               f"'{device_type}'")
        return contextlib.nullcontext()

    monkeypatch.setattr(torch, "autocast", old_autocast)
    monkeypatch.delattr(torch.amp, "is_autocast_available", raising=False)  # before 2.4
    with utils.autocast(torch.device("mps"), "fp32"):
        pass
    with utils.autocast_off(torch.device("mps")):
        pass
    assert not utils.has_autocast("mps") and utils.has_autocast("cuda")
    with pytest.raises(ValueError, match="--precision"):
        utils.autocast("cpu", "fp16")


def test_use_device_makes_the_gpu_current(monkeypatch):
    cuda = FakeCuda(n=2).install(monkeypatch)
    assert utils.use_device(torch.device("cuda", 1), "fp32") == torch.device("cuda", 1)
    assert cuda.current == 1
    assert utils.use_device(torch.device("cuda"), "bf16") == torch.device("cuda", 1)
    assert utils.use_device(torch.device("cpu"), "fp32") == torch.device("cpu")


def test_synchronize_waits_for_cuda_and_mps(monkeypatch):
    cuda, waited = FakeCuda().install(monkeypatch), []
    monkeypatch.setattr(torch.mps, "synchronize", lambda: waited.append("mps"))
    utils.synchronize(torch.device("cuda", 0))
    utils.synchronize("mps")
    utils.synchronize("cpu")
    assert cuda.log == [("synchronize", torch.device("cuda", 0))] and waited == ["mps"]


# -----------------------------------------------------------------------------
# random states, checkpoints, settings


def cpu_states() -> dict:
    import random

    import numpy as np

    return {"torch": torch.get_rng_state(), "numpy": np.random.get_state(),
            "python": random.getstate()}


def test_the_checkpoint_keeps_the_random_state_of_the_gpu_in_use(monkeypatch):
    cuda = FakeCuda(n=2).install(monkeypatch)
    cuda.set_device(1)
    state = utils.rng_state()["cuda"]
    assert isinstance(state, torch.Tensor) and torch.equal(state, cuda.states[1])


@pytest.mark.parametrize("saved", ["two GPUs", "one state"])
def test_resume_takes_the_gpu_state_on_a_machine_with_fewer_gpus(monkeypatch, saved):
    """A checkpoint of two GPUs' states (or of the GPU in use) resumed where one is visible."""
    cuda = FakeCuda(n=1).install(monkeypatch)
    states = [torch.tensor([10, 1], dtype=torch.uint8), torch.tensor([11, 1], dtype=torch.uint8)]
    set_rng_state({**cpu_states(), "cuda": states if saved == "two GPUs" else states[0]})
    assert torch.equal(cuda.states[0], states[0])
    assert [e for e in cuda.log if e[0] == "set_rng_state"] == [("set_rng_state", 0)]


def test_every_torch_load_in_src_names_map_location():
    """A checkpoint saved on a GPU loads onto the GPU it came from unless told otherwise."""
    loads = []
    for path in glob.glob(os.path.join(ROOT, "src", "**", "*.py"), recursive=True):
        with open(path) as f:
            tree = ast.parse(f.read())
        for node in ast.walk(tree):
            if (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute)
                    and node.func.attr == "load" and isinstance(node.func.value, ast.Name)
                    and node.func.value.id == "torch"):
                names = {k.arg for k in node.keywords}
                loads.append((os.path.relpath(path, ROOT), node.lineno, "map_location" in names))
    assert len(loads) >= 4, loads  # the checks below look at something
    assert [x for x in loads if not x[2]] == []


def packed(gpus: int, share: float) -> int:
    """Members Ray runs at once: floor(1 / share) per GPU, counted as Ray counts, in units of
    1/10000 rounded to the nearest (ray's src/ray/raylet/scheduling/fixed_point.cc)."""
    unit = int(share * 10000 + 0.5)
    return gpus * (10000 // unit) if share <= 1 else gpus // int(share)


@pytest.mark.parametrize("gpus, workers, share", [
    (0, 4, 0), (1, 1, 1), (4, 4, 1), (8, 3, 1), (3, 2, 1), (2, 3, 0.5), (1, 16, 0.0625),
    (1, 3, 0.3333), (1, 7, 0.1428), (2, 7, 0.25)])
def test_each_member_asks_ray_for_a_share_it_can_use(gpus, workers, share):
    from src.tune import gpus_per_member

    got = gpus_per_member(gpus, workers)
    assert got == pytest.approx(share, abs=1e-12)
    assert got <= 1 and (got == 0 or packed(gpus, got) >= workers)  # all members at once


def test_the_search_asks_ray_for_shares_it_accepts(monkeypatch):
    """connect with a stand-in Ray: 3 members on 2 GPUs share them at half a GPU each (2/3 each
    would leave room for one member on each GPU)."""
    import src.tune as search

    ray = types.SimpleNamespace(is_initialized=lambda: True,
                                cluster_resources=lambda: {"CPU": 3.0, "GPU": 2.0})
    monkeypatch.setitem(sys.modules, "ray", ray)
    assert search.connect(None, 3) == {"cpu": 1, "gpu": 0.5}


@pytest.mark.parametrize("flags, words", [
    (["--device", "cuda:1"], "--device cuda:1: this machine has 1 GPU(s)"),
    (["--device", "cuda:x"], "--device cuda:x"),
    (["--device", "cuda", "--precision", "bf16"], "--precision bf16 on cuda"),
])
def test_device_and_bf16_are_checked_before_the_run_folder_exists(
        tiny_h5, tmp_path, monkeypatch, flags, words):
    FakeCuda(n=1, bf16=False).install(monkeypatch)
    run_dir = tmp_path / "runs" / "r"
    args = lfads_main.build_parser().parse_args(
        ["--data", str(tiny_h5), "--results-dir", str(tmp_path / "runs"), "--run", "r", *flags])
    with pytest.raises(DataError, match=words.replace("(", r"\(").replace(")", r"\)")):
        lfads_main.prepare(args)
    assert not run_dir.exists()
