"""How good are the rates? Bits per spike (NLB) and R2 against ground truth; the model run
over a split: validation during training, posterior averages and lfads_output.h5 after it.

The metrics take numpy arrays of shape (trials, T, N): `rates` are expected counts per bin.
"""

import csv
import io

import h5py
import numpy as np
import torch

from src.utils import atomic_path, atomic_write_text, autocast


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


def write_csv(path: str, rows: list[dict]) -> None:
    """Rows of metrics as a CSV file, atomically; a column for every key of any row."""
    keys = list(dict.fromkeys(k for r in rows for k in r))
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=keys)
    w.writeheader()
    w.writerows(rows)
    atomic_write_text(path, buf.getvalue())


# -----------------------------------------------------------------------------
# the model over a split

# lfads_output.h5's names -> src.model.Output's attributes (docs/design.md, The run folder)
FIELDS = {"rates": "log_rates", "factors": "factors", "gen_states": "gen_states",
          "co_means": "co_mean", "ic_mean": "ic_mean", "ic_std": "ic_std"}


@torch.no_grad()
def evaluate(model, split, device, precision: str = "fp32", sv=None, batch_size: int = 512,
             **kw) -> dict:
    """Validation: loss terms at one posterior sample (an honest ELBO estimate) and metrics of
    the rates at the posterior means, over a whole split. sv: the split's sample-validation
    mask, (trials, T_enc, N_in) bool or None, hidden from the encoders for the loss terms
    only. kw: a stitched model's session (src/stitch.py)."""
    model.eval()
    totals, rates = {}, []
    for i in range(0, len(split), batch_size):
        enc = split.encod[i : i + batch_size].to(device)
        rec = split.recon[i : i + batch_size].to(device)
        ext = None if split.ext is None else split.ext[i : i + batch_size].to(device)
        m = None if sv is None else sv[i : i + batch_size].to(device)
        with autocast(device, precision):
            losses = model(enc, rec, ext, sample=True, sv_mask=m, **kw).losses
            out = model(enc, ext=ext, sample=False, **kw)
        for k, v in losses.items():
            totals[k] = totals.get(k, 0.0) + v.item() * len(enc)
        rates.append(torch.exp(out.log_rates).cpu().numpy())
    m = {k: v / len(split) for k, v in totals.items()}
    m.update(rate_metrics(np.concatenate(rates), split))
    return m


@torch.no_grad()
def posterior_average(model, encod, ext=None, n_samples: int = 50, batch_size: int = 256,
                      device="cpu", precision: str = "fp32", **kw) -> dict:
    """Average every output over `n_samples` posterior samples (0: use posterior means).

    lfads-torch averages 50 samples; the mean of sampled rates differs from the rate of the
    mean path because the map to rates is non-linear. Works batch by batch, so memory stays
    flat however many trials the split has. Returns numpy arrays, rates as counts per bin."""
    model.eval()
    sums = {k: [] for k in FIELDS}
    for i in range(0, len(encod), batch_size):
        x = encod[i : i + batch_size].to(device)
        e = None if ext is None else ext[i : i + batch_size].to(device)
        acc = {}
        for _ in range(max(n_samples, 1)):
            with autocast(device, precision):
                out = model(x, ext=e, sample=n_samples > 0, **kw)
            for key, attr in FIELDS.items():
                v = getattr(out, attr)
                if v is None:
                    continue
                v = torch.exp(v) if key == "rates" else v
                acc[key] = acc.get(key, 0) + v
        for key, v in acc.items():
            sums[key].append((v / max(n_samples, 1)).cpu().numpy())
    return {k: np.concatenate(v) for k, v in sums.items() if v}


def write_outputs(path: str, outputs: dict, n_samples: int) -> None:
    """outputs: {split: {field: array}} -> keys '{split}_{field}', written atomically."""
    with atomic_path(path) as tmp, h5py.File(tmp, "w") as f:
        for split, fields in outputs.items():
            for key, value in fields.items():
                f.create_dataset(f"{split}_{key}", data=value.astype(np.float32),
                                 compression="gzip")
        f.attrs["averaging"] = "posterior_samples" if n_samples > 0 else "posterior_mean"
        f.attrs["n_samples"] = n_samples
        f.attrs["rates_unit"] = "expected spike count per bin"
