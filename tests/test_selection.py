"""Model selection and early stopping never see what the summary reports.

The best checkpoint and early stopping follow the held-in neurons over the encoder bins of the
validation trials (or the sample-validation cost): scrambling the held-out neurons and the
forward-prediction bins of the validation trials, which co-bps, fp-bps and R2 score, must
change neither which checkpoint is chosen nor when training stops.
"""

import csv
import os

import numpy as np
import torch

from src.main import main
from src.model import LFADSConfig
from src.trainer import selection_key
from tests.conftest import TINY_MODEL
from tests.test_data import arr, rewrite

TRAIN = ["--max_steps", "90", "--eval_every", "3", "--patience", "3", "--kl_epochs", "3",
         "--l2_epochs", "3", "--lr", "0.01", "--lr_patience", "1", "--no-plots"]


def scrambled(h5):
    """The file with its validation trials' held-out columns permuted among themselves and
    their forward-prediction bins moved to other trials, both with 5 times the counts (so
    that a selection that read them would choose otherwise); truth scrambled alike."""
    rng = np.random.default_rng(0)
    n_in, t_enc = arr(h5, "valid_encod_data").shape[2], arr(h5, "valid_encod_data").shape[1]
    rec, truth = arr(h5, "valid_recon_data"), arr(h5, "valid_truth")
    cols = n_in + rng.permutation(rec.shape[2] - n_in)
    trials = rng.permutation(len(rec))
    for a in (rec, truth):
        a[:, :, n_in:] = 5 * a[:, :, cols]
        a[:, t_enc:] = 5 * a[trials, t_enc:]
    return rewrite(h5, valid_recon_data=rec, valid_truth=truth)


def train(h5, results, *extra):
    assert main(["--data", str(h5), "--results-dir", str(results), "--run", "r",
                 *TINY_MODEL, *TRAIN, *extra]) == 0
    with open(os.path.join(results, "r", "metrics.csv")) as f:
        rows = list(csv.DictReader(f))
    best = torch.load(results / "r" / "ckpt_best.pt", weights_only=False)["loop"]["step"]
    return rows, best


def test_scrambled_held_out_data_change_neither_the_best_checkpoint_nor_the_stop(
        tiny_h5, tmp_path):
    rows, best = train(tiny_h5, tmp_path / "a")
    rows2, best2 = train(scrambled(tiny_h5), tmp_path / "b")
    assert [r["step"] for r in rows] == [r["step"] for r in rows2]
    assert int(rows[-1]["step"]) < 90  # stopped early, by patience
    assert best == best2
    for a, b in zip(rows, rows2):
        assert a["valid_recon_heldin"] == b["valid_recon_heldin"]
        assert a["valid_recon"] != b["valid_recon"]  # what is reported did change
        assert a["valid_co_bps"] != b["valid_co_bps"]


def test_sample_validation_selects_on_its_own_cost(tiny_h5, tmp_path):
    assert selection_key(LFADSConfig()) == "recon_heldin"
    assert selection_key(LFADSConfig(sv_rate=0.1)) == "recon_sv"
    rows, best = train(tiny_h5, tmp_path / "a", "--sv_rate", "0.2")
    rows2, best2 = train(scrambled(tiny_h5), tmp_path / "b", "--sv_rate", "0.2")
    assert best == best2 and [r["step"] for r in rows] == [r["step"] for r in rows2]
    smoothed, scored = None, []  # lfads-torch's smoothing: 0.3 x the past + 0.7 x the new
    for r in rows:
        v = float(r["valid_recon_sv"])
        smoothed = v if smoothed is None else 0.3 * smoothed + 0.7 * v
        if int(r["step"]) >= 6:  # the ramps end at step 6
            scored.append((smoothed, int(r["step"])))
    assert best == min(scored)[1]  # the lowest smoothed sample-validation cost past the ramps
