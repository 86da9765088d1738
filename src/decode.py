"""What the latents know: behaviour and trial conditions decoded from a run's inferred rates.

    python -m src.decode results/<run>
    python -m src.decode results/<run> --lag 5 --event firstMovement_times --window -0.1 0

On a recording there are no true rates. What shows that LFADS found the dynamics is what its
rates predict about the animal, next to the same decoder on the spikes smoothed with a Gaussian
kernel (the baseline) and, on synthetic files, on the true rates (the ceiling). Three kinds of
target, each where the session file has it (docs/decoding.md says how to read the numbers):

- behaviour per bin, `{split}_behavior` (trials, T_rec, D) with `names` and `units` attributes
  (the NLB tools' layout): ridge regression from the rates of bin t to the behaviour of bin
  t + lag, fitted on the training trials, R2 on the validation trials (NLB's velocity R2);
- per-trial variables of a `trials` group indexed by `{split}_inds` (IBL's choice, stimulus
  side and feedback): logistic regression from the mean rates in a window around an event,
  balanced accuracy on the validation trials, against chance 1 / classes;
- PSTH R2 of the held-out neurons by condition (NLB's definition), where the file has
  conditions (`{split}_condition`, or IBL's stimulus side x choice).

Nothing of the validation trials is used to fit or to choose: lags, kernel widths and penalties
are chosen by cross-validation on the training trials. Only the encoder bins are decoded (the
bins the model read). Results go to the run folder: summary.json ("decoding"), decoding.csv and
decoding.png.
"""

import argparse
import inspect
import json
import os
import sys
import warnings
from dataclasses import dataclass, replace

import h5py
import numpy as np
from scipy.linalg import LinAlgWarning
from scipy.ndimage import gaussian_filter1d
from sklearn.linear_model import LogisticRegressionCV, PoissonRegressor, Ridge
from sklearn.metrics import balanced_accuracy_score, r2_score
from sklearn.model_selection import GridSearchCV, KFold, StratifiedKFold, cross_val_score
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler
from threadpoolctl import threadpool_limits

from src.data import DataError, load_session
from src.metrics import write_csv
from src.runs import run_outputs
from src.utils import FlagParser, HelpFormatter, atomic_write_text

# per-trial variables read from a `trials` group: name -> how to label a trial (NaN: left out)
TRIAL_VARIABLES = ("choice", "stim_side", "feedback")
SOURCES = ("lfads", "smoothed", "truth")  # inferred rates, baseline, ceiling


class NothingToDecode(DataError):
    """A session file without behaviour, decodable trial variables or conditions."""


@dataclass
class DecodeConfig:
    lag: int | None = 0  # bins from rates to behaviour (rates at t, behaviour at t + lag), fixed
    #                      as in NLB; None: chosen per source by CV on the training trials
    max_lag_s: float = 0.1  # seconds: the longest lag tried when lag is None (NLB MC_Maze: 0.1)
    alphas: tuple = tuple(np.logspace(-4, 4, 9))  # ridge penalties tried (NLB: 1e-4..1)
    Cs: tuple = tuple(np.logspace(-4, 2, 7))  # logistic inverse penalties tried (standardised
    #                                           features: above 100 is as good as none)
    select_alpha: float = 1.0  # the ridge penalty at which kernel widths and lags are compared
    #                            (then the penalty is chosen for the best of them)
    widths_s: tuple = (0.02, 0.04, 0.08, 0.16)  # Gaussian kernel SDs tried for the baseline
    psth_width_s: float = 0.05  # kernel SD of the spikes whose condition means are the PSTHs
    event: str = "firstMovement_times"  # trials column the per-trial window is timed from
    window: tuple = (-0.1, 0.0)  # seconds around `event`: the bins averaged per trial (the
    #                              brain-wide-map paper's choice window); files without event
    #                              times average all encoder bins
    folds: int = 5  # cross-validation folds, always over training trials only
    threads: int = 1  # BLAS threads: the many small fits run fastest on one (several
    #                   oversubscribe a shared machine: 6x slower on 2 cores)
    n_show: int = 3  # validation trials drawn in decoding.png


# -----------------------------------------------------------------------------
# what the session file holds


def _text(v) -> str:
    return v.decode() if isinstance(v, bytes) else str(v)


