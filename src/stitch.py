"""Several sessions, one model: the stitching of Pandarinath et al. 2018 (Nature Methods 15:805).

Each session (an IBL insertion) records its own neurons. The stitched model gives every
session a linear read-in, N_in -> R shared encoder inputs (R = readin_dim), and a read-out,
F factors -> its N neurons; encoders, controller and generator are shared, so the latent
dynamics are learned from every session's trials at once. src/main.py attaches this module
when it is given several session files: `load_sessions` reads and checks them, `Stitched`
extends the Trainer (batches drawn by session, the read-ins started by principal-component
regression, validation over every session), and `StitchedLFADS` is the model.
"""

import os
from dataclasses import replace

import h5py
import numpy as np
import torch
import torch.nn as nn

from src.data import DataError, Session, device_split, load_session, sv_mask
from src.metrics import LOSS_TERMS, evaluate
from src.model import LFADS
from src.trainer import Trainer
from src.utils import atomic_path

# file attributes that say what a bin is: sessions stitched together must agree on them
ALIGN_ATTRS = ("align_event", "t_before", "t_after")
# the validation metrics: a stitched run also logs each session's as '<session>_<metric>', so
# no session may be named like a metric's first part
METRIC_NAMES = (*LOSS_TERMS, "total", "bps", "co_bps", "fp_bps", "r2", "r2_pooled", "r2_heldout",
                "selection_smth")


class StitchedLFADS(LFADS):
    """LFADS with a read-in and a read-out per session; forward's `session` picks them."""

    def __init__(self, cfg):
        assert len(cfg.session_n_in) == len(cfg.session_n_out) > 0 and cfg.readin_dim > 0, cfg
        super().__init__(replace(cfg, n_in=cfg.readin_dim))
        self.cfg, self.session = cfg, 0

    def make_readout(self):  # created last: the shared weights draw what one session's would
        cfg = self.cfg
        assert all(0 < a <= b for a, b in zip(cfg.session_n_in, cfg.session_n_out)), cfg
        # read-ins with a bias: the PCR start centres each session's counts through it
        self.readin = nn.ModuleList(nn.Linear(n, cfg.readin_dim) for n in cfg.session_n_in)
        self.readin.requires_grad_(cfg.readin_train)
        self.readout = nn.ModuleList(nn.Linear(cfg.fac_dim, n) for n in cfg.session_n_out)

    def forward(self, encod, recon=None, ext=None, sample=True, sv_mask=None, session=0):
        self.session = session
        return super().forward(encod, recon, ext, sample, sv_mask)

    def read_in(self, x):
        return self.readin[self.session](x)  # (B, T_enc, N_in) -> (B, T_enc, R)

    def read_out(self, f):
        return self.readout[self.session](f)  # (B, T_rec, F) -> (B, T_rec, N)

    def init_readout_bias(self, mean_counts, session: int = 0):
        with torch.no_grad():
            self.readout[session].bias.copy_(torch.log(mean_counts.clamp_min(1e-3)))


class Stitched:
    """What a stitched model changes in the Trainer's loop: its model, data, batches and
    validation (`StitchedTrainer` below; with several processes, src/distributed.py)."""

    def new_model(self):
        return StitchedLFADS(self.mcfg)

    def setup_data(self) -> None:
        # session i's sample-validation masks: seeds seed + 2i (train) and seed + 2i + 1 (valid)
        seed, rate, dev = self.tcfg.seed, self.mcfg.sv_rate, self.device
        self.data = [device_split(s.train, sv_mask(s.train, rate, seed + 2 * i), dev)
                     for i, s in enumerate(self.sessions)]
        self.sv_valid = [sv_mask(s.valid, rate, seed + 2 * i + 1)
                         for i, s in enumerate(self.sessions)]
        for i, s in enumerate(self.sessions):
            self.model.init_readout_bias(s.train.recon.mean((0, 1)).to(dev), i)
        self.pcr_dims = pcr_init_readins(self.model, self.sessions)

    def batch(self, step: int) -> tuple:
        tc, n_train = self.tcfg, [len(s.train) for s in self.sessions]
        s, idx = pick_batch(tc.seed, step, n_train, tc.batch_size)
        return self.data[s], idx.to(self.device), {"session": s}

    def validate(self) -> dict:
        """Overall and each session's metrics; the best checkpoint and the plateau follow the
        overall selection loss."""
        each = [evaluate(self.model, s.valid, self.device, self.tcfg.precision, sv, session=i)
                for i, (s, sv) in enumerate(zip(self.sessions, self.sv_valid))]
        return over_sessions(self.sessions, each)

    def kw(self, session: int) -> dict:
        return {"session": session}

    def overall(self, each: list[dict]) -> dict:
        return over_sessions(self.sessions, each)

    def note(self) -> str:
        return (f"one stitched model over {len(self.sessions)} sessions: read-ins to "
                f"{self.mcfg.readin_dim} shared dimensions ({self.pcr_dims} started by principal-"
                f"component regression; {'trained' if self.mcfg.readin_train else 'fixed'})")


