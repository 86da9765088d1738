"""Inference: a split's loss terms and metrics, outputs averaged over posterior samples, and
lfads_output.h5."""

import h5py
import numpy as np
import torch

from src.metrics import rate_metrics
from src.utils import atomic_path, autocast

# Output name -> attribute of src.model.Output; the keys of lfads_output.h5
# (docs/design.md, The run folder)
FIELDS = {"rates": "log_rates", "factors": "factors", "gen_states": "gen_states",
          "co_means": "co_mean", "ic_mean": "ic_mean", "ic_std": "ic_std"}


@torch.no_grad()
def evaluate(model, split, device, precision: str = "fp32", sv=None, session: int = 0,
             batch_size: int = 512) -> dict:
    """Loss terms at one posterior sample (an honest ELBO estimate) and metrics of the
    rates at the posterior means, over a whole split. sv: the split's sample-validation
    mask, (trials, T_enc, N_in) bool or None; it hides elements from the encoders for the
    loss terms (recon_sv needs that), while the rates read the whole encoder input, as
    those of lfads_output.h5 and summary.json do."""
    model.eval()
    totals, rates = {}, []
    for i in range(0, len(split), batch_size):
        enc = split.encod[i : i + batch_size].to(device)
        rec = split.recon[i : i + batch_size].to(device)
        ext = None if split.ext is None else split.ext[i : i + batch_size].to(device)
        m = None if sv is None else sv[i : i + batch_size].to(device)
        with autocast(device, precision):
            losses = model(enc, rec, ext, sample=True, sv_mask=m, session=session).losses
            out = model(enc, ext=ext, sample=False, session=session)
        for k, v in losses.items():
            totals[k] = totals.get(k, 0.0) + v.item() * len(enc)
        rates.append(torch.exp(out.log_rates).cpu().numpy())
    m = {k: v / len(split) for k, v in totals.items()}
    m.update(rate_metrics(np.concatenate(rates), split))
    return m


@torch.no_grad()
def posterior_average(model, encod, ext=None, n_samples: int = 50, batch_size: int = 256,
                      device="cpu", precision: str = "fp32", session: int = 0) -> dict:
    """Average every output over `n_samples` posterior samples (0: use posterior means).

    lfads-torch averages 50 samples; the mean of sampled rates differs from the rate of the
    mean path because the map to rates is non-linear. Works batch by batch, so memory stays
    flat however many trials the split has. Returns numpy arrays, rates as counts per bin.
    session: which read-in and read-out of a stitched model (src/stitch.py)."""
    model.eval()
    sums = {k: [] for k in FIELDS}
    for i in range(0, len(encod), batch_size):
        x = encod[i : i + batch_size].to(device)
        e = None if ext is None else ext[i : i + batch_size].to(device)
        acc = {}
        for _ in range(max(n_samples, 1)):
            with autocast(device, precision):
                out = model(x, ext=e, sample=n_samples > 0, session=session)
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
