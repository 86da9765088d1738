"""Ground-truth spiking data: Poisson spikes from known rates, so LFADS can be checked.

    python -m src.synth lorenz --out eg_data/lorenz.h5

The file follows the session contract (docs/design.md, The session file) and adds
`train_truth` and `valid_truth` (rates in Hz) with `conversion_factor` = 1 / bin_size, so that
truth / conversion_factor is the expected count per bin that LFADS should infer.

Two recipes after TF LFADS and AutoLFADS (docs/design.md, Synthetic data):

- lorenz: the three Lorenz latents drive log firing rates through a random linear map; each
  condition is one initial state on the attractor and its trials differ only by Poisson noise.
- chaotic_rnn: a 50-unit random RNN with gain 1.5 (chaotic), rates from its tanh units; with
  `input_magnitude` > 0 every trial gets one input pulse at a random time, which LFADS can
  only explain through its controller (inferred inputs). With `n_units` set, a population of
  n_neurons neurons reads the units through exp of random mixes instead (more neurons than
  units, rates of a chosen base, spread and depth), as src/bench/panel.py's datasets do.

    python -m src.synth chaotic_rnn --out data/crnn.h5 [--input-magnitude 20]

- lorenz_behavior: lorenz's session plus behaviour that is a known function of the latents
  (docs/decoding.md): `{split}_behavior` (trials, T, D), a "velocity" read out linearly from
  the latents plus noise, and a per-trial choice (`trials/choice`, -1/+1), the sign of its
  first dimension at one bin. Decoders on the true rates then have a known ceiling.

    python -m src.synth lorenz_behavior --out data/lorenz_behavior.h5
"""

import os
from dataclasses import dataclass

import h5py
import numpy as np

from src.utils import FlagParser, atomic_path


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
    base_rate: float = 5.0  # Hz at the latent mean (docs/design.md, Synthetic data)
    gain: float = 1.0  # std of each neuron's log rate: rates span about e^-2..e^2 x base
    rate_spread: float = 0.0  # std of ln(base rate) across neurons; 0 = all at base_rate, 0.75
    #                           spreads them over about base x e^-1.5..e^1.5 (2 std)
    valid_frac: float = 0.2  # share of trials in the validation split
    seed: int = 0  # seeds the latents, then (when readout_seed < 0) read-out, split and spikes
    readout_seed: int = -1  # >= 0: read-out, split and spikes from this seed instead, so that
    #                         files with one `seed` share their latents and conditions but not
    #                         their neurons: sessions to stitch (src/stitch.py)


def lorenz_deriv(x: np.ndarray, sigma=10.0, rho=28.0, beta=8.0 / 3.0) -> np.ndarray:
    # the classic parameters (Lorenz 1963)
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


def condition_trials(n_cond: int, reps: int) -> np.ndarray:
    """The condition of every trial, (C*R,): each condition's repeats next to each other, so
    identical truth rows compress to almost nothing in the HDF5 file."""
    return np.repeat(np.arange(n_cond), reps)


def poisson_session(truth: np.ndarray, cond: np.ndarray, cfg, rng: np.random.Generator,
                    extra: dict | None = None) -> dict:
    """Draw spikes from per-trial rates (trials, T, N) in Hz and split into train and valid.

    `cfg` needs bin_size, n_bins, n_fp_bins, n_neurons, n_heldout and valid_frac; `extra`
    holds more per-trial arrays (trials, ...) to split alongside, e.g. true pulse times.
    """
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
        for key, value in (extra or {}).items():
            out[f"{split}_{key}"] = value[inds]
    return out


def neuron_base_factors(spread: float, n: int, rng: np.random.Generator) -> np.ndarray:
    """Each neuron's base rate relative to the common one, log-normal: (N,). Recorded
    populations mix quiet and busy neurons (an IBL insertion's good units span about 1-20 Hz)."""
    return np.exp(spread * rng.normal(size=n))


def make_lorenz(cfg: LorenzConfig) -> tuple[dict, dict]:
    rng = np.random.default_rng(cfg.seed)
    z = lorenz_latents(cfg, rng)  # (C, T, 3)
    if cfg.readout_seed >= 0:
        rng = np.random.default_rng([cfg.seed, cfg.readout_seed])
    w = rng.normal(size=(3, cfg.n_neurons))
    w *= cfg.gain / np.linalg.norm(w, axis=0)  # each neuron's log rate has std `gain`
    rates_hz = cfg.base_rate * np.exp(z @ w)  # (C, T, N)
    if cfg.rate_spread > 0:  # drawn only then, so that files without a spread stay as they were
        rates_hz *= neuron_base_factors(cfg.rate_spread, cfg.n_neurons, rng)
    cond = condition_trials(cfg.n_conditions, cfg.trials_per_condition)
    data = poisson_session(rates_hz[cond], cond, cfg, rng)
    data["latents"] = z.astype(np.float32)
    attrs = {"bin_size": cfg.bin_size, "conversion_factor": 1.0 / cfg.bin_size,
             "generator": "lorenz", **{f"synth_{k}": v for k, v in vars(cfg).items()}}
    return data, attrs