class StitchedTrainer(Stitched, Trainer):
    """The Trainer of several sessions in one process (src/main.py's build picks it)."""


# -----------------------------------------------------------------------------
# the session files


def load_sessions(files: list[str]) -> tuple[list, dict]:
    """The sessions of several files, checked to fit one model, and the model's data sizes."""
    sessions = [load_session(f) for f in files]
    check_compatible(sessions)
    names = [s.name for s in sessions]
    if len(set(names)) < len(names):  # outputs and metrics are named after the sessions
        raise DataError(f"several session files share a name: {', '.join(files)}")
    for s in sessions:  # each session's metrics are '<name>_<metric>' beside the overall ones
        clash = [k for k in METRIC_NAMES if k.startswith(s.name + "_")]
        if clash:
            raise DataError(f"{s.path}: a session named '{s.name}' would log metrics that read "
                            f"as the overall {clash[0]}; rename the file")
    return sessions, stitched_sizes(sessions)


def align(session: Session) -> dict:
    """The ALIGN_ATTRS a session file has, e.g. IBL's alignment event."""
    with h5py.File(session.path, "r") as f:
        values = {k: f.attrs[k] for k in ALIGN_ATTRS if k in f.attrs}
    return {k: v.decode() if isinstance(v, bytes) else v.item() if hasattr(v, "item") else v
            for k, v in values.items()}


def check_compatible(sessions: list[Session]) -> None:
    """Sessions trained as one stitched model must share what a bin means (bin size and
    alignment) and the shared network's sizes: encoder and reconstructed bins, external
    inputs. Neuron and trial counts may differ. Bin counts are kept equal because the
    generator and controller run a fixed T_rec steps and the controller input is padded by
    T_rec - T_enc: files prepared with the same window always agree."""
    first, first_align = sessions[0], align(sessions[0])
    for s in sessions[1:]:
        pairs = [("bin_size", first.bin_size, s.bin_size)]
        pairs += [(k, first_align.get(k, "not set"), align(s).get(k, "not set"))
                  for k in ALIGN_ATTRS]
        pairs += [(k, first.sizes[k], s.sizes[k]) for k in ("t_enc", "t_rec", "ext_dim")]
        for key, a, b in pairs:
            if a != b:
                raise DataError(f"cannot stitch {first.path} and {s.path}: {key} is {a} in "
                                f"the first and {b} in the second. Sessions trained together "
                                "need the same bin size, alignment and bins per trial; "
                                "prepare them alike, or train them one at a time with --data")


def stitched_sizes(sessions: list[Session]) -> dict:
    """The data sizes of a stitched LFADSConfig: shared bins, per-session neurons. n_in and
    n_out are 0: no single session's sizes describe the model."""
    first = sessions[0].sizes
    return dict(n_in=0, n_out=0, t_enc=first["t_enc"], t_rec=first["t_rec"],
                ext_dim=first["ext_dim"], session_n_in=[s.sizes["n_in"] for s in sessions],
                session_n_out=[s.sizes["n_out"] for s in sessions])


def match_sessions(saved: list[str], given: list[str], ckpt_path: str) -> list[str]:
    """The given files in the checkpoint's session order, matched by file name (a session's
    name): the read-in and read-out of each session go with its name, not its place."""
    name = lambda f: os.path.splitext(os.path.basename(f))[0]  # noqa: E731
    by_name = {name(f): f for f in given}
    wanted = [name(f) for f in saved]
    if sorted(by_name) != sorted(wanted) or len(by_name) != len(given):
        raise DataError(f"{', '.join(given)} are not the sessions of the checkpoint "
                        f"{ckpt_path} ({', '.join(wanted)}): a stitched model's read-ins and "
                        "read-outs belong to sessions by file name; give those files")
    return [by_name[n] for n in wanted]