def has_behaviour(path: str) -> bool:
    """Whether the session file has per-bin behaviour or a trials group with decodable
    columns: src.main then decodes after training. Cheap: reads key names only."""
    with h5py.File(path, "r") as f:
        if "train_behavior" in f:
            return True
        cols = set(f["trials"]) if isinstance(f.get("trials"), h5py.Group) else set()
        return bool(cols & {"choice", "feedbackType"}) or {"contrastLeft",
                                                           "contrastRight"} <= cols


def read_behaviour(f, path: str, split: str, shape: tuple):
    """{split}_behavior (trials, T_rec, D) as float64, checked against the counts' shape."""
    key = f"{split}_behavior"
    if key not in f:
        raise DataError(f"{path}: '{key}' missing (the other split has behaviour)")
    b = f[key][()]
    if b.ndim != 3 or b.shape[:2] != shape[:2]:
        raise DataError(f"{path}: '{key}' has shape {b.shape}; expected (trials, bins, dims) "
                        f"with the {shape[0]} trials and {shape[1]} bins of '{split}_recon_data'")
    if not np.issubdtype(b.dtype, np.number):
        raise DataError(f"{path}: '{key}' is {b.dtype}; expected numbers")
    return b.astype(np.float64)


def trial_labels(trials: dict, inds: np.ndarray) -> dict:
    """Per-trial variables (trials,) in -1/+1, NaN where undefined: choice (IBL: -1 a
    rightward turn, 1 leftward; 0, no-go, left out), stim_side (-1 left, 1 right, from which
    contrast is given) and feedback (feedbackType: 1 reward, -1 error)."""
    out = {}
    pm = lambda v: np.where(np.isin(v, (-1, 1)), v, np.nan)  # noqa: E731
    if "choice" in trials:
        out["choice"] = pm(trials["choice"][inds])
    if "contrastLeft" in trials and "contrastRight" in trials:
        left, right = np.isfinite(trials["contrastLeft"][inds]), np.isfinite(
            trials["contrastRight"][inds])
        out["stim_side"] = np.where(right & ~left, 1.0, np.where(left & ~right, -1.0, np.nan))
    if "feedbackType" in trials:
        out["feedback"] = pm(trials["feedbackType"][inds])
    return out


@dataclass
class Targets:
    """What a session file holds to decode, by split."""
    behaviour: dict  # split -> (trials, T_rec, D), or {}
    names: list  # D behaviour names
    units: str  # behaviour units
    labels: dict  # split -> {variable: (trials,)}
    window: dict  # split -> (trials, T_rec) bool: the bins averaged per trial
    conditions: dict  # split -> (trials,) condition ids, or {}


def read_targets(path: str, shapes: dict, bin_size: float, cfg: DecodeConfig) -> Targets:
    with h5py.File(path, "r") as f:
        behaviour, names, units = {}, [], ""
        if "train_behavior" in f or "valid_behavior" in f:
            behaviour = {s: read_behaviour(f, path, s, shapes[s]) for s in ("train", "valid")}
            d = behaviour["train"].shape[2]
            attrs = f["train_behavior"].attrs
            names = [_text(n) for n in attrs.get("names", [f"dim_{i}" for i in range(d)])]
            units = _text(attrs.get("units", ""))
            if len(names) != d or behaviour["valid"].shape[2] != d:
                raise DataError(f"{path}: 'train_behavior' has {d} dims, 'valid_behavior' "
                                f"{behaviour['valid'].shape[2]}, its names {len(names)}")
        trials = ({k: f["trials"][k][()] for k in f["trials"]}
                  if isinstance(f.get("trials"), h5py.Group) else {})
        inds = {s: f[f"{s}_inds"][()] if f"{s}_inds" in f else np.arange(shapes[s][0])
                for s in ("train", "valid")}
        n_rows = len(next(iter(trials.values()))) if trials else None
        for s in ("train", "valid"):
            if n_rows is not None and not 0 <= inds[s].min(initial=0) <= inds[s].max(
                    initial=0) < n_rows:
                raise DataError(f"{path}: '{s}_inds' points outside the {n_rows} rows of "
                                "the 'trials' group")
        attrs = {k: f.attrs[k] for k in ("align_event", "t_before") if k in f.attrs}
        conditions = {s: f[f"{s}_condition"][()] for s in ("train", "valid")
                      if f"{s}_condition" in f}
    labels = {s: trial_labels(trials, inds[s]) for s in ("train", "valid")}
    if len(conditions) < 2:
        conditions = ibl_conditions(labels)
    window = {s: window_bins(trials, inds[s], attrs, shapes[s][1], bin_size, cfg)
              for s in ("train", "valid")}
    return Targets(behaviour, names, units, labels, window, conditions)


