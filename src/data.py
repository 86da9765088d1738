"""Session files: find them, read them, refuse anything that breaks the contract.

The contract (docs/design.md, The session file) is the layout of lfads-torch and the NLB tools:
{train,valid}_encod_data (trials, T_enc, N_in) and {train,valid}_recon_data (trials, T_rec, N)
spike counts, optional truth, external inputs and trial indices, and a `bin_size` attribute.
"""

import glob
import os
from dataclasses import dataclass

import h5py
import numpy as np
import torch


class DataError(ValueError):
    """Bad input data; the message names the file and the key."""


@dataclass
class Split:
    encod: torch.Tensor  # (trials, T_enc, N_in) counts the encoders read, float32
    recon: torch.Tensor  # (trials, T_rec, N) counts to reconstruct, float32
    ext: torch.Tensor | None  # (trials, T_rec, E) external inputs
    truth: np.ndarray | None  # (trials, T_rec, N) expected counts per bin, when known
    inds: np.ndarray  # (trials,) trial indices in the original session

    def __len__(self):
        return self.encod.shape[0]


@dataclass
class Session:
    path: str
    name: str  # file name without .h5, e.g. the IBL probe insertion id
    bin_size: float  # seconds
    train: Split
    valid: Split
    test_encod: torch.Tensor | None  # (trials, T_enc, N_in) encoder input only
    test_ext: torch.Tensor | None  # (trials, T_rec, E) the test trials' external inputs
    extras: tuple = ()  # "chopped" (src/chop.py), "behaviour" (src/decode.py): read after training

    @property
    def sizes(self) -> dict:
        """The data sizes of src.model.LFADSConfig."""
        ext = self.train.ext
        return dict(n_in=self.train.encod.shape[2], n_out=self.train.recon.shape[2],
                    t_enc=self.train.encod.shape[1], t_rec=self.train.recon.shape[1],
                    ext_dim=0 if ext is None else ext.shape[2])


def find_session_files(data: str | None, ins: str | None, data_dir: str) -> list[str]:
    """The session files a run should train on, from --data, --ins or the data folder."""
    if data:
        files = sorted(glob.glob(data)) if glob.has_magic(data) else [data]
        for f in files:
            if os.path.isdir(f):
                raise DataError(f"--data {data}: {f} is a folder; give a session file, a quoted "
                                f"glob such as '{f.rstrip('/')}/*.h5', or --data-dir {f}")
            if not os.path.isfile(f):
                raise DataError(f"--data {data}: no such file {f}")
        if not files:
            raise DataError(f"--data {data}: the pattern matches no file")
        return files
    if ins:
        path = os.path.join(data_dir, f"{ins}.h5")
        if not os.path.isfile(path):
            have = [os.path.basename(f)[:-3] for f in glob.glob(os.path.join(data_dir, "*.h5"))]
            raise DataError(f"--ins {ins}: no file {path}. Prepare it with "
                            f"`python -m src.prep_data --pids {ins}`; {data_dir}/ has: "
                            f"{', '.join(sorted(have)) or 'nothing'}")
        return [path]
    files = sorted(glob.glob(os.path.join(data_dir, "*.h5")))
    if not files:
        raise DataError(f"no session files (*.h5) in {data_dir}/. Run ./setup.sh to seed it with "
                        "the example data, or `python -m src.prep_data` to fetch IBL insertions.")
    return files