@dataclass
class LorenzBehaviorConfig(LorenzConfig):
    """A Lorenz session with behaviour that is a known function of its latents, so that a
    decoder's R2 from the true rates is a ceiling: a per-bin "velocity" read out linearly from
    the latents, plus noise, and a per-trial binary choice, the sign of its first dimension at
    one bin. The neural data are those of LorenzConfig with the same fields."""
    behavior_dims: int = 2  # "velocity" dimensions, each a unit-norm read-out of the 3 latents
    behavior_noise: float = 0.3  # std of the per-bin noise on each dimension (signal std 1)
    choice_frac: float = 0.5  # the choice is read at this fraction of the trial's bins
    behavior_seed: int = 7  # read-out and noise come from [seed, behavior_seed], so that the
    #                         neural data stay those of the plain generator


def choice_bin(cfg: LorenzBehaviorConfig) -> int:
    return min(int(cfg.choice_frac * cfg.n_bins), cfg.n_bins - 1)


def lorenz_behavior(z: np.ndarray, cond: np.ndarray, cfg: LorenzBehaviorConfig) -> tuple:
    """Per-bin behaviour (trials, T, D) and per-trial choice (trials,) in -1/+1 from the
    whitened latents z (C, T, 3) of each trial's condition `cond` (trials,)."""
    rng = np.random.default_rng([cfg.seed, cfg.behavior_seed])
    w = rng.normal(size=(3, cfg.behavior_dims))
    w /= np.linalg.norm(w, axis=0)  # whitened latents: each dimension has variance 1
    clean = z[cond] @ w  # (trials, T, D)
    behavior = clean + cfg.behavior_noise * rng.normal(size=clean.shape)
    choice = np.where(behavior[:, choice_bin(cfg), 0] >= 0, 1.0, -1.0)
    return behavior.astype(np.float32), choice


def make_lorenz_behavior(cfg: LorenzBehaviorConfig) -> tuple[dict, dict]:
    """make_lorenz's session and, from the same latents, `{split}_behavior` (trials, T, D)
    with its `names` and `units`, and the choice in a `trials` group indexed by `{split}_inds`
    (the layout of IBL files, src/ibl/prep.py)."""
    data, attrs = make_lorenz(cfg)
    cond = condition_trials(cfg.n_conditions, cfg.trials_per_condition)
    behavior, choice = lorenz_behavior(data["latents"].astype(np.float64), cond, cfg)
    for split in ("train", "valid"):
        data[f"{split}_behavior"] = behavior[data[f"{split}_inds"]]
    data["trials/choice"] = choice
    # when the choice is read (the end of its bin), in seconds from the trial's first bin: the
    # name of IBL's event that the choice shows in, so that decoders use the same window
    data["trials/firstMovement_times"] = np.full(len(cond), (choice_bin(cfg) + 1) * cfg.bin_size)
    attrs["generator"] = "lorenz_behavior"
    # the NLB tools' naming, as src/decode.py reads it: names and units on the dataset
    names = [f"vel_{i}" for i in range(cfg.behavior_dims)]
    attrs["dataset_attrs"] = {f"{s}_behavior": {"names": names, "units": "a.u."}
                              for s in ("train", "valid")}
    return data, attrs


@dataclass
class ChaoticRNNConfig:
    # TF LFADS synth_data/run_generate_synth_data.sh values in brackets
    n_conditions: int = 400  # initial states x0 ~ N(0, x0_std^2) [C 400]
    trials_per_condition: int = 10  # Poisson repeats of each condition [nreplications 10]
    n_neurons: int = 50  # RNN units, every one recorded, N [N 50, S 50]
    n_heldout: int = 10  # of which the last n_heldout are never encoder input [none]
    n_bins: int = 100  # bins per trial, T_rec [T 1 s / dt 10 ms]
    n_fp_bins: int = 10  # final bins the encoders never see: forward prediction [none]
    bin_size: float = 0.01  # seconds per bin and per RNN step [dt 0.01]
    tau: float = 0.025  # seconds, the units' time constant [0.025]
    gain: float = 1.5  # g in x' = -x + g W tanh(x): > 1 is chaotic (Sompolinsky 1988) [1.5]
    x0_std: float = 1.0  # spread of the initial states [1.0]
    max_rate: float = 30.0  # Hz at tanh = 1, the top of every unit's range [30]
    input_magnitude: float = 0.0  # size of one input pulse per trial; 0 = autonomous [20]
    valid_frac: float = 0.2  # share of trials in the validation split [0.2]
    seed: int = 5  # [synth_data_seed 5]
    # a recorded population larger (or smaller) than the RNN: n_units > 0 units, and each of
    # the n_neurons neurons reads a random mix of their tanh values through exp, as LFADS's own
    # read-out does [not in the recipe, where every unit is one neuron]
    n_units: int = 0  # RNN units; 0 = n_neurons units, each one a neuron (the recipe)
    base_rate: float = 5.0  # with n_units: Hz at a neuron's mean log rate (max_rate unused)
    readout_gain: float = 1.0  # with n_units: std of each neuron's log rate, as LorenzConfig.gain
    rate_spread: float = 0.0  # with n_units: std of ln(base rate) across neurons, as Lorenz's
    readout_clip: float = 2.5  # with n_units: soft bound c on the standardised mix, c tanh(x / c)
    #                            (standardised again), so that log rates stay within about
    #                            readout_gain x c of their mean [not in the recipe]