def ibl_conditions(labels: dict) -> dict:
    """Stimulus side x choice (4 conditions) where both are known, else {}: -1 marks a trial
    with either missing."""
    if not all({"stim_side", "choice"} <= set(v) for v in labels.values()):
        return {}
    out = {}
    for s, v in labels.items():
        ok = np.isfinite(v["stim_side"]) & np.isfinite(v["choice"])
        code = (v["stim_side"] > 0) * 2 + (v["choice"] > 0)
        out[s] = np.where(ok, code, -1)
    return out


def window_bins(trials: dict, inds, attrs: dict, n_bins: int, bin_size: float,
                cfg: DecodeConfig) -> np.ndarray:
    """(trials, T) bool: the bins whose centre lies in cfg.window seconds around each trial's
    cfg.event; every bin when the file has no such event times. Event times are session times
    when the file says what its bins are aligned to (IBL: attributes align_event, t_before),
    else seconds from the start of the trial's first bin (synthetic files)."""
    if cfg.event not in trials:
        return np.ones((len(inds), n_bins), dtype=bool)
    align = _text(attrs.get("align_event", ""))
    rel = trials[cfg.event][inds]  # (trials,) seconds after the trial's first bin starts
    t0 = 0.0
    if align in trials and "t_before" in attrs:
        rel, t0 = rel - trials[align][inds], float(attrs["t_before"])
    centre = (np.arange(n_bins) + 0.5) * bin_size - t0  # (T,) s
    lo, hi = rel[:, None] + cfg.window[0], rel[:, None] + cfg.window[1]
    return (centre >= lo) & (centre < hi)  # NaN event times give no bins


# -----------------------------------------------------------------------------
# sources: inferred rates, smoothed spikes, true rates


def smooth(counts: np.ndarray, sd_s: float, bin_size: float) -> np.ndarray:
    """Spikes (trials, T, N) smoothed over time with a Gaussian kernel of SD sd_s seconds."""
    return gaussian_filter1d(np.asarray(counts, np.float64), sd_s / bin_size, axis=1,
                             mode="nearest")


def read_rates(run_dir: str, name: str, shapes: dict) -> dict:
    path = os.path.join(run_dir, name)
    if not os.path.isfile(path):
        raise DataError(f"{path}: no such file (train first: python -m src.main)")
    out = {}
    with h5py.File(path, "r") as f:
        for s in ("train", "valid"):
            if f"{s}_rates" not in f:
                raise DataError(f"{path}: '{s}_rates' missing")
            r = f[f"{s}_rates"][()]
            if r.shape != shapes[s]:
                raise DataError(f"{path}: '{s}_rates' has shape {r.shape}, the session's "
                                f"'{s}_recon_data' {shapes[s]}: another session's run?")
            out[s] = r.astype(np.float64)
    return out


# -----------------------------------------------------------------------------
# per-bin behaviour: ridge with a lag (NLB)


def lagged(x: np.ndarray, y: np.ndarray, lag: int, max_lag: int) -> tuple:
    """Rates at bin t with behaviour at t + lag, for t + lag in [max_lag, T): every lag scores
    the same behaviour bins. x (trials, T, N), y (trials, T, D) -> (samples, N), (samples, D),
    samples with NaN behaviour dropped (NLB's masked bins)."""
    t = x.shape[1]
    xs = x[:, max_lag - lag:t - lag].reshape(-1, x.shape[2])  # (trials*(T-max_lag), N)
    ys = y[:, max_lag:].reshape(-1, y.shape[2])  # (trials*(T-max_lag), D)
    ok = ~np.isnan(ys).any(1)
    return xs[ok], ys[ok]