def _counts(f, path, key, required=True):
    """Read a rank-3 count array and check it holds non-negative integers."""
    if key not in f:
        if required:
            raise DataError(f"{path}: missing key '{key}' (the file has: {', '.join(f.keys())})")
        return None
    try:
        a = f[key][()]
    except Exception as e:  # truncated or corrupt data blocks surface here
        raise DataError(f"{path}: cannot read '{key}': {e}") from e
    if a.ndim != 3:
        raise DataError(f"{path}: '{key}' has shape {a.shape}; expected (trials, bins, neurons)")
    if 0 in a.shape:
        what = ("trials", "bins", "neurons")[a.shape.index(0)]
        raise DataError(f"{path}: '{key}' has no {what}")
    if not (np.issubdtype(a.dtype, np.integer) or np.issubdtype(a.dtype, np.floating)):
        raise DataError(f"{path}: '{key}' has dtype {a.dtype}; expected integer spike counts")
    if np.issubdtype(a.dtype, np.floating):
        if not np.isfinite(a).all():
            raise DataError(f"{path}: '{key}' holds NaN or infinite values")
        if (a != np.round(a)).any():
            raise DataError(f"{path}: '{key}' holds non-integer values; expected spike counts")
    if (a < 0).any():
        raise DataError(f"{path}: '{key}' holds negative values; expected spike counts")
    return a


def _floats(f, path, key, shape_like, what):
    if key not in f:
        return None
    a = f[key][()].astype(np.float32)
    if a.shape[:2] != shape_like[:2] or a.ndim != 3:
        raise DataError(f"{path}: '{key}' has shape {a.shape}; expected {what}")
    if not np.isfinite(a).all():
        raise DataError(f"{path}: '{key}' holds NaN or infinite values")
    return a


def _split(f, path, split, conversion) -> Split:
    enc = _counts(f, path, f"{split}_encod_data")
    rec = _counts(f, path, f"{split}_recon_data")
    if enc.shape[0] != rec.shape[0]:
        raise DataError(f"{path}: '{split}_encod_data' has {enc.shape[0]} trials but "
                        f"'{split}_recon_data' has {rec.shape[0]}")
    if rec.shape[1] < enc.shape[1]:
        raise DataError(f"{path}: '{split}_recon_data' has {rec.shape[1]} bins, fewer than the "
                        f"{enc.shape[1]} of '{split}_encod_data' (T_rec must be >= T_enc)")
    if rec.shape[2] < enc.shape[2]:
        raise DataError(f"{path}: '{split}_recon_data' has {rec.shape[2]} neurons, fewer than "
                        f"the {enc.shape[2]} of '{split}_encod_data' (N must be >= N_in)")
    t_enc, n_in = enc.shape[1:]
    if not np.array_equal(enc, rec[:, :t_enc, :n_in]):
        # coordinated dropout and sample validation learn from the hidden encoder elements'
        # reconstruction: that holds only if they are the same counts
        raise DataError(f"{path}: '{split}_encod_data' is not the first {t_enc} bins and "
                        f"{n_in} neurons of '{split}_recon_data'; the encoders must read the "
                        "held-in block of the counts that are reconstructed")
    truth = _floats(f, path, f"{split}_truth", rec.shape, f"the shape of '{split}_recon_data'")
    if truth is not None:
        if truth.shape != rec.shape:
            raise DataError(f"{path}: '{split}_truth' has shape {truth.shape}; expected "
                            f"{rec.shape} like '{split}_recon_data'")
        truth = truth / conversion
    ext = _floats(f, path, f"{split}_ext_input", rec.shape, "(trials, T_rec, inputs)")
    inds = f[f"{split}_inds"][()] if f"{split}_inds" in f else np.arange(len(enc))
    if len(inds) != len(enc):
        raise DataError(f"{path}: '{split}_inds' has {len(inds)} entries for {len(enc)} trials")
    as_t = lambda a: None if a is None else torch.from_numpy(np.ascontiguousarray(a, np.float32))  # noqa: E731
    return Split(as_t(enc), as_t(rec), as_t(ext), truth, inds)


