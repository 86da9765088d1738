"""What a run prints while it trains: a line per evaluation on stdout, on a terminal or off it;
a terminal bar that counts to the next evaluation; --quiet; curves.png redrawn mid-run."""

import os
import re
import subprocess
import sys

import src.trainer as trainer_module
from src.data import load_session
from src.main import main
from src.model import LFADSConfig
from src.trainer import TrainConfig, Trainer
from tests.conftest import ROOT, TINY_MODEL

LINE = re.compile(r"^step (\d+) [\d.]+ min \| train recon [\d.e+-]+ kl_ic .* \| valid "
                  r"recon_heldin [\d.e+-]+ co-bps -?[\d.]+ R2 -?[\d.]+ \| lr [\d.e+-]+ \| "
                  r"(ramps \d+%|no progress \d+/\d+)$")


def test_a_run_into_a_file_prints_a_line_per_evaluation(tiny_h5, tmp_path):
    env = dict(os.environ, PYTHONPATH=ROOT)
    argv = ["--data", str(tiny_h5), "--results-dir", str(tmp_path), "--run", "r",
            "--max-steps", "50", "--eval-every", "20", "--no-plots", *TINY_MODEL]
    log = tmp_path / "run.log"
    with open(log, "w") as f:  # stdout a file, as under nohup or a cluster queue
        proc = subprocess.run([sys.executable, "-m", "src.main", *argv], stdout=f,
                              stderr=subprocess.PIPE, text=True, timeout=300, env=env)
    assert proc.returncode == 0, proc.stderr
    lines = log.read_text().splitlines()
    steps = [int(m.group(1)) for m in map(LINE.match, lines) if m]
    assert steps == [20, 40, 50], lines  # two full periods and the short last one
    assert lines[-2].startswith("done:")
    assert "it/s" not in proc.stderr  # no bar off a terminal


def test_quiet_prints_the_start_and_the_end_only(tiny_h5, tmp_path, capsys):
    argv = ["--data", str(tiny_h5), "--results-dir", str(tmp_path), "--run", "r", "--quiet",
            "--max-steps", "40", "--eval-every", "20", "--no-plots", *TINY_MODEL]
    assert main(argv) == 0
    out = capsys.readouterr().out.splitlines()
    assert not any(LINE.match(x) for x in out)
    assert out[0].startswith("training on") and out[-2].startswith("done:")


class Bar:
    """tqdm shown as on a terminal, recording each period's count and total."""
    periods = []

    def __init__(self, total, **kw):
        self.total, self.n = total, 0

    def update(self, n):
        self.n += n

    def reset(self, total):
        Bar.periods.append((self.n, self.total))
        self.total, self.n = total, 0

    def close(self):
        Bar.periods.append((self.n, self.total))

    external_write_mode = trainer_module.tqdm.external_write_mode


def test_the_bar_reaches_every_total_it_shows(tiny_h5, tmp_path, monkeypatch):
    monkeypatch.setattr(trainer_module, "tqdm", Bar)
    session = load_session(str(tiny_h5))
    mcfg = LFADSConfig(**{**session.sizes, "gen_dim": 16, "ic_enc_dim": 8, "ci_enc_dim": 8,
                          "con_dim": 8, "co_dim": 1, "ic_dim": 4, "fac_dim": 4})
    tcfg = TrainConfig(batch_size=16, max_steps=45, eval_every=20, kl_epochs=1, l2_epochs=1,
                       device="cpu", compile=False)
    tr = Trainer([session], mcfg, tcfg, str(tmp_path), trainer_module.torch.device("cpu"))
    lines, drawn = [], []
    tr.log = lambda line, **kw: lines.append(line)
    tr.draw = lambda rows, run_dir: drawn.append(len(rows))
    tr.fit()
    # periods of 20, 20 and the last 5 to --max-steps: never the 45 steps of the whole run
    assert Bar.periods[:3] == [(20, 20), (20, 20), (5, 5)]
    assert [int(x.split()[1]) for x in lines] == [20, 40, 45]
    assert drawn and drawn[0] == 1  # curves.png from the first evaluation on
    assert "no progress" in lines[-1]  # past the ramps of one epoch: the plateau counts