def fit_ridge(x, y, alphas, folds: int) -> GridSearchCV:
    """NLB's decoder: ridge with its penalty chosen by K-fold CV (scikit-learn's R2, the mean
    over dimensions) over the samples of the training trials in order (so folds are blocks of
    whole trials, but for the ones cut at a fold's edge)."""
    with warnings.catch_warnings():
        # collinear rates make the smallest penalties' systems ill-conditioned; CV then
        # prefers a larger one, so the warning says nothing about the result
        warnings.simplefilter("ignore", LinAlgWarning)
        return GridSearchCV(Ridge(), {"alpha": list(alphas)}, cv=KFold(folds)).fit(x, y)


def ridge_cv_score(x, y, alpha: float, folds: int) -> float:
    """The K-fold CV score (as fit_ridge's) of ridge at one penalty: to compare inputs."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", LinAlgWarning)  # as in fit_ridge
        return float(cross_val_score(Ridge(alpha=alpha), x, y, cv=KFold(folds)).mean())


def ridge_scores(y, pred) -> dict:
    """Variance-weighted R2 (pooled over dimensions: not swung by one poorly predicted
    dimension), and the mean over dimensions, NLB's `vel R2`."""
    return {"r2": float(r2_score(y, pred, multioutput="variance_weighted")),
            "r2_uniform": float(r2_score(y, pred))}


def decode_behaviour(train_x: dict, valid_x: dict, train_y, valid_y, lags, cfg) -> dict:
    """Ridge from the best candidate input (name -> (trials, T, N), e.g. one per kernel width)
    at the best lag, by CV on the training trials at cfg.select_alpha, then with its penalty
    chosen by CV; scored on the validation trials. Returns the scores, what was chosen, the
    fitted model and the validation trials' inputs."""
    max_lag = max(lags)
    pairs = [(key, lag) for key in train_x for lag in lags]
    if len(pairs) > 1:
        scores = [ridge_cv_score(*lagged(train_x[k], train_y, lag, max_lag), cfg.select_alpha,
                                 cfg.folds) for k, lag in pairs]
        pairs = [pairs[int(np.argmax(scores))]]
    key, lag = pairs[0]
    gs = fit_ridge(*lagged(train_x[key], train_y, lag, max_lag), cfg.alphas, cfg.folds)
    xv, yv = lagged(valid_x[key], valid_y, lag, max_lag)
    pred = gs.predict(xv)
    x_trials = valid_x[key][:, max_lag - lag:valid_x[key].shape[1] - lag]  # (trials, T', N)
    return {**ridge_scores(yv, pred), "lag_bins": lag, "alpha": gs.best_params_["alpha"],
            "key": key, "model": gs.best_estimator_, "x_trials": x_trials}


# -----------------------------------------------------------------------------
# per-trial variables: logistic regression on a window's mean rates


def window_mean(x: np.ndarray, bins: np.ndarray) -> np.ndarray:
    """Mean of x (trials, T, N) over each trial's window bins (trials, T) -> (trials, N); NaN
    for a trial whose window holds no bin."""
    n = bins.sum(1, keepdims=True)  # (trials, 1)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.einsum("btn,bt->bn", x, bins.astype(x.dtype)) / n


def _logistic_kwargs() -> dict:
    """L2 penalty and the simplified attributes where scikit-learn has them (1.8 on), so that
    it warns about neither; older versions have L2 and the legacy attributes as defaults."""
    params = inspect.signature(LogisticRegressionCV).parameters
    return ({"l1_ratios": (0.0,), "use_legacy_attributes": False}
            if "use_legacy_attributes" in params else {})


def fit_logistic(x, y, Cs, folds: int):
    """Standardised features, then logistic regression with its C chosen by stratified K-fold
    CV on balanced accuracy; returns the pipeline and its best CV score."""
    clf = LogisticRegressionCV(Cs=list(Cs), cv=StratifiedKFold(folds), scoring="balanced_accuracy",
                               max_iter=2000, **_logistic_kwargs())
    pipe = make_pipeline(StandardScaler(), clf).fit(x, y)
    scores = clf.scores_ if isinstance(clf.scores_, np.ndarray) else next(
        iter(clf.scores_.values()))
    return pipe, float(scores.reshape(folds, -1).mean(0).max())