def n_rnn_units(cfg: ChaoticRNNConfig) -> int:
    return cfg.n_units or cfg.n_neurons


def chaotic_rnn_weights(cfg: ChaoticRNNConfig, rng: np.random.Generator) -> tuple:
    """The RNN's recurrent weights (U, U), W ~ N(0, g^2/U), and input weights (U,), b ~ N(0, 1)
    (TF LFADS's `Bin`); U = n_neurons unless n_units is set."""
    n = n_rnn_units(cfg)
    return cfg.gain * rng.normal(size=(n, n)) / np.sqrt(n), rng.normal(size=n)


def chaotic_rnn_units(x, w, cfg: ChaoticRNNConfig, tanh=np.tanh, kick=None) -> list:
    """tanh of the RNN's state after each of n_bins steps from x (trials, N): T x (trials, N).

    The discretisation of TF LFADS's synthetic_data_utils: x_t = (1 - dt/tau) x_{t-1} +
    dt/tau (W tanh(x_{t-1}) + u_t), u_t = kick(t) or 0. Numpy arrays or torch tensors alike
    (pass tanh=torch.tanh): the ideal observer of src/bench/quality.py differentiates it.
    """
    a, out = cfg.bin_size / cfg.tau, []
    for t in range(cfg.n_bins):
        x = (1 - a) * x + a * tanh(x) @ w.T
        if kick is not None:
            x = x + a * kick(t)
        out.append(tanh(x))
    return out


def chaotic_rnn_tanh(cfg: ChaoticRNNConfig, w, b_in, x0, pulse_time=None) -> np.ndarray:
    """Run the RNN from x0 (trials, U), with u_t = input_magnitude b_in at each trial's pulse
    time when pulse_time is given; returns tanh of the states, (trials, T, U)."""
    kick = None
    if pulse_time is not None:
        kick = lambda t: cfg.input_magnitude * (pulse_time == t)[:, None] * b_in  # noqa: E731
    return np.stack(chaotic_rnn_units(x0, w, cfg, kick=kick), axis=1)


def chaotic_rnn_rates(cfg: ChaoticRNNConfig, w, b_in, x0, pulse_time=None) -> np.ndarray:
    """The recipe's rates in Hz, (trials, T, N): every unit one neuron (see chaotic_rnn_tanh)."""
    out = chaotic_rnn_tanh(cfg, w, b_in, x0, pulse_time)
    # tanh's (-1, 1) mapped to (0, max_rate) alike in every trial, as TF LFADS does without
    # inputs. With inputs TF LFADS rescales each trial's range instead; we do not: that makes
    # the true rates depend on the whole trial, not on the state, which no dynamical model
    # (and no R2 against truth) should be asked to reproduce
    return cfg.max_rate * (out + 1) / 2


def standardised(x: np.ndarray) -> np.ndarray:
    """Each neuron's values (trials, T, N) to mean 0 and std 1 over trials and bins."""
    return (x - x.mean((0, 1))) / x.std((0, 1))


def readout_rates(units: np.ndarray, cfg: ChaoticRNNConfig, rng: np.random.Generator) -> tuple:
    """Rates in Hz of neurons that each read a random mix of the units, and the mix.

    units: (trials, T, U) tanh values -> rates (trials, T, N). Each neuron's mix is
    standardised over all trials and bins, so that its log rate has mean ln(base) and std
    readout_gain whatever the mix: no neuron is left untuned by chance. The mix's tails
    are bounded softly: saturated units can push a standardised mix 8 standard deviations out,
    which exp would turn into thousands of spikes per second."""
    mix = rng.normal(size=(units.shape[2], cfg.n_neurons))  # (U, N)
    proj = units @ mix  # (trials, T, N)
    c = cfg.readout_clip
    proj = standardised(c * np.tanh(standardised(proj) / c))  # again: the std stays readout_gain
    base = cfg.base_rate * neuron_base_factors(cfg.rate_spread, cfg.n_neurons, rng)  # (N,)
    return base * np.exp(cfg.readout_gain * proj), mix


