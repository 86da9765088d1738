"""The training loop written out in lfads_tutorial.ipynb trains exactly as `Trainer.fit`: on the
same seed and steps it gives the same metrics rows, checkpoints and weights. The loop is the
function `train_loop` of the notebook's cell with id "train", run here on a tiny session."""

import ast
import math
from pathlib import Path

import nbformat
import pytest
import torch

from src.data import load_session
from src.model import LFADSConfig
from src.trainer import TrainConfig, Trainer
from src.utils import seed_everything

ROOT = Path(__file__).resolve().parent.parent
MODEL = dict(ic_enc_dim=8, ci_enc_dim=8, con_dim=8, co_dim=2, ic_dim=4, gen_dim=16, fac_dim=4)


def tutorial_loop():
    """The notebook's `train_loop`, with every import of the notebook's code cells in its scope
    (and nothing else: a name the loop takes from another cell fails here)."""
    nb = nbformat.read(ROOT / "lfads_tutorial.ipynb", as_version=4)
    nodes, loop = [], None
    for cell in nb.cells:
        if cell.cell_type != "code":
            continue
        for node in ast.parse(cell.source).body:
            if isinstance(node, (ast.Import, ast.ImportFrom)):
                nodes.append(node)
            elif isinstance(node, ast.FunctionDef) and node.name == "train_loop":
                assert cell.get("id") == "train" and loop is None
                loop = node
    assert loop is not None, "lfads_tutorial.ipynb defines no function train_loop"
    scope = {}
    exec(compile(ast.Module(nodes + [loop], type_ignores=[]), "lfads_tutorial.ipynb", "exec"),
         scope)
    return scope["train_loop"]


def trained(path, tmp, name, sv_rate, run):
    """A trainer on the tiny session, seeded as the notebook seeds it, after `run(trainer)`."""
    session = load_session(str(path))
    cfg = LFADSConfig(**session.sizes, **MODEL, sv_rate=sv_rate)
    # 2 steps an epoch: the ramps end at step 4, so the best checkpoint, the lr schedule and
    # the plateau count take part; 10 steps leave a short last period after step 8
    tcfg = TrainConfig(max_steps=10, eval_every=4, batch_size=16, kl_epochs=1, l2_epochs=2,
                       lr_patience=0, device="cpu")
    run_dir = tmp / name
    run_dir.mkdir()
    seed_everything(0)
    trainer = Trainer([session], cfg, tcfg, str(run_dir), torch.device("cpu"))
    assert trainer.steps_per_epoch() == 2
    label = run(trainer)
    return trainer, label


@pytest.mark.parametrize("sv_rate", [0.0, 0.2])
def test_loop_reproduces_fit(tiny_h5, tmp_path, sv_rate, capsys):
    loop = tutorial_loop()
    ref, stop = trained(tiny_h5, tmp_path, "fit", sv_rate, lambda t: t.fit())
    ours, label = trained(tiny_h5, tmp_path, "loop", sv_rate, loop)
    assert label == stop.label == "max_steps"
    assert ours.state.step == ref.state.step == 10
    assert [r["step"] for r in ours.state.rows] == [r["step"] for r in ref.state.rows] == [4, 8, 10]
    for a, b in zip(ours.state.rows, ref.state.rows):
        assert set(a) == set(b)
        assert {"train_recon", "train_kl_ic", "train_kl_co", "train_l2", "valid_recon",
                "valid_co_bps", "valid_r2", "lr"} <= set(a)
        for k in set(a) - {"elapsed_s"}:  # wall time alone differs
            assert math.isclose(a[k], b[k], rel_tol=1e-6, abs_tol=1e-9), (a["step"], k, a[k], b[k])
    assert ref.state.rows[2]["lr"] < ref.state.rows[1]["lr"]  # the lr decayed at step 8
    for p, q in zip(ours.model.parameters(), ref.model.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-6, atol=1e-7)
    for name in ("ckpt_best.pt", "ckpt_last.pt", "metrics.csv"):
        assert (tmp_path / "loop" / name).is_file() and (tmp_path / "fit" / name).is_file()
    printed = capsys.readouterr().out.splitlines()
    assert [line.split(" ", 2)[:2] for line in printed] == [["step", "4"], ["step", "8"]]