def load_session(path: str) -> Session:
    if not os.path.isfile(path):
        raise DataError(f"{path}: no such file (if a run's data moved, resume it with --data "
                        "and the new path)")
    try:
        f = h5py.File(path, "r")
    except OSError as e:
        raise DataError(f"{path}: not a readable HDF5 file (truncated or corrupt?): {e}") from e
    with f:
        if "bin_size" not in f.attrs:
            raise DataError(f"{path}: missing attribute 'bin_size' (seconds per bin)")
        bin_size = float(f.attrs["bin_size"])
        if not bin_size > 0:
            raise DataError(f"{path}: attribute 'bin_size' is {bin_size}; expected > 0")
        conversion = float(f["conversion_factor"][()]) if "conversion_factor" in f else 1.0
        if not conversion > 0:
            raise DataError(f"{path}: 'conversion_factor' is {conversion}; expected > 0")
        train, valid = _split(f, path, "train", conversion), _split(f, path, "valid", conversion)
        for k, dim in (("encod", 1), ("encod", 2), ("recon", 1), ("recon", 2)):
            a, b = getattr(train, k).shape[dim], getattr(valid, k).shape[dim]
            if a != b:
                what = "bins" if dim == 1 else "neurons"
                raise DataError(f"{path}: 'train_{k}_data' has {a} {what} but "
                                f"'valid_{k}_data' has {b}")
        if (train.ext is None) != (valid.ext is None):
            raise DataError(f"{path}: external inputs must be given for both splits or neither")
        test, test_ext = _test(f, path, train)
        extras = tuple(k for k, here in (("chopped", "chop_bins" in f.attrs),
                                         ("behaviour", "train_behavior" in f or "trials" in f))
                       if here)
    name = os.path.splitext(os.path.basename(path))[0]
    return Session(path, name, bin_size, train, valid, test, test_ext, extras)


def _test(f, path, train: Split) -> tuple:
    """The optional test trials: encoder input and, for a model with external inputs, theirs."""
    test = _counts(f, path, "test_encod_data", required=False)
    if test is None:
        return None, None
    if test.shape[1:] != train.encod.shape[1:]:
        raise DataError(f"{path}: 'test_encod_data' has shape {test.shape}; expected "
                        f"(trials, {train.encod.shape[1]}, {train.encod.shape[2]})")
    test_ext = None
    if train.ext is not None:  # the generator of such a model cannot run without them
        t_rec, e = train.ext.shape[1:]
        test_ext = _floats(f, path, "test_ext_input", (len(test), t_rec),
                           f"({len(test)}, {t_rec}, {e}) like 'test_encod_data' and "
                           "'train_ext_input'")
        if test_ext is None or test_ext.shape[2] != e:
            raise DataError(f"{path}: the file has external inputs and 'test_encod_data', "
                            f"so it needs 'test_ext_input' of shape ({len(test)}, {t_rec}, "
                            f"{e}) too")
        test_ext = torch.from_numpy(test_ext)
    return torch.from_numpy(test.astype(np.float32)), test_ext


# -----------------------------------------------------------------------------
# batches


def sv_mask(split, rate: float, seed: int) -> torch.Tensor | None:
    """The fixed sample-validation mask of a split's encoder input, (trials, T_enc, N_in) bool,
    True = held out; a function of the seed alone, so a resumed run holds out the same
    elements. None when rate is 0."""
    if rate <= 0:
        return None
    g = torch.Generator().manual_seed(seed)
    return torch.rand(split.encod.shape, generator=g) < rate


def batch_order(seed: int, epoch: int, n: int) -> torch.Tensor:
    """The trial order of one epoch, a function of (seed, epoch) alone: resuming at any step
    gives the same batches as an uninterrupted run."""
    g = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
    return torch.randperm(n, generator=g)


def next_batch(seed: int, step: int, n_train: int, batch_size: int) -> torch.Tensor:
    """The trial indices of a step: epochs of full batches, each epoch in a shuffled order."""
    epoch, pos = divmod(step, steps_per_epoch(n_train, batch_size))
    return batch_order(seed, epoch, n_train)[pos * batch_size : (pos + 1) * batch_size]


def steps_per_epoch(n: int, batch_size: int) -> int:
    """Full batches in one pass over n training trials: an epoch of the batch order."""
    return max(n // batch_size, 1)


def device_split(split, sv, device) -> dict:
    """A training split on the device, once: batches are index lookups."""
    d = {"encod": split.encod, "recon": split.recon, "ext": split.ext, "sv": sv}
    return {k: None if v is None else v.to(device) for k, v in d.items()}