def decode_variable(train_x: dict, valid_x: dict, train_y, valid_y, cfg) -> dict | None:
    """Logistic regression from each candidate input's window means (trials, N); the one with
    the best CV score is scored on the validation trials. None when some class has fewer
    training trials than folds."""
    classes, n = np.unique(train_y[np.isfinite(train_y)], return_counts=True)
    if len(classes) < 2 or n.min() < cfg.folds or np.isfinite(valid_y).sum() == 0:
        return None
    best = None
    for key, x in train_x.items():
        ok = np.isfinite(train_y) & np.isfinite(x).all(1)
        pipe, score = fit_logistic(x[ok], train_y[ok], cfg.Cs, cfg.folds)
        if best is None or score > best[0]:
            best = (score, key, pipe)
    _, key, pipe = best
    ok = np.isfinite(valid_y) & np.isfinite(valid_x[key]).all(1)
    pred = pipe.predict(valid_x[key][ok])
    clf = pipe[-1]
    return {"balanced_accuracy": float(balanced_accuracy_score(valid_y[ok], pred)),
            "chance": 1.0 / len(classes), "C": float(np.ravel(clf.C_)[0]), "key": key,
            "n_train": int(np.isfinite(train_y).sum()), "n_valid": int(ok.sum()),
            "model": pipe}


# -----------------------------------------------------------------------------
# PSTH R2 of the held-out neurons (NLB)


def condition_psths(x: np.ndarray, cond: np.ndarray, ids) -> np.ndarray:
    """Mean of x (trials, T, N) over the trials of each condition in ids -> (C, T, N)."""
    return np.stack([x[cond == c].mean(0) for c in ids])


def psth_r2(target: np.ndarray, pred: np.ndarray) -> float:
    """NLB's PSTH R2: scikit-learn's R2 of the predicted against the target PSTHs (C, T, N),
    conditions and bins stacked, averaged over neurons."""
    n = target.shape[2]
    return float(r2_score(target.reshape(-1, n), pred.reshape(-1, n)))


def smoothing_baseline(train_in, valid_in, train_out, cfg, bin_size) -> tuple:
    """NLB's smoothing baseline for held-out neurons: held-in spikes smoothed, then a Poisson
    GLM per held-out neuron. The kernel width is the one whose smoothed spikes predict the
    held-out counts best linearly (ridge at cfg.select_alpha, CV on the training trials): a
    multi-output fit per width and fold instead of a GLM per neuron, width and fold. Inputs
    (trials, T, N_in) and (trials, T, N_out) counts -> the validation trials' rates (trials, T,
    N_out) and the width."""
    y = train_out.reshape(-1, train_out.shape[2])  # (trials*T, N_out)
    n_in = train_in.shape[2]
    scores = [ridge_cv_score(smooth(train_in, w, bin_size).reshape(-1, n_in), y,
                             cfg.select_alpha, cfg.folds) for w in cfg.widths_s]
    w = cfg.widths_s[int(np.argmax(scores))]
    glm = lambda: make_pipeline(StandardScaler(), PoissonRegressor(alpha=1e-3, max_iter=300))  # noqa: E731
    x = smooth(train_in, w, bin_size).reshape(-1, train_in.shape[2])
    xv = smooth(valid_in, w, bin_size).reshape(-1, valid_in.shape[2])
    # a neuron silent in every training bin is predicted silent (a GLM would need log 0)
    pred = np.stack([glm().fit(x, y[:, j]).predict(xv) if y[:, j].any() else
                     np.zeros(len(xv)) for j in range(y.shape[1])], -1)
    return pred.reshape(valid_in.shape[:2] + (y.shape[1],)), w


# -----------------------------------------------------------------------------
# one session


def decode_session(session, rates: dict, targets: Targets, cfg: DecodeConfig) -> tuple:
    """Every decoder on every source of one session: ({target: {source: scores}}, extras for
    the figure)."""
    t_enc, n_in = session.train.encod.shape[1:]
    counts = {s: getattr(session, s).recon.numpy()[:, :t_enc].astype(np.float64)
              for s in ("train", "valid")}
    fixed = {"lfads": {s: rates[s][:, :t_enc] for s in rates}}
    if session.train.truth is not None:
        fixed["truth"] = {s: getattr(session, s).truth[:, :t_enc] for s in ("train", "valid")}
    widths = {f"{w:g}": {s: smooth(counts[s], w, session.bin_size) for s in counts}
              for w in cfg.widths_s}
    inputs = {"lfads": {"x": fixed["lfads"]}, "smoothed": widths,
              **({"truth": {"x": fixed["truth"]}} if "truth" in fixed else {})}
    out, extras = {}, {}
    if targets.behaviour:
        out["behavior"], extras["behavior"] = behaviour_scores(inputs, targets, t_enc, cfg,
                                                               session.bin_size)
    for var in TRIAL_VARIABLES:
        if var in targets.labels["train"]:
            res = variable_scores(inputs, targets, var, t_enc, cfg)
            if res:
                out[var] = res
    if targets.conditions and counts["train"].shape[2] > n_in:
        out["psth"] = psth_scores(fixed, counts, targets.conditions, n_in, cfg,
                                  session.bin_size)
    return out, extras


