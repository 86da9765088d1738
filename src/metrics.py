"""How good are the rates? Bits per spike (NLB) and R2 against ground truth.

All functions take numpy arrays of shape (trials, T, N): `rates` are expected counts per bin.
"""

import csv
import io

import numpy as np

from src.utils import atomic_write_text


def poisson_ll(counts, rates):
    """Poisson log-likelihood summed over all elements, without the log k! term (it cancels
    in every difference we take). 0 * log 0 counts as 0, so a zero rate is allowed where the
    count is zero."""
    counts, rates = np.asarray(counts, np.float64), np.asarray(rates, np.float64)
    with np.errstate(divide="ignore", invalid="ignore"):
        k_log_r = np.where(counts > 0, counts * np.log(rates), 0.0)
    return float(k_log_r.sum() - rates.sum())


def bits_per_spike(rates, counts):
    """(LL_model - LL_null) / (spikes * ln 2), the null model being each neuron's mean count
    over all trials and bins evaluated (the NLB definition, Pei et al. 2021)."""
    counts = np.asarray(counts, np.float64)
    n_spikes = counts.sum()
    if n_spikes == 0:
        return float("nan")
    null = np.broadcast_to(counts.mean(axis=(0, 1), keepdims=True), counts.shape)
    return (poisson_ll(counts, rates) - poisson_ll(counts, null)) / (n_spikes * np.log(2))


def region_bps(rates, counts, n_in: int, t_enc: int) -> dict:
    """bps: held-in neurons over encoder bins; co_bps: held-out neurons over encoder bins;
    fp_bps: every neuron over the forward-prediction bins. Absent regions are left out."""
    out = {"bps": bits_per_spike(rates[:, :t_enc, :n_in], counts[:, :t_enc, :n_in])}
    if counts.shape[2] > n_in:
        out["co_bps"] = bits_per_spike(rates[:, :t_enc, n_in:], counts[:, :t_enc, n_in:])
    if counts.shape[1] > t_enc:
        out["fp_bps"] = bits_per_spike(rates[:, t_enc:], counts[:, t_enc:])
    return out


def r2(pred, truth) -> tuple[float, float]:
    """R2 of predicted against true rates, per neuron over trials x bins.

    Returns (mean over neurons, pooled). The mean is lfads-torch's definition; the pooled
    value, 1 - total squared error / total variance, is not swung by a nearly untuned neuron.
    A neuron whose true rate never varies has no variance to explain: it scores 1 when
    predicted exactly and 0 otherwise (scikit-learn's r2_score convention), never a division
    by zero; the pooled value follows the same rule when no neuron varies.
    """
    pred = np.asarray(pred, np.float64).reshape(-1, pred.shape[-1])  # (trials*T, N)
    truth = np.asarray(truth, np.float64).reshape(-1, truth.shape[-1])
    sse = ((pred - truth) ** 2).sum(0)  # (N,)
    sst = ((truth - truth.mean(0)) ** 2).sum(0)  # (N,)
    return float(np.mean(_explained(sse, sst))), float(_explained(sse.sum(), sst.sum()))


def _explained(sse, sst):
    """1 - sse / sst, and where sst is 0: 1 if sse is 0, else 0."""
    sse, sst = np.asarray(sse), np.asarray(sst)
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.where(sst > 0, 1 - sse / sst, np.where(sse == 0, 1.0, 0.0))


LOSS_TERMS = ("recon", "recon_heldin", "recon_sv", "kl_ic", "kl_co", "l2")  # nats per trial


def rate_metrics(rates, split) -> dict:
    """Bits per spike by region and, with ground truth, R2 of rates (all and held-out) of a
    split (src.data.Split). The region sizes come from the split: stitched sessions differ."""
    n_in, t_enc = split.encod.shape[2], split.encod.shape[1]
    m = region_bps(rates, split.recon.numpy(), n_in, t_enc)
    if split.truth is not None:
        m["r2"], m["r2_pooled"] = r2(rates, split.truth)
        if split.truth.shape[2] > n_in:
            m["r2_heldout"], _ = r2(rates[..., n_in:], split.truth[..., n_in:])
    return m


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


def write_csv(path: str, rows: list[dict]) -> None:
    """Rows of metrics as a CSV file, atomically; a column for every key of any row."""
    keys = list(dict.fromkeys(k for r in rows for k in r))
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=keys)
    w.writeheader()
    w.writerows(rows)
    atomic_write_text(path, buf.getvalue())
