"""Ground-truth spiking data: Poisson spikes from known rates, so LFADS can be checked.

    python -m src.synth lorenz --out eg_data/lorenz.h5

The file follows the session contract (DESIGN.md section 2) and adds `train_truth` and
`valid_truth` (rates in Hz) with `conversion_factor` = 1 / bin_size, so that
truth / conversion_factor is the expected count per bin that LFADS should infer.

Lorenz recipe after TF LFADS and AutoLFADS (DESIGN.md section 6): the three Lorenz latents
drive log firing rates through a random linear map; each condition is one initial state on
the attractor and its trials differ only by Poisson noise.
"""

import argparse
import os
from dataclasses import dataclass

import h5py
import numpy as np

from src.utils import atomic_path


@dataclass
class LorenzConfig:
    n_conditions: int = 65  # initial states on the attractor (AutoLFADS example: 65)
    trials_per_condition: int = 20  # Poisson repeats of each condition's rates
    n_bins: int = 50  # reconstructed bins per trial, T_rec (AutoLFADS example: 50)
    n_fp_bins: int = 10  # final bins the encoders never see: forward prediction
    n_neurons: int = 40  # all neurons, N
    n_heldout: int = 10  # of which the last n_heldout are never encoder input
    bin_size: float = 0.02  # seconds per bin (TF LFADS Lorenz: 20 ms)
    bin_time: float = 0.02  # Lorenz time units per bin: 50 bins span about 1.5 loops
    base_rate: float = 5.0  # Hz at the latent mean (DESIGN.md section 6: about 5 Hz)
    gain: float = 1.0  # std of each neuron's log rate: rates span about e^-2..e^2 x base
    valid_frac: float = 0.2  # share of trials in the validation split
    seed: int = 0


def lorenz_deriv(x: np.ndarray, sigma=10.0, rho=28.0, beta=8.0 / 3.0) -> np.ndarray:
    # the classic parameters (Lorenz 1963), as in DESIGN.md section 6
    dx = sigma * (x[..., 1] - x[..., 0])
    dy = x[..., 0] * (rho - x[..., 2]) - x[..., 1]
    dz = x[..., 0] * x[..., 1] - beta * x[..., 2]
    return np.stack([dx, dy, dz], axis=-1)


def integrate(x: np.ndarray, n_steps: int, dt: float) -> np.ndarray:
    """Classic fourth-order Runge-Kutta; returns the states after each step, (n_steps, ..., 3)."""
    out = np.empty((n_steps,) + x.shape)
    for i in range(n_steps):
        k1 = lorenz_deriv(x)
        k2 = lorenz_deriv(x + 0.5 * dt * k1)
        k3 = lorenz_deriv(x + 0.5 * dt * k2)
        k4 = lorenz_deriv(x + dt * k3)
        x = x + dt / 6.0 * (k1 + 2 * k2 + 2 * k3 + k4)
        out[i] = x
    return out


def lorenz_latents(cfg: LorenzConfig, rng: np.random.Generator) -> np.ndarray:
    """Whitened Lorenz trajectories, one per condition: (C, T, 3)."""
    substeps = 10  # RK4 steps per bin; the step (0.002) is far below the fastest time scale
    dt = cfg.bin_time / substeps
    # start anywhere, then run long enough to land on the attractor before recording
    x0 = rng.uniform(-10, 10, size=(cfg.n_conditions, 3)) + np.array([0.0, 0.0, 25.0])
    x0 = integrate(x0, 2000, dt)[-1]  # 4 time units of burn-in
    z = integrate(x0, cfg.n_bins * substeps, dt)[substeps - 1 :: substeps]  # (T, C, 3)
    z = z.transpose(1, 0, 2)  # (C, T, 3)
    # whiten so that every unit-norm read-out row gives the same log-rate spread: x and y are
    # strongly correlated on the attractor, and without this some neurons would be untuned
    flat = z.reshape(-1, 3) - z.reshape(-1, 3).mean(0)
    evals, evecs = np.linalg.eigh(np.cov(flat.T))
    return (flat @ evecs / np.sqrt(evals)).reshape(z.shape)


def poisson_session(rates_hz: np.ndarray, cfg: LorenzConfig, rng: np.random.Generator) -> dict:
    """Repeat each condition's rates (C, T, N) into trials, draw spikes and split.

    Trials stay ordered by condition inside each split: identical truth rows then sit next to
    each other and compress to almost nothing in the HDF5 file.
    """
    n_cond, reps = rates_hz.shape[0], cfg.trials_per_condition
    cond = np.repeat(np.arange(n_cond), reps)  # (C*R,) condition of each trial
    truth = rates_hz[cond]  # (C*R, T, N)
    counts = rng.poisson(truth * cfg.bin_size)
    n_valid = int(round(cfg.valid_frac * len(cond)))
    is_valid = np.zeros(len(cond), bool)
    is_valid[rng.choice(len(cond), n_valid, replace=False)] = True
    n_enc, n_in = cfg.n_bins - cfg.n_fp_bins, cfg.n_neurons - cfg.n_heldout
    out = {}
    for split, mask in (("train", ~is_valid), ("valid", is_valid)):
        inds = np.flatnonzero(mask)
        out[f"{split}_encod_data"] = counts[inds, :n_enc, :n_in]
        out[f"{split}_recon_data"] = counts[inds]
        out[f"{split}_truth"] = truth[inds].astype(np.float32)
        out[f"{split}_inds"] = inds
        out[f"{split}_condition"] = cond[inds]
    return out


def make_lorenz(cfg: LorenzConfig) -> tuple[dict, dict]:
    rng = np.random.default_rng(cfg.seed)
    z = lorenz_latents(cfg, rng)  # (C, T, 3)
    w = rng.normal(size=(3, cfg.n_neurons))
    w *= cfg.gain / np.linalg.norm(w, axis=0)  # each neuron's log rate has std `gain`
    rates_hz = cfg.base_rate * np.exp(z @ w)  # (C, T, N)
    data = poisson_session(rates_hz, cfg, rng)
    data["latents"] = z.astype(np.float32)
    attrs = {"bin_size": cfg.bin_size, "conversion_factor": 1.0 / cfg.bin_size,
             "generator": "lorenz", **{f"synth_{k}": v for k, v in vars(cfg).items()}}
    return data, attrs


def write_session(path: str, data: dict, attrs: dict) -> None:
    """Write a session file atomically; counts as the smallest unsigned type that fits."""
    with atomic_path(path) as tmp, h5py.File(tmp, "w") as f:
        for key, value in data.items():
            if key.endswith(("_encod_data", "_recon_data")):
                value = value.astype(np.uint8 if value.max() < 256 else np.uint16)
            opts = dict(compression="gzip", shuffle=True) if value.ndim >= 2 else {}
            f.create_dataset(key, data=value, **opts)
        if "conversion_factor" in attrs:
            f.create_dataset("conversion_factor", data=attrs["conversion_factor"])
        for k, v in attrs.items():
            f.attrs[k] = v


def main(argv=None):
    p = argparse.ArgumentParser(description="Write a ground-truth session file.")
    p.add_argument("kind", choices=["lorenz"])
    p.add_argument("--out", required=True, help="output .h5 path")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    data, attrs = make_lorenz(LorenzConfig(seed=args.seed))
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    write_session(args.out, data, attrs)
    n_tr, n_va = len(data["train_inds"]), len(data["valid_inds"])
    print(f"wrote {args.out}: {n_tr} train + {n_va} valid trials, "
          f"{data['train_recon_data'].shape[1:]} (bins, neurons)")


if __name__ == "__main__":
    main()
