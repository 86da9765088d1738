"""Training end to end: the loss falls, the run folder is complete, the command line works."""

import csv
import json
import os
import re
import subprocess
import sys

import h5py
import numpy as np
import pytest
import torch

from src.data import DataError, load_session
from src.main import main
from tests.conftest import ROOT, TINY_MODEL


def read_metrics(run_dir):
    with open(os.path.join(run_dir, "metrics.csv")) as f:
        return list(csv.DictReader(f))


def test_short_training_lowers_the_loss_and_writes_a_complete_run(tiny_h5, tmp_path):
    results = tmp_path / "results"
    argv = ["--data", str(tiny_h5), "--results-dir", str(results), "--run", "r",
            "--max_steps", "60", "--eval_every", "20", "--lr", "0.01", *TINY_MODEL]
    assert main(argv) == 0
    run = results / "r"
    for name in ("config.json", "metrics.csv", "ckpt_last.pt", "ckpt_best.pt",
                 "lfads_output.h5", "summary.json", "curves.png", "rates.png", "factors.png",
                 "inputs.png", "truth.png"):
        assert (run / name).is_file(), name
    rows = read_metrics(run)
    assert [int(r["step"]) for r in rows] == [20, 40, 60]
    assert float(rows[-1]["train_recon"]) < float(rows[0]["train_recon"])
    for key in ("valid_bps", "valid_co_bps", "valid_fp_bps", "valid_r2", "valid_kl_co", "lr"):
        assert key in rows[0], key
    cfg = json.loads((run / "config.json").read_text())
    assert cfg["model"]["gen_dim"] == 32 and cfg["model"]["n_out"] == 12
    ckpt = torch.load(run / "ckpt_last.pt", weights_only=False)
    assert ckpt["loop"]["step"] == 60 and {"model", "optimizer", "scheduler", "rng"} <= set(ckpt)
    with h5py.File(run / "lfads_output.h5") as f:
        n_valid = f["valid_rates"].shape[0]
        assert f["valid_rates"].shape == (n_valid, 20, 12)
        assert f["train_factors"].shape[1:] == (20, 8)
        assert f["valid_co_means"].shape == (n_valid, 20, 2)
        assert f["valid_ic_mean"].shape == f["valid_ic_std"].shape == (n_valid, 8)
        assert f["valid_gen_states"].shape == (n_valid, 20, 32)
        assert f.attrs["n_samples"] == 3 and f.attrs["averaging"] == "posterior_samples"
        assert (f["valid_rates"][()] > 0).all()
    summary = json.loads((run / "summary.json").read_text())
    assert summary["steps"] == 60 and "valid_co_bps" in summary and "valid_r2" in summary


def run_cli(*args, cwd):
    env = dict(os.environ, PYTHONPATH=ROOT)
    return subprocess.run([sys.executable, "-m", "src.main", *args], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=300)


def test_command_line_end_to_end(tiny_h5, tmp_path):
    common = ["--data-dir", str(tiny_h5.parent), "--results-dir", "results", "--run", "cli",
              "--eval_every", "5", "--no-plots", *TINY_MODEL]
    p = run_cli("--max_steps", "5", *common, cwd=tmp_path)
    assert p.returncode == 0, p.stderr
    assert "done: results/cli" in p.stdout and "valid_r2" in p.stdout
    # the same run folder again: refused, with the way out named
    p = run_cli("--max_steps", "5", *common, cwd=tmp_path)
    assert p.returncode == 2 and "--resume results/cli" in p.stderr and "--overwrite" in p.stderr
    # resumed, it continues from step 5 to step 10
    p = run_cli("--resume", "results/cli", "--max_steps", "10", "--no-plots", cwd=tmp_path)
    assert p.returncode == 0, p.stderr
    assert "resuming results/cli at step 5" in p.stdout
    assert [int(r["step"]) for r in read_metrics(tmp_path / "results/cli")] == [5, 10]


def test_help_lists_every_field_once_with_its_default(tmp_path):
    import dataclasses

    from src.main import DATA_SIZES
    from src.model import LFADSConfig
    from src.trainer import TrainConfig
    from tests.test_help import help_entries

    p = run_cli("--help", cwd=tmp_path)
    assert p.returncode == 0
    entries = help_entries(p.stdout)
    for flag in ("--gen-dim INT", "--co-dim INT", "--cd-rate FLOAT", "--kl-epochs FLOAT",
                 "--max-steps INT", "--ins INS", "--precision {fp32,bf16}",
                 "--device {auto,cpu,cuda,cuda:N,mps}", "--readin-train, --no-readin-train"):
        assert flag in entries, flag
    # each field's flag states that field's own default, in its own entry
    by_flag = {inv.split()[0].rstrip(","): desc for inv, desc in entries.items()}
    fields = [f for cls in (LFADSConfig, TrainConfig) for f in dataclasses.fields(cls)
              if f.name not in DATA_SIZES]
    for f in fields:
        flag = "--" + f.name.replace("_", "-")
        assert by_flag[flag].endswith(f"(default: {f.default})"), (flag, by_flag[flag])
    # one style: no flag listed twice, no underscore spelling, no bare type names
    listed = re.findall(r"^  (--[\w-]+)", p.stdout, re.M)  # entries, not wrapped help
    assert len(listed) == len(set(listed)) > len(fields) and not [f for f in listed if "_" in f]
    assert "PARSE_BOOL" not in p.stdout and "STR" not in p.stdout and "[" not in p.stdout.split(
        "options:")[1].replace("[-h]", "")