def behaviour_scores(inputs: dict, targets: Targets, t_enc: int, cfg, bin_size) -> tuple:
    max_lag = int(round(cfg.max_lag_s / bin_size))
    lags = [cfg.lag] if cfg.lag is not None else list(range(max_lag + 1))
    if max(lags) >= t_enc:
        raise DataError(f"--lag {max(lags)} bins: the trials have only {t_enc} encoder bins")
    y = {s: targets.behaviour[s][:, :t_enc] for s in ("train", "valid")}
    res, extras = {"names": targets.names, "units": targets.units}, {}
    for src, cands in inputs.items():
        r = decode_behaviour({k: v["train"] for k, v in cands.items()},
                             {k: v["valid"] for k, v in cands.items()}, y["train"], y["valid"],
                             lags, cfg)
        extras[src] = r
        res[src] = {k: r[k] for k in ("r2", "r2_uniform", "lag_bins", "alpha")}
        if src == "smoothed":
            res[src]["kernel_sd_s"] = float(r["key"])
    extras["actual"] = y["valid"][:, max(lags):]
    return res, extras


def variable_scores(inputs: dict, targets: Targets, var: str, t_enc: int, cfg) -> dict:
    res = {}
    win = {s: targets.window[s][:, :t_enc] for s in ("train", "valid")}
    for src, cands in inputs.items():
        feats = {s: {k: window_mean(v[s], win[s]) for k, v in cands.items()}
                 for s in ("train", "valid")}
        r = decode_variable(feats["train"], feats["valid"], targets.labels["train"][var],
                            targets.labels["valid"][var], cfg)
        if r is None:
            return {}
        res["chance"], res["n_train"], res["n_valid"] = r["chance"], r["n_train"], r["n_valid"]
        res[src] = {"balanced_accuracy": r["balanced_accuracy"], "C": r["C"]}
        if src == "smoothed":
            res[src]["kernel_sd_s"] = float(r["key"])
    res["window"] = {"event": cfg.event, "start_s": cfg.window[0], "end_s": cfg.window[1]}
    return res


def psth_scores(fixed: dict, counts: dict, conditions: dict, n_in: int, cfg, bin_size) -> dict:
    """PSTH R2 of the held-out neurons: the target is the condition means of their smoothed
    spikes over all trials (NLB), the prediction the condition means over validation trials."""
    ids = [c for c in np.unique(conditions["valid"]) if c >= 0]  # -1: condition unknown
    both = np.concatenate([counts["train"], counts["valid"]])[:, :, n_in:]
    cond = np.concatenate([conditions["train"], conditions["valid"]])
    target = condition_psths(smooth(both, cfg.psth_width_s, bin_size), cond, ids)
    cv = conditions["valid"]
    res = {"n_conditions": len(ids), "kernel_sd_s": cfg.psth_width_s}
    for src, x in fixed.items():
        res[src] = {"r2": psth_r2(target, condition_psths(x["valid"][:, :, n_in:], cv, ids))}
    pred, w = smoothing_baseline(counts["train"][:, :, :n_in], counts["valid"][:, :, :n_in],
                                 counts["train"][:, :, n_in:], cfg, bin_size)
    res["smoothed"] = {"r2": psth_r2(target, condition_psths(pred, cv, ids)), "kernel_sd_s": w}
    return res


# -----------------------------------------------------------------------------
# the run folder


