"""Figures of a run folder: training curves, spikes and rates, factors, inputs, truth."""

import os

import matplotlib

matplotlib.use("Agg")  # files only, no screen needed
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from src.metrics import r2  # noqa: E402
from src.utils import atomic_path  # noqa: E402


def save(fig, run_dir, name):
    fig.tight_layout()
    with atomic_path(os.path.join(run_dir, name)) as tmp:  # a kill leaves no half figure
        fig.savefig(tmp, dpi=110, format=os.path.splitext(name)[1][1:])
    plt.close(fig)


def curves(rows, run_dir):
    """Every loss term, the ramps and learning rate, bits/spike and R2 over steps."""
    step = np.array([r["step"] for r in rows])
    col = lambda k: np.array([r.get(k, np.nan) for r in rows], float)  # noqa: E731
    panels = [("reconstruction (nats/trial)", ["train_recon", "valid_recon", "train_recon_sv",
                                               "valid_recon_sv"]),  # sample validation
              ("KL (nats/trial)", ["train_kl_ic", "valid_kl_ic", "train_kl_co", "valid_kl_co"]),
              ("L2 penalty (nats/trial, before the ramp)", ["train_l2"]),
              ("ramps and lr / lr0", ["kl_weight", "l2_weight", "lr"]),
              ("bits per spike (valid)", ["valid_bps", "valid_co_bps", "valid_fp_bps"]),
              ("R2 of rates vs truth (valid)", ["valid_r2", "valid_r2_pooled", "valid_r2_heldout"])]
    fig, axes = plt.subplots(2, 3, figsize=(13, 6.5))
    for ax, (title, keys) in zip(axes.flat, panels):
        for k in keys:
            y = col(k)
            if k == "lr":
                y = y / y[0]
            if np.isfinite(y).any():
                ax.plot(step, y, label=k)
        if title.startswith("KL"):
            ax.set_yscale("log")  # the inferred-input KL starts orders of magnitude higher
        ax.set_title(title, fontsize=10)
        ax.set_xlabel("step")
        if ax.lines:
            ax.legend(fontsize=7)
    save(fig, run_dir, "curves.png")


def spikes_and_rates(session, out, run_dir, trials=(0, 1, 2), suffix=""):
    """Measured counts next to inferred rates (and true rates) for a few valid trials."""
    truth = session.valid.truth
    trials = [t for t in trials if t < len(session.valid)]  # a tiny validation split has fewer
    cols = 3 if truth is not None else 2
    fig, axes = plt.subplots(len(trials), cols, figsize=(4 * cols, 2.6 * len(trials)),
                             squeeze=False)
    n_in = session.train.encod.shape[2]
    for i, tr in enumerate(trials):
        panels = [("spike counts", session.valid.recon[tr].numpy()),
                  ("LFADS rates", out["rates"][tr])]
        if truth is not None:
            panels.append(("true rates", truth[tr]))
        vmax = np.percentile(out["rates"][tr], 99)
        for ax, (title, img) in zip(axes[i], panels):
            ax.imshow(img.T, aspect="auto", cmap="magma", vmin=0,
                      vmax=vmax if title != "spike counts" else None, interpolation="nearest")
            ax.axhline(n_in - 0.5, color="c", lw=0.8)  # held-out neurons below the line
            ax.set_title(f"valid trial {tr}: {title}", fontsize=9)
            ax.set_xlabel("bin")
            ax.set_ylabel("neuron")
    save(fig, run_dir, f"rates{suffix}.png")


def factors(out, run_dir, n_trials=20, suffix="", bin_s=1.0):
    """Factor trajectories projected on their top two principal components, and the top three
    components of one trial over time."""
    fac = out["factors"][:n_trials]  # (trials, T, F)
    flat = fac.reshape(-1, fac.shape[-1])
    flat = flat - flat.mean(0)
    _, _, vt = np.linalg.svd(flat, full_matrices=False)
    pcs = (fac - fac.reshape(-1, fac.shape[-1]).mean(0)) @ vt[:3].T  # (trials, T, <= 3)
    t = np.arange(fac.shape[1]) * bin_s
    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    for tr in pcs:
        if pcs.shape[-1] >= 2:
            axes[0].plot(tr[:, 0], tr[:, 1], lw=0.8)
        else:  # a single factor has no second component: plot it over time
            axes[0].plot(t, tr[:, 0], lw=0.8)
    if pcs.shape[-1] >= 2:
        axes[0].set(title=f"factors of {len(pcs)} valid trials, PC1 vs PC2", xlabel="PC1",
                    ylabel="PC2")
    else:
        axes[0].set(title="the factor, centred (valid trials)", xlabel="time (s)")
    for k in range(pcs.shape[-1]):
        axes[1].plot(t, pcs[0, :, k], label=f"PC{k + 1}")
    axes[1].set(title="valid trial 0: top components of its factors", xlabel="time (s)",
                ylabel="factor PC (a.u.)")
    axes[1].legend(fontsize=8)
    save(fig, run_dir, f"factors{suffix}.png")