def pick_batch(seed: int, step: int, n_train: list[int], batch_size: int):
    """The session and trials of one training step, a function of (seed, step) alone, so a
    resumed run draws what an uninterrupted one would. The session is drawn with probability
    proportional to its training trials (each trial then is seen equally often on average),
    and the batch is `batch_size` of its trials without repeats (all of them when it has
    fewer). Unlike one session's epochs, steps draw independently of each other."""
    g = torch.Generator().manual_seed(seed * 1_000_033 + step + 7)
    s = int(torch.multinomial(torch.tensor(n_train, dtype=torch.float64), 1, generator=g))
    return s, torch.randperm(n_train[s], generator=g)[:batch_size]


def over_sessions(sessions, each: list[dict]) -> dict:
    """Validation metrics of stitched sessions, `each` one dict per session: overall ones
    first (loss terms per trial over all the sessions' trials, the other metrics the mean over
    the sessions that have them), then each session's under '<name>_<key>'."""
    n = np.array([len(s.valid) for s in sessions], float)
    out = {}
    for key in dict.fromkeys(k for m in each for k in m):
        vals = [m.get(key, np.nan) for m in each]
        out[key] = float(np.dot(vals, n) / n.sum() if key in LOSS_TERMS else np.nanmean(vals))
    for s, m in zip(sessions, each):
        out.update({f"{s.name}_{k}": v for k, v in m.items()})
    return out


# -----------------------------------------------------------------------------
# the read-ins' start


def conditions(session: Session, split: str = "train") -> np.ndarray | None:
    """The condition id of every trial, from '{split}_condition' when the file has one
    (src/synth.py writes it), else None."""
    with h5py.File(session.path, "r") as f:
        key = f"{split}_condition"
        if key not in f or len(f[key]) != len(getattr(session, split)):
            return None
        return f[key][()]


def psths(sessions: list[Session]) -> tuple[list[np.ndarray], list[np.ndarray]]:
    """Each session's mean held-in counts per condition and encoder bin, (C, T_enc, N_in),
    over the conditions that every session has training trials of, when the files label
    their trials and those conditions hold at least half of every session's training trials;
    else over all its trials, (1, T_enc, N_in).
    Also the row of that table each training trial belongs to, (trials,), -1 for a trial of
    a condition left out. Sessions share the bin alignment, so [c, t] means the same moment
    of the same condition in every session."""
    conds = [conditions(s) for s in sessions]
    common = None if any(c is None for c in conds) else \
        np.array(sorted(set.intersection(*(set(c.tolist()) for c in conds))))
    by_condition = common is not None and len(common) >= 2 and all(
        np.isin(c, common).mean() >= 0.5 for c in conds)
    tables, groups = [], []
    for s, c in zip(sessions, conds):
        x = s.train.encod.numpy().astype(np.float64)  # (trials, T_enc, N_in)
        group = np.zeros(len(x), int)
        if by_condition:
            pos = np.searchsorted(common, c).clip(0, len(common) - 1)
            group = np.where(common[pos] == c, pos, -1)
        tables.append(np.stack([x[group == k].mean(0) for k in range(group.max() + 1)]))
        groups.append(group)
    return tables, groups