def decode_file(run_dir: str, data_path: str, output: str, cfg: DecodeConfig) -> tuple:
    session = load_session(data_path)
    shapes = {s: tuple(getattr(session, s).recon.shape) for s in ("train", "valid")}
    targets = read_targets(data_path, shapes, session.bin_size, cfg)
    if not (targets.behaviour or targets.conditions or any(targets.labels["train"].values())):
        raise NothingToDecode(f"{data_path}: nothing to decode: no 'train_behavior', no "
                              "'trials' group with choice, contrastLeft/contrastRight or "
                              "feedbackType, and no 'train_condition'")
    rates = read_rates(run_dir, output, shapes)
    return decode_session(session, rates, targets, cfg)


def decode_run(run_dir: str, cfg: DecodeConfig | None = None, plots: bool = True,
               **overrides) -> dict:
    """Decode every session of a run folder; write summary.json's "decoding", decoding.csv and
    decoding.png; return the decoding results ({target: {source: scores}}, or one such dict
    per session name for a stitched run). Keyword overrides set DecodeConfig fields."""
    cfg = replace(cfg or DecodeConfig(), **overrides)
    pairs = run_outputs(run_dir)
    each, extras = {}, {}
    with threadpool_limits(cfg.threads):
        for data_path, output in pairs:
            name = os.path.splitext(os.path.basename(data_path))[0]
            try:
                each[name], extras[name] = decode_file(run_dir, data_path, output, cfg)
            except NothingToDecode:
                if len(pairs) == 1:
                    raise  # a stitched run decodes the sessions that have something
    if not each:
        raise NothingToDecode(f"{run_dir}: none of its {len(pairs)} sessions has anything to "
                              "decode (behaviour, trial variables or conditions)")
    result = each[name] if len(pairs) == 1 else each
    update_summary(run_dir, result)
    write_csv(os.path.join(run_dir, "decoding.csv"),
              [r for n, res in each.items() for r in csv_rows(n, res)])
    if plots:
        figure(os.path.join(run_dir, "decoding.png"), each, extras, cfg.n_show)
    return result


def update_summary(run_dir: str, result: dict) -> None:
    """summary.json with "decoding" set, the rest as it was (read, modify, atomic write)."""
    path = os.path.join(run_dir, "summary.json")
    summary = {}
    if os.path.isfile(path):
        with open(path) as f:
            summary = json.load(f)
    summary["decoding"] = result
    atomic_write_text(path, json.dumps(summary, indent=2) + "\n")


def csv_rows(session: str, res: dict) -> list:
    """One row per target and source: the score, its chance level, and what was chosen."""
    rows = []
    for target, by_src in res.items():
        metric = {"behavior": "r2", "psth": "r2"}.get(target, "balanced_accuracy")
        for src in SOURCES:
            if src not in by_src:
                continue
            s = by_src[src]
            rows.append({"session": session, "target": target, "source": src, "metric": metric,
                         "value": s[metric], "chance": by_src.get("chance", ""),
                         "r2_uniform": s.get("r2_uniform", ""), "lag_bins": s.get("lag_bins", ""),
                         "penalty": s.get("alpha", s.get("C", "")),
                         "kernel_sd_s": s.get("kernel_sd_s", ""),
                         "n_valid": by_src.get("n_valid", "")})
    return rows


# -----------------------------------------------------------------------------
# the figure


