"""Several sessions, one stitched model: synthetic sessions that share their Lorenz latents
but not their neurons train together, each reaches a good R2 against the true rates, the
small ones better than models trained on them alone, and mismatched files are refused."""

import json

import h5py
import numpy as np
import pytest
import torch

from src.data import load_session
from src.main import main
from src.model import LFADSConfig
from src.stitch import (
    METRIC_NAMES,
    StitchedLFADS,
    pcr_init_readins,
    pick_batch,
    psths,
    stitched_sizes,
)
from src.synth import LorenzConfig, make_lorenz, write_session
from tests.test_resume import assert_same_run, steps
from tests.test_train import read_metrics

# one latent system (seed 1), three read-outs: a 30-neuron session and two small ones of
# 12 and 10 neurons; 32 conditions x 1 trial each, half of them validation trials (drawn per
# session, so a condition one session validates on another may train on), 30 bins of 20 ms,
# about 20 Hz
SESSIONS = {"big": (30, 11), "small_a": (12, 12), "small_b": (10, 13)}  # neurons, readout seed
SMALL = ("small_a", "small_b")
MODEL = ["--ic_enc_dim", "16", "--ci_enc_dim", "16", "--con_dim", "16", "--co_dim", "0",
         "--ic_dim", "8", "--gen_dim", "32", "--fac_dim", "8", "--batch_size", "16",
         "--n_samples", "3", "--kl_epochs", "5", "--l2_epochs", "5", "--threads", "1",
         "--lr", "0.01", "--eval_every", "50", "--readin_dim", "8",
         "--patience", "0"]  # equal steps for the stitched and the separate runs
STEPS = 1000  # steps of the stitched run and of each separate one


def session_cfg(neurons, readout_seed, **kw):
    return LorenzConfig(n_conditions=32, trials_per_condition=1, n_bins=30, n_fp_bins=5,
                        n_neurons=neurons, n_heldout=neurons // 4, base_rate=20.0, seed=1,
                        valid_frac=0.5,
                        readout_seed=readout_seed, **kw)


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("stitch") / "data"
    d.mkdir()
    for name, (n, seed) in SESSIONS.items():
        write_session(str(d / f"{name}.h5"), *make_lorenz(session_cfg(n, seed)))
    return d


def test_sessions_share_latents_not_neurons(data_dir):
    files = {n: h5py.File(data_dir / f"{n}.h5") for n in SESSIONS}
    lat = [f["latents"][()] for f in files.values()]
    assert all(np.array_equal(lat[0], x) for x in lat[1:])
    assert [f["train_truth"].shape[2] for f in files.values()] == [30, 12, 10]
    assert not np.array_equal(files["big"]["train_truth"][:, :, :10],
                              files["small_b"]["train_truth"][()])


def test_pcr_readins_map_sessions_onto_one_space(data_dir):
    sessions = [load_session(str(data_dir / f"{n}.h5")) for n in SESSIONS]
    tables, _ = psths(sessions)  # (C, T_enc, N_s) each

    def agreement(model, dims=3):
        """Correlation over conditions and bins of each small session's read-in PSTHs with
        the big session's, dimension by dimension, averaged over the first `dims` (the
        latents are 3-dimensional)."""
        with torch.no_grad():
            read = [model.readin[i](torch.as_tensor(t, dtype=torch.float32)).flatten(0, 1)
                    for i, t in enumerate(tables)]  # (C, T_enc, N_s) -> (C T_enc, R)
        return [np.mean([np.corrcoef(read[0][:, d], r[:, d])[0, 1] for d in range(dims)])
                for r in read[1:]]

    torch.manual_seed(0)
    model = StitchedLFADS(LFADSConfig(**stitched_sizes(sessions), readin_dim=8))
    before = agreement(model)
    assert pcr_init_readins(model, sessions) == 8
    after = agreement(model)
    print(f"\nread-in PSTHs correlate with the big session's: random {before}, PCR {after}")
    # the same condition and bin, read in from different neurons, lands on nearby points
    # better than a random read-in, which shares the latents' slow common trend (not closer:
    # with one trial per condition a "PSTH" is a single noisy trial)
    assert min(after) > 0.6 and all(a > b + 0.05 for a, b in zip(after, before))


def test_pcr_uses_conditions_all_sessions_share(tmp_path):
    for i, n in enumerate((20, 10)):
        cfg = session_cfg(n, i)
        cfg.trials_per_condition, cfg.valid_frac = 4, 0.2
        write_session(str(tmp_path / f"{i}.h5"), *make_lorenz(cfg))
    sessions = [load_session(str(tmp_path / f"{i}.h5")) for i in range(2)]
    tables, groups = psths(sessions)
    assert [t.shape for t in tables] == [(32, 25, 15), (32, 25, 8)]  # (C, T_enc, N_in)
    assert all((g >= 0).all() for g in groups)
    model = StitchedLFADS(LFADSConfig(**stitched_sizes(sessions), readin_dim=8))
    assert pcr_init_readins(model, sessions) == 8
    with torch.no_grad():  # the same condition and bin lands on the same point
        a, b = (model.readin[i](torch.as_tensor(t, dtype=torch.float32))[..., :3]
                for i, t in enumerate(tables))
    assert np.corrcoef(a.flatten(), b.flatten())[0, 1] > 0.7  # 3 trials a condition: noisy


def test_batches_follow_trial_counts_and_the_step_alone():
    picks = [pick_batch(0, step, [300, 100], 16)[0] for step in range(2000)]
    assert 0.7 < 1 - np.mean(picks) < 0.8  # 3/4 from the larger session
    s, idx = pick_batch(0, 5, [300, 10], 16)
    s2, idx2 = pick_batch(0, 5, [300, 10], 16)
    assert s == s2 and torch.equal(idx, idx2) and len(set(idx.tolist())) == len(idx)