@torch.no_grad()
def pcr_init_readins(model, sessions: list[Session], ridge: float = 1e-3) -> int:
    """Start every read-in at principal-component regression, after Pandarinath et al. 2018
    (Methods, multi-session alignment), who initialised their alignment matrices so:

    1. P_s: session s's PSTHs (see `psths`), (C T_enc, N_in_s), each neuron centred.
    2. PCA of all sessions' neurons side by side, [P_1 ... P_S] (C T_enc, sum N_in_s): the
       top k = min(R, rank) components' scores Z (C T_enc, k), scaled to unit variance each,
       one shared target for all sessions.
    3. For each session, a ridge regression from its single-trial counts (each trial's bins
       as rows, centred by the session's mean count) to Z at that trial's condition and bin:
       W_s (N_in_s, k), lam = `ridge` x mean diag of the Gram matrix. The read-in of session
       s is x -> (x - mean_s) W_s: the same moment of every session lands on the same point
       of the shared input space.

    Step 3 regresses single trials, not the PSTHs themselves as the paper does: PSTH weights
    fitted without the spiking noise amplify it: on synthetic Lorenz sessions like those of
    tests/test_stitch.py they gave the encoders single-trial inputs of std 4-6 per dimension
    (the target's is 1), and trained worse than a random read-in. The single-trial fit is
    the least-squares estimate of Z from one trial, so it shrinks noisy neurons by itself.

    Read-in outputs beyond k (R larger than the PSTHs' rank) keep torch's random start.
    Returns k.
    """
    tables, groups = psths(sessions)
    centred = [(p - p.mean((0, 1))).reshape(-1, p.shape[2]) for p in tables]  # (C T_enc, N_s)
    u, sv, _ = np.linalg.svd(np.concatenate(centred, axis=1), full_matrices=False)
    rank = int((sv > sv[0] * 1e-8).sum()) if sv.size and sv[0] > 0 else 0
    k = min(model.cfg.readin_dim, rank)
    if k == 0:
        return 0
    z = u[:, :k] * sv[:k]  # (C T_enc, k) scores
    z = (z / z.std(0)).reshape(len(tables[0]), -1, k)  # (C, T_enc, k)
    for lin, s, group in zip(model.readin, sessions, groups):
        x = s.train.encod.numpy().astype(np.float64)  # (trials, T_enc, N_s)
        mean = x.mean((0, 1))
        x = (x[group >= 0] - mean).reshape(-1, x.shape[2])  # (trials T_enc, N_s)
        y = z[group[group >= 0]].reshape(-1, k)  # (trials T_enc, k): their condition's scores
        gram = x.T @ x  # (N_s, N_s)
        lam = ridge * max(np.trace(gram) / len(gram), 1e-12)
        w = np.linalg.solve(gram + lam * np.eye(len(gram)), x.T @ y)  # (N_s, k)
        lin.weight[:k] = torch.as_tensor(w.T, dtype=lin.weight.dtype)
        lin.bias[:k] = torch.as_tensor(-mean @ w, dtype=lin.bias.dtype)
    return k


# -----------------------------------------------------------------------------
# the figure


def shared_factors(sessions, outputs, run_dir, n_cond=6, max_sessions=6):
    """Factor trajectories of several stitched sessions in one shared latent space: the
    condition averages (valid trials; all trials alike when the files have no conditions) of
    each session, projected on the top three principal components of all of them together.
    Stitching worked when the same condition traces the same path whatever the session."""
    import matplotlib.pyplot as plt  # src/plots.py, which calls this, chose the file backend

    pairs = list(zip(sessions, outputs))[:max_sessions]
    conds = [conditions(s, "valid") for s, _ in pairs]
    conds = [np.zeros(len(o["valid"]["factors"]), int) if c is None else c
             for c, (_, o) in zip(conds, pairs)]
    common = set.intersection(*(set(c.tolist()) for c in conds))  # conditions all sessions have
    traces = {}  # (session, condition) -> (T_rec, F)
    for i, ((_, out), cond) in enumerate(zip(pairs, conds)):
        fac = out["valid"]["factors"]
        for c in sorted(common)[:n_cond] if common else np.unique(cond)[:n_cond]:
            traces[i, c] = fac[cond == c].mean(0)
    flat = np.concatenate(list(traces.values()))  # (traces * T_rec, F)
    mean = flat.mean(0)
    _, _, vt = np.linalg.svd(flat - mean, full_matrices=False)
    fig = plt.figure(figsize=(11, 5))
    ax3 = fig.add_subplot(1, 2, 1, projection="3d")
    ax2 = fig.add_subplot(1, 2, 2)
    styles, colours, labelled = ("-", "--", ":", "-.", (0, (5, 1)), (0, (1, 3))), {}, set()
    for (i, c), tr in traces.items():
        pcs = (tr - mean) @ vt[:3].T  # (T_rec, F) -> (T_rec, 3)
        colour = colours.setdefault(c, f"C{len(colours) % 10}")
        label = None if i in labelled else sessions[i].name
        labelled.add(i)
        ax3.plot(*pcs.T, color=colour, ls=styles[i % len(styles)], lw=1)
        ax2.plot(pcs[:, 0], pcs[:, 1], color=colour, ls=styles[i % len(styles)], lw=1,
                 label=label)
    ax3.set(title="shared factors, PC1-3", xlabel="PC1", ylabel="PC2", zlabel="PC3")
    ax2.set(title="colour: condition, line style: session", xlabel="PC1", ylabel="PC2")
    ax2.legend(fontsize=7)
    fig.tight_layout()
    with atomic_path(os.path.join(run_dir, "factors_shared.png")) as tmp:  # no half figure
        fig.savefig(tmp, dpi=110, format="png")
    plt.close(fig)