def test_bad_command_lines_are_refused_clearly(tiny_h5, tmp_path):
    p = run_cli("--gen-dim", "many", cwd=tmp_path)
    assert p.returncode == 2 and "--gen-dim" in p.stderr and "many" in p.stderr
    p = run_cli("--no_such_field", "1", cwd=tmp_path)
    assert p.returncode == 2 and "--no_such_field" in p.stderr
    p = run_cli("--data-dir", str(tmp_path / "empty"), cwd=tmp_path)
    assert p.returncode == 2 and "setup.sh" in p.stderr and "Traceback" not in p.stderr


def test_a_misspelt_flag_gets_the_nearest_one_in_a_line(tmp_path):
    for wrong, right in (("--gen-dims", "--gen-dim"), ("--max_step", "--max-steps"),
                         ("--banana", None), ("--kl-epoch=3", "--kl-epochs")):
        p = run_cli(wrong, "3", cwd=tmp_path) if "=" not in wrong else run_cli(wrong, cwd=tmp_path)
        assert p.returncode == 2 and p.stderr.count("\n") == 1, p.stderr
        assert f"unknown flag {wrong.split('=')[0]}" in p.stderr
        assert (f"did you mean {right}?" in p.stderr) if right else "did you mean" not in p.stderr


def test_the_older_spellings_still_work(tiny_h5, tmp_path):
    from src.main import build_parser

    old = build_parser().parse_args(["--gen_dim", "7", "--readin_train", "false", "--max_steps",
                                     "3"])
    new = build_parser().parse_args(["--gen-dim", "7", "--no-readin-train", "--max-steps", "3"])
    assert vars(old) == vars(new) and new.gen_dim == 7 and new.readin_train is False


def test_a_folder_given_as_the_data_file_says_so(tiny_h5, tmp_path, capsys):
    assert main(["--data", str(tiny_h5.parent), "--results-dir", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert f"{tiny_h5.parent} is a folder" in err and f"--data-dir {tiny_h5.parent}" in err


def test_external_inputs_reach_the_test_trials_too(tiny_h5, tmp_path):
    from tests.test_data import arr, rewrite
    rng = np.random.default_rng(0)
    ext = {f"{s}_ext_input": rng.normal(size=(len(arr(tiny_h5, f"{s}_encod_data")), 20, 2))
           for s in ("train", "valid")}
    test_encod = arr(tiny_h5, "valid_encod_data")[:5]
    # without the test trials' inputs the generator could not run on them: refused up front
    bad = rewrite(tiny_h5, test_encod_data=test_encod, **ext)
    with pytest.raises(DataError, match="test_ext_input"):
        load_session(str(bad))
    good = rewrite(tiny_h5, test_encod_data=test_encod, test_ext_input=np.ones((5, 20, 2)),
                   **ext)
    results = tmp_path / "results"
    argv = ["--data", str(good), "--results-dir", str(results), "--run", "ext",
            "--max_steps", "2", "--eval_every", "2", "--no-plots", *TINY_MODEL]
    assert main(argv) == 0
    with h5py.File(results / "ext" / "lfads_output.h5") as f:
        assert f["test_rates"].shape == (5, 20, 12)


def test_figures_of_a_tiny_validation_split_and_a_single_factor(tiny_h5, tmp_path):
    from tests.test_data import rewrite
    with h5py.File(tiny_h5) as f:
        two = {k: f[k][()][:2] for k in f if k.startswith("valid_")}  # 2 validation trials
    results = tmp_path / "results"
    argv = ["--data", str(rewrite(tiny_h5, **two)), "--results-dir", str(results), "--run", "r",
            "--max_steps", "2", "--eval_every", "2", *TINY_MODEL, "--fac_dim", "1"]
    assert main(argv) == 0
    for name in ("rates.png", "factors.png", "inputs.png", "truth.png"):
        assert (results / "r" / name).is_file(), name


def test_help_explains_every_flag_with_its_config_comment(capsys):
    import dataclasses

    from src.main import DATA_SIZES, field_comments
    from src.model import LFADSConfig
    from src.trainer import TrainConfig

    with pytest.raises(SystemExit):
        main(["--help"])
    squeeze = lambda s: "".join(s.split())  # noqa: E731  argparse re-wraps the lines
    out = squeeze(capsys.readouterr().out)
    for cls in (LFADSConfig, TrainConfig):
        comments = field_comments(cls)
        for f in dataclasses.fields(cls):
            if f.name in DATA_SIZES:
                continue
            assert len(comments.get(f.name, "")) > 10, f"{f.name} has no comment"
            assert squeeze(comments[f.name] + f"(default: {f.default})") in out, f.name
    assert squeeze("sample validation: share of input elements never trained on") in out


def test_factors_follow_the_neurons_unless_given(tiny_h5, tmp_path):
    # the tiny file has 12 neurons, fewer than the default 40 factors
    no_fac = [a for i, a in enumerate(TINY_MODEL) if "--fac_dim" not in TINY_MODEL[i - 1:i + 1]]
    common = ["--data", str(tiny_h5), "--results-dir", str(tmp_path), "--max_steps", "1",
              "--no-plots", *no_fac]
    assert main([*common, "--run", "auto"]) == 0
    assert main([*common, "--run", "given", "--fac_dim", "30"]) == 0
    fac = {r: json.loads((tmp_path / r / "config.json").read_text())["model"]["fac_dim"]
           for r in ("auto", "given")}
    assert fac == {"auto": 12, "given": 30}
