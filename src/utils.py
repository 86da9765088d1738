"""Small shared helpers: atomic writes, stop signals, seeding, random states, devices."""

import argparse
import contextlib
import difflib
import os
import random
import re
import shutil
import signal
import tempfile
import textwrap
import threading

import numpy as np
import torch


@contextlib.contextmanager
def atomic_path(path: str):
    """Yield a temporary path beside `path`; rename it over `path` only if the block succeeds.

    A crash, a kill or Ctrl-C at any moment leaves either the old file or the new one, never a
    half-written one: os.replace is atomic on POSIX and Windows within one file system.
    """
    folder = os.path.dirname(os.path.abspath(path))
    fd, tmp = tempfile.mkstemp(dir=folder, prefix="." + os.path.basename(path) + ".", suffix=".tmp")
    os.close(fd)
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o666 & ~umask)  # mkstemp makes 0600; give the file the usual permissions
    try:
        yield tmp
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def atomic_torch_save(obj, path: str) -> None:
    with atomic_path(path) as tmp:
        torch.save(obj, tmp)


def atomic_copy(src: str, dst: str) -> None:
    with atomic_path(dst) as tmp:
        shutil.copyfile(src, tmp)


def atomic_write_text(path: str, text: str) -> None:
    with atomic_path(path) as tmp:
        with open(tmp, "w") as f:
            f.write(text)


def check_writable(folder: str) -> None:
    """Create `folder` and a file in it now: a read-only place then fails before training,
    not at the first checkpoint an hour later. Raises OSError."""
    os.makedirs(folder, exist_ok=True)
    with tempfile.TemporaryFile(dir=folder):
        pass


@contextlib.contextmanager
def stop_signals():
    """While inside, SIGINT (Ctrl-C) and SIGTERM (kill, cluster schedulers) only set
    caught["signum"]; the training loop checks it between steps, saves a checkpoint and stops.
    A second signal interrupts at once: checkpoints are replaced atomically, so even that
    loses only the steps since the last one."""
    caught = {"signum": 0}

    def handler(signum, frame):
        if caught["signum"]:
            raise KeyboardInterrupt
        caught["signum"] = signum

    if threading.current_thread() is not threading.main_thread():  # Python allows handlers
        yield caught  # only in the main thread; elsewhere signals keep their default action
        return
    old = {s: signal.signal(s, handler) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield caught
    finally:
        for s, h in old.items():
            signal.signal(s, h)


def autocast(device, precision: str):
    """bfloat16 matrix products inside the block when precision is "bf16": weights, recurrent
    states and the loss stay float32 (the model casts), only the products' inputs and outputs
    are rounded. "fp32" enters no torch.autocast at all: torch 2.1 to 2.4 raise for an MPS
    device even when it is disabled."""
    if precision not in ("fp32", "bf16"):
        raise ValueError(f"--precision must be fp32 or bf16, not '{precision}'")
    if precision == "fp32":
        return contextlib.nullcontext()
    return torch.autocast(torch.device(device).type, dtype=torch.bfloat16)


def has_autocast(device_type: str) -> bool:
    """torch has autocast for this device type: CPU and CUDA always, MPS from torch 2.5."""
    available = getattr(torch.amp, "is_autocast_available", None)  # torch >= 2.4
    return available(device_type) if available else device_type in ("cpu", "cuda")


def autocast_off(device):
    """A float32 block inside a bf16 one (the loss); nothing to switch off where torch has no
    autocast for the device, where even a disabled torch.autocast raises."""
    kind = torch.device(device).type
    return torch.autocast(kind, enabled=False) if has_autocast(kind) else contextlib.nullcontext()


def use_device(device: torch.device, precision: str = "fp32") -> torch.device:
    """Make a GPU the current one, so that what names no device (random states, NCCL's
    buffers) lands on it; "cuda" alone is the current GPU."""
    if device.type != "cuda":
        return device
    index = torch.cuda.current_device() if device.index is None else device.index
    torch.cuda.set_device(index)
    return torch.device("cuda", index)


def synchronize(device) -> None:
    """Wait for the device's queued work: timings of GPU work are meaningless without it."""
    device = torch.device(device)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    elif device.type == "mps":
        torch.mps.synchronize()


def bf16_support(device: torch.device) -> str | None:
    """Why bf16 autocast cannot run on `device`, or None when it can."""
    if device.type == "cuda":
        with torch.cuda.device(device):
            if not torch.cuda.is_bf16_supported():  # what torch.autocast checks, at its start
                return f"{torch.cuda.get_device_name(device)} has no bfloat16"
    elif device.type == "mps":
        if not has_autocast("mps"):
            return f"torch {torch.__version__} has no autocast for mps (torch 2.5 has)"
        try:
            torch.ones(1, dtype=torch.bfloat16, device=device)
        except (RuntimeError, TypeError) as e:  # macOS before 14
            return str(e).splitlines()[0]
    return None


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def rng_state() -> dict:
    """Every random state a run draws from: in the checkpoint, for an exact resume. On a GPU,
    that of the current one, the one the run draws on (use_device): one state per visible GPU
    would not fit a machine, or a process, that sees fewer."""
    cuda = torch.cuda.get_rng_state() if torch.cuda.is_initialized() else None
    return {"torch": torch.get_rng_state(), "numpy": np.random.get_state(),
            "python": random.getstate(), "cuda": cuda}


def has_mps() -> bool:
    """An Apple-silicon GPU that this torch build can use."""
    return bool(getattr(torch.backends, "mps", None) and torch.backends.mps.is_available())


def pick_device(name: str) -> torch.device:
    if name != "auto":
        return torch.device(name)
    if torch.cuda.is_available():
        return torch.device("cuda")
    if has_mps():
        return torch.device("mps")
    return torch.device("cpu")


class HelpFormatter(argparse.RawDescriptionHelpFormatter):
    """The description as written; help lines never broken inside a --dashed-flag."""

    def _split_lines(self, text, width):
        return textwrap.wrap(" ".join(text.split()), width, break_on_hyphens=False)


class FlagParser(argparse.ArgumentParser):
    """argparse that answers a misspelt flag with the nearest one, in a line, not the usage;
    a flag's prefix is a misspelling too, not an abbreviation."""

    def __init__(self, *args, **kw):
        kw.setdefault("formatter_class", HelpFormatter)
        super().__init__(*args, allow_abbrev=False, **kw)

    def error(self, message):
        unknown = re.search(r"unrecognized arguments: (-\S+)", message)
        if unknown:
            given = unknown[1].split("=")[0]
            known = [s for a in self._actions if a.help != argparse.SUPPRESS
                     for s in a.option_strings]
            near = difflib.get_close_matches(given.replace("_", "-"), known, n=1)
            message = f"unknown flag {given}" + (f"; did you mean {near[0]}?" if near else "")
        self.exit(2, f"{self.prog}: error: {message} (--help lists the flags)\n")
