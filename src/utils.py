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
    are rounded. A no-op for "fp32"."""
    if precision not in ("fp32", "bf16"):
        raise ValueError(f"--precision must be fp32 or bf16, not '{precision}'")
    return torch.autocast(torch.device(device).type, dtype=torch.bfloat16,
                          enabled=precision == "bf16")


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def rng_state() -> dict:
    """Every random state a run draws from: in the checkpoint, for an exact resume."""
    return {"torch": torch.get_rng_state(), "numpy": np.random.get_state(),
            "python": random.getstate(),
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else []}


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