def r2_of(run_dir, name=None):
    summary = json.loads((run_dir / "summary.json").read_text())
    return summary[f"valid_{name}_r2" if name else "valid_r2"]


def test_stitched_model_trains_and_beats_separate_small_models(data_dir, tmp_path):
    results = tmp_path / "results"
    argv = ["--results-dir", str(results), "--max_steps", str(STEPS), *MODEL]
    # no --data: every file in the data folder, as `python -m src.main` over ./data
    assert main(["--data-dir", str(data_dir), "--run", "stitched", *argv]) == 0
    run = results / "stitched"
    for name in SESSIONS:
        with h5py.File(run / f"lfads_output_{name}.h5") as f:
            n = SESSIONS[name][0]
            assert f["valid_rates"].shape[1:] == (30, n) and f["valid_factors"].shape[2] == 8
        assert (run / f"rates_{name}.png").is_file() and (run / f"truth_{name}.png").is_file()
    assert (run / "factors_shared.png").is_file() and (run / "curves.png").is_file()
    assert not (run / "lfads_output.h5").exists()
    row = read_metrics(run)[-1]
    for key in ("valid_recon", "valid_r2", "valid_big_co_bps", "valid_small_b_r2"):
        assert key in row, key
    stitched = {name: r2_of(run, name) for name in SESSIONS}
    separate = {}
    for name in SMALL:
        assert main(["--data", str(data_dir / f"{name}.h5"), "--run", name, "--no-plots",
                     *argv]) == 0
        separate[name] = r2_of(results / name)
    print(f"\nvalid R2 after {STEPS} steps, stitched: " +
          ", ".join(f"{k} {v:.3f}" for k, v in stitched.items()) +
          "; separate: " + ", ".join(f"{k} {v:.3f}" for k, v in separate.items()))
    # a short run of a tiny model on 16 trials per session: good, not the 0.95 of the
    # quality bench; a broken model (or read-ins that do not fit) stays near 0
    assert all(v > 0.5 for v in stitched.values()), stitched
    assert np.mean([stitched[k] for k in SMALL]) > np.mean(list(separate.values()))


def test_stitched_run_resumes_exactly(data_dir, tmp_path):
    results = tmp_path / "results"
    argv = ["--data", str(data_dir / "*.h5"), "--results-dir", str(results), "--no-plots",
            *MODEL, "--eval_every", "4", "--lr_patience", "0", "--sv_rate", "0.1"]
    assert main([*argv, "--run", "whole", "--max_steps", "12"]) == 0
    assert main([*argv, "--run", "split", "--max_steps", "6"]) == 0
    assert main(["--resume", str(results / "split"), "--no-plots", "--max_steps", "12"]) == 0
    assert steps(results / "split") == [4, 8, 12]
    # assert_same_run compares lfads_output.h5: stitched runs write one per session
    for name in SESSIONS:
        for run in ("whole", "split"):
            (results / run / f"lfads_output_{name}.h5").replace(results / run / "lfads_output.h5")
        assert_same_run(results / "whole", results / "split")


def test_mismatched_sessions_are_refused_naming_both_files(data_dir, tmp_path, capsys):
    d = tmp_path / "mixed"
    d.mkdir()
    write_session(str(d / "a.h5"), *make_lorenz(session_cfg(12, 1)))
    write_session(str(d / "b.h5"), *make_lorenz(session_cfg(12, 2, bin_size=0.01)))
    assert main(["--data-dir", str(d), "--results-dir", str(tmp_path / "r"), *MODEL]) == 2
    err = capsys.readouterr().err
    assert f"{d}/a.h5" in err and f"{d}/b.h5" in err and "bin_size" in err
    assert "Traceback" not in err


def test_sessions_are_known_by_name_on_resume_and_in_metrics(tmp_path, capsys):
    d = tmp_path / "two"
    d.mkdir()
    for name, seed in (("a", 1), ("b", 2)):  # the same sizes: only the names tell them apart
        write_session(str(d / f"{name}.h5"), *make_lorenz(session_cfg(12, seed)))
    results = tmp_path / "results"
    assert main(["--data", str(d / "*.h5"), "--results-dir", str(results), "--run", "r",
                 "--no-plots", *MODEL, "--max_steps", "2", "--eval_every", "2"]) == 0
    (d / "a.h5").rename(d / "z.h5")  # now sorted after b: by place it would take a's weights
    capsys.readouterr()
    assert main(["--resume", str(results / "r"), "--no-plots", "--data", str(d / "*.h5")]) == 2
    err = capsys.readouterr().err
    assert "not the sessions of the checkpoint" in err and "a, b" in err
    (d / "z.h5").rename(d / "a.h5")
    # the right files again: the same outputs as before
    before = h5py.File(results / "r/lfads_output_b.h5")["valid_rates"][()]
    assert main(["--resume", str(results / "r"), "--no-plots", "--data", str(d / "*.h5")]) == 0
    assert np.array_equal(h5py.File(results / "r/lfads_output_b.h5")["valid_rates"][()], before)
    # the metrics a session's name must not clash with are all in stitch.METRIC_NAMES
    cols = read_metrics(results / "r")[0].keys()
    overall = {c[6:] for c in cols if c.startswith("valid_") and c[6:8] not in ("a_", "b_")}
    assert overall <= set(METRIC_NAMES), overall - set(METRIC_NAMES)
    (d / "a.h5").rename(d / "co.h5")  # co_bps would be both session co's bps and the overall
    capsys.readouterr()
    assert main(["--data", str(d / "*.h5"), "--results-dir", str(results), "--no-plots",
                 *MODEL]) == 2
    assert "a session named 'co'" in capsys.readouterr().err
