"""Several sessions, one model: the stitching of Pandarinath et al. 2018 (Nature Methods 15:805).

Each session (an IBL insertion) records its own neurons. The stitched model (src/model.py)
gives every session a linear read-in, N_in -> R shared encoder inputs, and a read-out, F
factors -> its N neurons; encoders, controller and generator are shared, so the latent
dynamics are learned from every session's trials at once. Here: the sizes of such a model
and the principal-component-regression start of the read-ins; src/data.py draws the session
of each training step (pick_batch).
"""

import h5py
import numpy as np
import torch

from src.data import Session


def stitched_sizes(sessions: list[Session]) -> dict:
    """The data sizes of a stitched LFADSConfig: shared bins, per-session neurons. n_in and
    n_out are 0: no single session's sizes describe the model (src/data.check_compatible has
    made sure the bins and inputs agree)."""
    first = sessions[0].sizes
    return dict(n_in=0, n_out=0, t_enc=first["t_enc"], t_rec=first["t_rec"],
                ext_dim=first["ext_dim"], session_n_in=[s.sizes["n_in"] for s in sessions],
                session_n_out=[s.sizes["n_out"] for s in sessions])


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
