"""The bad-input suite: each case ends in one line that says what is wrong and where, and an
exit code, never a traceback. Cases tested in other files:

- malformed session files (corrupt or truncated HDF5, missing keys, wrong dtype, NaN, negative
  or fractional counts, mismatched shapes, no bin_size), an empty data folder, an `--ins`
  with no file: tests/test_data.py, on src.data; the command line's handling of them: below
- an unknown flag, an integer flag given a word, a run folder that exists (refused unless
  --resume or --overwrite): tests/test_train.py::test_bad_command_lines_are_refused_clearly
  and ::test_command_line_end_to_end
- prep_data: a missing dataset in one insertion (a `failed` manifest row, tried again on the
  next run), a rerun (skips what is done), an interrupted run (no partial file, no row):
  tests/test_prep_data.py::test_rerun_skips_what_is_done_and_retries_failures and
  ::test_interrupted_write_leaves_no_file
- a non-finite loss or gradient, kills, SIGINT and SIGTERM: tests/test_resume.py
"""

import dataclasses
import errno
import os

import numpy as np
import pytest
import torch
from one.api import ONE

from src.ibl import prep as prep_data
from src.main import build_parser, main
from src.model import LFADSConfig
from src.trainer import TrainConfig
from tests.conftest import TINY_MODEL
from tests.test_data import arr, rewrite


def cli(capsys, *argv) -> tuple:
    """Exit code and stderr of `python -m src.main` run in this process."""
    capsys.readouterr()
    code = main([*argv, "--no-plots", "--threads", "1"])
    return code, capsys.readouterr().err


def one_clear_line(err: str) -> bool:
    return err.startswith("error: ") and err.count("\n") == 1 and "Traceback" not in err