def figure(path: str, each: dict, extras: dict, n_show: int) -> None:
    """Decoded against actual behaviour on a few validation trials (one row per session with
    behaviour), and every score by source with chance marked."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(each)
    fig, axes = plt.subplots(len(names), 2, figsize=(13, 3.6 * len(names)), squeeze=False,
                             gridspec_kw={"width_ratios": [3, 2]})
    for row, name in zip(axes, names):
        draw_traces(row[0], each[name], extras[name], n_show)
        draw_scores(row[1], each[name])
        if len(names) > 1:
            row[0].set_title(name, loc="left", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def draw_traces(ax, res: dict, extras: dict, n_show: int) -> None:
    if "behavior" not in extras:
        ax.axis("off")
        ax.text(0.5, 0.5, "no per-bin behaviour in this file", ha="center", va="center")
        return
    ex, b = extras["behavior"], res["behavior"]
    actual = ex["actual"][:n_show, :, 0]  # (trials, bins) of the first dimension
    gap = np.full((actual.shape[0], 3), np.nan)  # a gap between trials
    flat = lambda a: np.concatenate([a, gap], 1).ravel()  # noqa: E731
    ax.plot(flat(actual), c="k", lw=1.5, label="actual")
    for i, src in enumerate(SOURCES):
        if src in ex:
            x = ex[src]["x_trials"][:n_show]  # (trials, bins, N)
            pred = ex[src]["model"].predict(x.reshape(-1, x.shape[2])).reshape(*x.shape[:2], -1)
            ax.plot(flat(pred[:, :, 0]), c=f"C{i}", lw=1, label=f"{src} (R2 {b[src]['r2']:.2f})")
    unit = f" ({b['units']})" if b["units"] else ""
    ax.set(xlabel=f"bin ({n_show} validation trials)", ylabel=f"{b['names'][0]}{unit}",
           title="decoded behaviour, validation trials")
    ax.legend(fontsize=8, loc="upper right")


def draw_scores(ax, res: dict) -> None:
    targets = list(res)
    width = 0.8 / len(SOURCES)
    for i, src in enumerate(SOURCES):
        vals = [res[t][src].get("r2", res[t][src].get("balanced_accuracy"))
                if src in res[t] else np.nan for t in targets]
        ax.bar(np.arange(len(targets)) + (i - 1) * width, vals, width, label=src, color=f"C{i}")
    for j, t in enumerate(targets):
        if "chance" in res[t]:
            ax.hlines(res[t]["chance"], j - 0.45, j + 0.45, colors="k", linestyles="--", lw=1)
    labels = [f"{t}\n{'R2' if t in ('behavior', 'psth') else 'bal. acc.'}" for t in targets]
    ax.set_xticks(np.arange(len(targets)), labels, fontsize=8)
    ax.set(ylim=(min(0, ax.get_ylim()[0]), 1), title="validation scores (dashed: chance)")
    ax.legend(fontsize=8)


# -----------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    d = DecodeConfig()
    p = FlagParser(prog="python -m src.decode", description=__doc__,
                                formatter_class=HelpFormatter)
    p.add_argument("run_dir", help="a run folder of src.main (results/<run>)")
    p.add_argument("--lag", default=str(d.lag), help="bins from the rates to the behaviour "
                   "they predict (rates at t, behaviour at t + lag), or 'auto': chosen by CV on "
                   f"the training trials among 0..{d.max_lag_s:g} s, slower (default: "
                   "%(default)s)")
    p.add_argument("--event", default=d.event, help="trials column the per-trial window is "
                   "timed from (default: %(default)s)")
    p.add_argument("--window", nargs=2, type=float, metavar=("START", "END"),
                   default=list(d.window), help="seconds around --event whose bins are "
                   "averaged for per-trial decoding (default: %(default)s)")
    p.add_argument("--folds", type=int, default=d.folds, help="CV folds (default: %(default)s)")
    p.add_argument("--no-plots", action="store_true", help="skip decoding.png")
    return p


def main(argv=None) -> int:
    a = build_parser().parse_args(argv)
    if a.window[0] >= a.window[1]:
        print(f"error: --window {a.window[0]:g} {a.window[1]:g}: START must be < END",
              file=sys.stderr)
        return 2
    lag = None if a.lag == "auto" else int(a.lag) if a.lag.isdigit() else -1
    if lag is not None and lag < 0 or a.folds < 2:
        print(f"error: --lag {a.lag}: a number of bins >= 0 or 'auto'; --folds {a.folds}: "
              "at least 2", file=sys.stderr)
        return 2
    cfg = DecodeConfig(lag=lag, event=a.event, window=tuple(a.window), folds=a.folds)
    try:
        result = decode_run(a.run_dir, cfg, plots=not a.no_plots)
    except (DataError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(report(result))
    return 0


def report(result: dict) -> str:
    """The scores as lines: target, then each source's score (and chance)."""
    single = bool(set(result) & {"behavior", "psth", *TRIAL_VARIABLES})  # else: by session
    lines = []
    for name, res in ({"": result} if single else result).items():
        for target, by_src in res.items():
            metric = "r2" if target in ("behavior", "psth") else "balanced_accuracy"
            parts = [f"{s} {by_src[s][metric]:.3f}" for s in SOURCES if s in by_src]
            chance = f" (chance {by_src['chance']:.2f})" if "chance" in by_src else ""
            lines.append(f"{name + ' ' if name else ''}{target} {metric}: " + ", ".join(parts)
                         + chance)
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