def make_chaotic_rnn(cfg: ChaoticRNNConfig) -> tuple[dict, dict]:
    rng = np.random.default_rng(cfg.seed)
    cond = condition_trials(cfg.n_conditions, cfg.trials_per_condition)
    x0 = cfg.x0_std * rng.normal(size=(cfg.n_conditions, n_rnn_units(cfg)))[cond]  # (trials, U)
    extra = {}
    pulse_time = None
    if cfg.input_magnitude > 0:
        # one pulse per trial, uniform over the middle half of the trial (the recipe's
        # "hits" between 1/4 and 3/4 of the time), so repeats of a condition differ
        quarter = cfg.n_bins // 4
        pulse_time = rng.integers(quarter, quarter + cfg.n_bins // 2, size=len(cond))
        extra["pulse_time"] = pulse_time
    w, b_in = chaotic_rnn_weights(cfg, rng)
    if cfg.n_units:
        rates_hz, mix = readout_rates(chaotic_rnn_tanh(cfg, w, b_in, x0, pulse_time), cfg, rng)
    else:
        rates_hz = chaotic_rnn_rates(cfg, w, b_in, x0, pulse_time)
    data = poisson_session(rates_hz, cond, cfg, rng, extra)
    # the true system, no part of the contract. `rnn_weights` is what the ideal observer
    # (src/bench/quality.py) reads, which assumes one neuron per unit: only the recipe's files
    if cfg.n_units:
        data["unit_weights"], data["readout_mix"] = w, mix
    else:
        data["rnn_weights"] = w
    data["rnn_input_weights"] = b_in
    attrs = {"bin_size": cfg.bin_size, "conversion_factor": 1.0 / cfg.bin_size,
             "generator": "chaotic_rnn", **{f"synth_{k}": v for k, v in vars(cfg).items()}}
    return data, attrs


def write_session(path: str, data: dict, attrs: dict) -> None:
    """Write a session file atomically; counts as the smallest unsigned type that fits.
    attrs["dataset_attrs"], when there, holds {key: {name: value}} for datasets, not the file."""
    attrs = dict(attrs)
    dataset_attrs = attrs.pop("dataset_attrs", {})
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
        for key, kv in dataset_attrs.items():
            f[key].attrs.update(kv)


GENERATORS = {"lorenz": (LorenzConfig, make_lorenz),
              "lorenz_behavior": (LorenzBehaviorConfig, make_lorenz_behavior),
              "chaotic_rnn": (ChaoticRNNConfig, make_chaotic_rnn)}


def build_parser() -> FlagParser:
    p = FlagParser(prog="python -m src.synth", description="Write a ground-truth session file: "
                   "spikes with their true rates (and, for lorenz_behavior, behaviour).")
    p.add_argument("kind", choices=sorted(GENERATORS), help="the latent system: "
                   + ", ".join(sorted(GENERATORS)))
    p.add_argument("--out", required=True, metavar="FILE", help="the session file to write")
    p.add_argument("--seed", type=int, metavar="N", help="seed of the latents (default: the "
                   "generator's config)")
    p.add_argument("--input-magnitude", type=float, default=0.0, metavar="X",
                   help="chaotic_rnn: size of one input pulse per trial (TF LFADS: 20; "
                   "default: 0, no pulses)")
    p.add_argument("--readout-seed", type=int, default=-1, metavar="N", help="lorenz: seed of "
                   "the neurons and spikes; files with the same --seed and different "
                   "--readout-seed share their latents: sessions to stitch (default: -1, from "
                   "--seed)")
    p.add_argument("--neurons", type=int, metavar="N", help="lorenz: neurons, a quarter of "
                   "them held out (default: the config's 40)")
    return p


def main(argv=None):
    args = build_parser().parse_args(argv)
    cfg_cls, make = GENERATORS[args.kind]
    cfg = cfg_cls() if args.seed is None else cfg_cls(seed=args.seed)
    if args.kind == "chaotic_rnn":
        cfg.input_magnitude = args.input_magnitude
    else:
        cfg.readout_seed = args.readout_seed
        if args.neurons:
            cfg.n_neurons, cfg.n_heldout = args.neurons, args.neurons // 4
    data, attrs = make(cfg)
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    write_session(args.out, data, attrs)
    n_tr, n_va = len(data["train_inds"]), len(data["valid_inds"])
    print(f"wrote {args.out}: {n_tr} train + {n_va} valid trials, "
          f"{data['train_recon_data'].shape[1:]} (bins, neurons)")


if __name__ == "__main__":
    main()