def truncated(h5):
    raw = h5.read_bytes()
    (h5.parent / "cut.h5").write_bytes(raw[: len(raw) // 2])
    return h5.parent / "cut.h5"


def not_hdf5(h5):
    h5.with_name("a.h5").write_text("spikes")
    return h5.with_name("a.h5")


FILES = {  # a bad session file from the tiny one, and what the error must say
    "truncated": (truncated, "cut.h5"),
    "not hdf5": (not_hdf5, "a.h5: not a readable HDF5 file"),
    "missing key": (lambda h5: rewrite(h5, valid_encod_data=None),
                    "bad.h5: missing key 'valid_encod_data'"),
    "NaN counts": (lambda h5: rewrite(h5, train_recon_data=np.full_like(
        arr(h5, "train_recon_data"), np.nan, dtype=float)), "'train_recon_data' holds NaN"),
    "negative counts": (lambda h5: rewrite(h5, train_encod_data=-arr(h5, "train_encod_data")
                                           .astype(np.int32) - 1), "negative values"),
    "wrong dtype": (lambda h5: rewrite(h5, train_encod_data=np.full(
        arr(h5, "train_encod_data").shape, b"x")),
                    "'train_encod_data' has dtype"),
    "trial mismatch": (lambda h5: rewrite(h5, valid_recon_data=arr(h5, "valid_recon_data")[1:]),
                       "'valid_encod_data' has 10 trials but 'valid_recon_data' has 9"),
    # encoder input that is not the held-in block of the reconstructed counts: coordinated
    # dropout and sample validation would silently learn from the wrong targets
    "encoder input not the held-in counts": (
        lambda h5: rewrite(h5, train_encod_data=arr(h5, "train_encod_data")[::-1]),
        "'train_encod_data' is not the first 16 bins and 9 neurons of 'train_recon_data'"),
}


@pytest.mark.parametrize("case", FILES)
def test_bad_session_file_on_the_command_line(tiny_h5, tmp_path, capsys, case):
    make, message = FILES[case]
    code, err = cli(capsys, "--data", str(make(tiny_h5)), "--results-dir",
                    str(tmp_path / "results"))
    assert code == 2 and one_clear_line(err) and message in err, err
    assert not (tmp_path / "results").exists()  # refused before any run folder is made


def test_no_data_and_unknown_insertion(tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    code, err = cli(capsys, "--data-dir", str(tmp_path / "empty"))
    assert code == 2 and one_clear_line(err) and "no session files" in err
    code, err = cli(capsys, "--data-dir", str(tmp_path / "empty"), "--ins", "nope")
    assert code == 2 and one_clear_line(err) and "--ins nope: no file" in err


# values of the right type that cannot train: refused before a run folder exists
IMPOSSIBLE = {"--batch-size": "0", "--eval-every": "0", "--gen-dim": "0", "--dropout": "1",
              "--cd-rate": "1", "--sv-rate": "1.5", "--co-dim": "-1", "--device": "gpu"}
if not torch.cuda.is_available():
    IMPOSSIBLE["--device "] = "cuda"  # the space: a second key for the same flag


@pytest.mark.parametrize("flag", IMPOSSIBLE)
def test_a_setting_that_cannot_train(tiny_h5, tmp_path, capsys, flag):
    value = IMPOSSIBLE[flag]
    code, err = cli(capsys, "--data", str(tiny_h5), "--results-dir", str(tmp_path / "results"),
                    flag.strip(), value)
    assert code == 2 and one_clear_line(err) and f"{flag.strip()} {value}:" in err, err
    assert not (tmp_path / "results").exists()


FLOAT_FLAGS = [f"--{f.name.replace('_', '-')}" for cfg in (LFADSConfig, TrainConfig)
               for f in dataclasses.fields(cfg) if f.type in (float, "float")]


@pytest.mark.parametrize("value", ["nan", "inf", "-1"])
@pytest.mark.parametrize("flag", FLOAT_FLAGS)
def test_every_float_flag_refuses_non_finite_and_negative_values(tiny_h5, tmp_path, capsys,
                                                                  flag, value):
    code, err = cli(capsys, "--data", str(tiny_h5), "--results-dir", str(tmp_path / "results"),
                    flag, value)
    assert code == 2 and one_clear_line(err) and err.startswith(f"error: {flag} "), err
    assert not (tmp_path / "results").exists()


def test_the_float_sweep_covers_the_flags_of_both_configs():
    assert {"--lr", "--dropout", "--kl-ic-scale", "--co-prior-nvar", "--max-minutes"} <= set(
        FLOAT_FLAGS)


@pytest.mark.parametrize("flag,value", [("--cd-rate", "lots"), ("--max-steps", "1.5"),
                                        ("--lr", "")])
def test_a_value_of_the_wrong_type(capsys, flag, value):
    with pytest.raises(SystemExit) as e:
        build_parser().parse_args([flag, value])
    err = capsys.readouterr().err
    assert e.value.code == 2 and f"argument {flag}" in err and f"'{value}'" in err


def test_a_checkpoint_that_does_not_fit(tiny_h5, tmp_path, capsys):
    run, ckpt = tmp_path / "results/r", tmp_path / "results/r/ckpt_last.pt"
    assert main(["--data", str(tiny_h5), "--results-dir", str(tmp_path / "results"), "--run",
                 "r", "--max_steps", "2", "--eval_every", "2", "--no-plots", *TINY_MODEL]) == 0
    # other data: fewer neurons than the checkpoint's model reads out
    small = rewrite(tiny_h5, train_recon_data=arr(tiny_h5, "train_recon_data")[..., :11],
                    valid_recon_data=arr(tiny_h5, "valid_recon_data")[..., :11],
                    train_truth=None, valid_truth=None)
    code, err = cli(capsys, "--resume", str(run), "--data", str(small))
    assert code == 2 and one_clear_line(err)
    assert f"bad.h5 does not fit the checkpoint {ckpt}: n_out 12 in the checkpoint, 11" in err
    # flags that change the network's shape
    code, err = cli(capsys, "--resume", str(run), "--gen_dim", "64", "--co_dim", "3")
    assert code == 2 and one_clear_line(err)
    assert f"{ckpt}: its weights do not fit the model asked for (co_dim 2 -> 3, gen_dim 32 -> " \
           "64)" in err
    # a field this version of the code does not have
    saved = torch.load(ckpt, weights_only=False)
    torch.save({**saved, "model_config": {**saved["model_config"], "old_knob": 1}}, ckpt)
    code, err = cli(capsys, "--resume", str(run))
    assert code == 2 and one_clear_line(err) and "does not fit this version of the code" in err
    torch.save({"weights": saved["model"]}, ckpt)  # someone else's file
    code, err = cli(capsys, "--resume", str(run))
    assert code == 2 and one_clear_line(err) and "not a checkpoint of this program" in err
    ckpt.write_bytes(ckpt.read_bytes()[:1000])  # truncated by a full disk or a copy
    code, err = cli(capsys, "--resume", str(run))
    assert code == 2 and one_clear_line(err) and f"{ckpt}: not a readable checkpoint" in err
    ckpt.unlink()
    code, err = cli(capsys, "--resume", str(run))
    assert code == 2 and one_clear_line(err) and f"--resume {run}: no checkpoint" in err


def test_overwrite_leaves_nothing_of_the_old_run(tiny_h5, tmp_path):
    run = tmp_path / "results/r"
    argv = ["--data", str(tiny_h5), "--results-dir", str(tmp_path / "results"), "--run", "r",
            "--max_steps", "2", "--eval_every", "2", *TINY_MODEL]
    assert main([*argv, "--kl_epochs", "0", "--l2_epochs", "0"]) == 0
    assert (run / "ckpt_best.pt").is_file() and (run / "inputs.png").is_file()
    (run / "notes.txt").write_text("the user's own file")
    # still ramping, the new run saves no best checkpoint: the old one must not be exported;
    # nor may the old figures stay next to the new outputs
    assert main([*argv, "--overwrite", "--no-plots"]) == 0
    assert not (run / "ckpt_best.pt").exists()
    assert not list(run.glob("*.png")) and (run / "notes.txt").is_file()


def test_read_only_results_folder(tiny_h5, tmp_path, capsys, monkeypatch):
    results = tmp_path / "results"
    results.mkdir()
    results.chmod(0o555)
    if os.geteuid() == 0:  # root writes anywhere: refuse as the kernel refuses everyone else
        real = os.makedirs

        def denied(path, *args, **kwargs):
            if str(path).startswith(str(results)):
                raise PermissionError(errno.EACCES, os.strerror(errno.EACCES), str(path))
            return real(path, *args, **kwargs)

        monkeypatch.setattr(os, "makedirs", denied)
    try:
        code, err = cli(capsys, "--data", str(tiny_h5), "--results-dir", str(results),
                        "--run", "r", *TINY_MODEL)
    finally:
        results.chmod(0o755)
    assert code == 2 and one_clear_line(err)
    assert f"cannot write the run folder {results / 'r'} (Permission denied" in err


def test_prep_data_with_no_connection(tmp_path, capsys, monkeypatch):
    (tmp_path / "home").mkdir()
    monkeypatch.setenv("HOME", str(tmp_path / "home"))  # ONE writes its settings there
    ONE.cache_clear()
    out = tmp_path / "out"
    try:  # nothing listens on port 9 of this machine: refused at once, as offline
        code = prep_data.main(["--base-url", "http://127.0.0.1:9", "--out-dir", str(out),
                               "--cache-dir", str(tmp_path / "one"), "--pids", "abc"])
    finally:
        ONE.cache_clear()
    err = capsys.readouterr().err
    assert code == 2 and one_clear_line(err)
    assert "http://127.0.0.1:9" in err and "--local --cache-dir" in err
    assert not out.exists()  # no manifest, no file
