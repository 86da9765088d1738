"""Training stops at the plateau: the smoothed selection loss, progress by a relative tolerance,
the learning rate decaying before the stop, the ceilings, and an exact resume.

The selection loss is scripted (the real validation runs, then its held-in reconstruction is
replaced by the script's value for that evaluation), so that the expected steps are worked out
by hand from the rule as the config comments state it."""

import json

import pytest

from src.main import main
from src.trainer import Trainer
from tests.conftest import TINY_MODEL
from tests.test_resume import assert_same_run, resume, steps
from tests.test_train import read_metrics

# ramps end at step 2; an evaluation every 2 steps; decay after 2 evaluations without progress
# (ReduceLROnPlateau decays on the third), stop after 4
RULE = [*TINY_MODEL, "--eval_every", "2", "--kl_epochs", "1", "--l2_epochs", "1", "--patience",
        "4", "--lr_patience", "2", "--lr_decay", "0.5", "--plateau_tol", "0.001", "--lr", "0.004",
        "--no-plots"]


@pytest.fixture
def script(monkeypatch):
    """Set the selection loss of the evaluations: script.values[i] for the i-th row."""
    real = Trainer.validate

    class Script:
        values: list = []

    def scripted(self):
        out = real(self)
        out["recon_heldin"] = Script.values[len(self.state.rows)]
        return out

    monkeypatch.setattr(Trainer, "validate", scripted)
    return Script


def train(tiny_h5, results, run, *flags):
    return main(["--data", str(tiny_h5), "--results-dir", str(results), "--run", run,
                 *RULE, *flags])


def summary(run_dir):
    return json.loads((run_dir / "summary.json").read_text())


def test_a_flat_loss_decays_the_lr_then_stops(tiny_h5, tmp_path, script, capsys):
    # noise of 0.05% is no progress at a tolerance of 0.1%
    script.values = [100.0, 99.95] * 20
    assert train(tiny_h5, tmp_path, "r", "--max_steps", "60") == 0
    rows = read_metrics(tmp_path / "r")
    # step 2: the first evaluation past the ramps, progress from nothing; steps 4-10: none
    assert [int(r["step"]) for r in rows] == [2, 4, 6, 8, 10]
    assert summary(tmp_path / "r")["stopped"] == "plateau"
    # the smoothed loss: 0.3 x the past + 0.7 x the new value (by hand)
    assert float(rows[1]["valid_selection_smth"]) == pytest.approx(0.3 * 100 + 0.7 * 99.95)
    # the lr decays at the third evaluation without progress (step 8); a row shows the lr
    # of the steps before it
    assert [float(r["lr"]) for r in rows] == [0.004] * 4 + [0.002]
    out = capsys.readouterr().out
    assert "stopping at step 10: the plateau (the smoothed selection loss made no progress " \
           "of 0.001 of it in 4 evaluations)" in out


def test_a_loss_still_improving_runs_to_the_ceiling_and_says_how_to_go_on(
        tiny_h5, tmp_path, script, capsys):
    script.values = [100.0 * 0.99 ** i for i in range(40)]  # 1% per evaluation
    assert train(tiny_h5, tmp_path, "r", "--max_steps", "30") == 0
    rows = read_metrics(tmp_path / "r")
    assert int(rows[-1]["step"]) == 30 and summary(tmp_path / "r")["stopped"] == "max_steps"
    assert {float(r["lr"]) for r in rows} == {0.004}  # never decayed
    out = capsys.readouterr().out
    assert ("stopping at step 30: the --max-steps ceiling, before the plateau; continue with: "
            f"python -m src.main --resume {tmp_path / 'r'} --max-steps <more>") in out


def test_slow_progress_resets_the_count(tiny_h5, tmp_path, script):
    # flat for 3 evaluations, then 1% lower, nearly flat for 2 more, lower again: never 4
    # evaluations without progress, so the run reaches its ceiling
    script.values = [100.0] * 4 + [99.0] * 4 + [98.0] * 4 + [97.0] * 20
    assert train(tiny_h5, tmp_path, "r", "--max_steps", "24") == 0
    rows = read_metrics(tmp_path / "r")
    assert int(rows[-1]["step"]) == 24 and summary(tmp_path / "r")["stopped"] == "max_steps"
    # resumed with more steps: 1% lower at steps 26 and 28 (smoothed: 97.30, 97.09), then
    # progress smaller than 0.1% at steps 30-36, so it stops at step 36
    assert resume(tmp_path / "r", "--max_steps", "100") == 0
    assert steps(tmp_path / "r")[-1] == 36 and summary(tmp_path / "r")["stopped"] == "plateau"


def test_a_time_ceiling_says_how_to_go_on(tiny_h5, tmp_path, script, capsys):
    script.values = [100.0] * 40
    assert train(tiny_h5, tmp_path, "r", "--max_steps", "60", "--max_minutes", "1e-4") == 0
    assert summary(tmp_path / "r")["stopped"] == "max_minutes"
    assert "the --max-minutes ceiling, before the plateau; continue with: python -m src.main " \
           f"--resume {tmp_path / 'r'} --max-minutes <more>" in capsys.readouterr().out


def test_a_run_resumed_mid_plateau_stops_where_the_whole_run_stops(tiny_h5, tmp_path, script):
    script.values = [100.0, 99.0, 98.5, 98.4, 98.45, 98.4, 98.42, 98.41, 98.43] + [98.4] * 20
    assert train(tiny_h5, tmp_path, "whole", "--max_steps", "100") == 0
    # 9 steps: a ceiling between two evaluations, inside the stretch without progress
    assert train(tiny_h5, tmp_path, "split", "--max_steps", "9") == 0
    assert resume(tmp_path / "split", "--max_steps", "100") == 0
    assert steps(tmp_path / "whole") == steps(tmp_path / "split")
    assert steps(tmp_path / "whole")[-1] < 100
    assert_same_run(tmp_path / "whole", tmp_path / "split")