def inputs(out, run_dir, trials=(0, 1, 2, 3), suffix="", bin_s=1.0):
    if "co_means" not in out:
        return
    trials = [t for t in trials if t < len(out["co_means"])]
    fig, axes = plt.subplots(1, len(trials), figsize=(3.3 * len(trials), 2.8), squeeze=False,
                             sharey=True)
    for ax, tr in zip(axes[0], trials):
        u = out["co_means"][tr]  # (T, U)
        t = np.arange(len(u)) * bin_s
        for k in range(u.shape[1]):
            ax.plot(t, u[:, k], label=f"u{k + 1}")
        ax.set(title=f"inferred inputs, valid trial {tr}", xlabel="time (s)")
    axes[0][0].set_ylabel("posterior mean (a.u.)")
    axes[0][-1].legend(fontsize=7)
    save(fig, run_dir, f"inputs{suffix}.png")


def distinct_trials(true, k=3):
    """k trials whose true rates differ most (greedy farthest points): trials of one condition
    would draw the same line three times."""
    flat = true.reshape(len(true), -1)
    chosen = [0]
    for _ in range(min(k, len(true)) - 1):
        d = np.min([((flat - flat[c]) ** 2).sum(1) for c in chosen], axis=0)
        chosen.append(int(np.argmax(d)))
    return chosen


def truth(session, out, run_dir, neurons=(0, 1, 2, -1), suffix=""):
    """Inferred against true rates: all elements, and example neurons over time on three
    validation trials of different conditions; rates in spikes/s."""
    hz = 1.0 / session.bin_size
    true, pred = session.valid.truth * hz, out["rates"] * hz
    mean_r2, pooled = r2(pred, true)
    fig, axes = plt.subplots(1, 1 + len(neurons), figsize=(3.4 * (1 + len(neurons)), 3.2))
    idx = np.random.default_rng(0).choice(true.size, min(true.size, 20000), replace=False)
    axes[0].scatter(true.flat[idx], pred.flat[idx], s=1, alpha=0.3)
    lim = [0, np.percentile(true, 99.5)]
    axes[0].plot(lim, lim, "k--", lw=0.8)
    axes[0].set(xlim=lim, ylim=lim, xlabel="true rate (spikes/s)", ylabel="LFADS rate (spikes/s)",
                title=f"valid R2 {mean_r2:.3f} (pooled {pooled:.3f})")
    n_in, t = session.train.encod.shape[2], np.arange(true.shape[1]) * session.bin_size
    for ax, n in zip(axes[1:], neurons):
        n = n % true.shape[2]
        for tr, c in zip(distinct_trials(true), ("C0", "C1", "C2")):
            ax.plot(t, true[tr, :, n], c, lw=1.5, alpha=0.5)
            ax.plot(t, pred[tr, :, n], c + "--", lw=1)
        kind = "held-out" if n >= n_in else "held-in"
        ax.set(title=f"neuron {n} ({kind}): true -, LFADS --", xlabel="time (s)",
               ylabel="rate (spikes/s)")
    save(fig, run_dir, f"truth{suffix}.png")


def session_figures(run_dir, session, outputs, suffix=""):
    """One session's figures of its validation trials."""
    valid = outputs["valid"]
    spikes_and_rates(session, valid, run_dir, suffix=suffix)
    factors(valid, run_dir, suffix=suffix, bin_s=session.bin_size)
    inputs(valid, run_dir, suffix=suffix, bin_s=session.bin_size)
    if session.valid.truth is not None:
        truth(session, valid, run_dir, suffix=suffix)


def make_all(run_dir, sessions, rows, outputs):
    """curves.png of the run; each session's figures (named <figure>_<session>.png when there
    are several); for several sessions also their factors in one shared latent space."""
    if rows:
        curves(rows, run_dir)
    several = len(sessions) > 1
    for s, out in zip(sessions, outputs):
        session_figures(run_dir, s, out, suffix=f"_{s.name}" if several else "")
    if several:
        from src.stitch import shared_factors

        shared_factors(sessions, outputs, run_dir)
