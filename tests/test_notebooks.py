"""The notebooks run top to bottom offline, and are stored with their outputs, so that a visitor
on GitHub sees the figures without running anything.

- `lfads_tutorial.ipynb` trains LFADS on eg_data/lorenz.h5. The tests run it with
  LFADS_TUTORIAL_TINY=1 (a tiny model, a few steps); its stored outputs are of the full
  settings.
- `data_demo.ipynb` runs against the local ONE cache of src/ibl/fixture.py
  (LFADS_DEMO_OFFLINE=1); its last section draws a model trained here on the same fixture.

After editing a notebook, execute it into the stored file (both take a few minutes, most of
it the tutorial's training):

    .venv/bin/python tests/test_notebooks.py                  # both notebooks
    .venv/bin/python tests/test_notebooks.py lfads_tutorial   # or one: data_demo, lfads_tutorial

The stored files keep the outputs but no execution timings or kernel version, and the
temporary folders of the offline run are shown as /tmp/lfads_demo.
"""

import ast
import contextlib
import os
import re
import sys
import tempfile
from pathlib import Path

import nbformat
import pytest
from nbclient import NotebookClient

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:  # run as a script
    sys.path.insert(0, str(ROOT))
NOTEBOOKS = ("data_demo", "lfads_tutorial")
# figures inline; no progress bars, whose timings would change the stored text at every run
KERNEL_ENV = {"MPLBACKEND": "module://matplotlib_inline.backend_inline", "TQDM_DISABLE": "1"}
METADATA = {"kernelspec": {"display_name": "Python 3", "language": "python", "name": "python3"},
            "language_info": {"name": "python"}}
# the model data_demo.ipynb's last section draws: a few steps for the tests; for the stored
# outputs, enough that the rates show the stimulus response
DEMO_MODEL = ["--ic-enc-dim", "8", "--ci-enc-dim", "8", "--con-dim", "8", "--co-dim", "1",
              "--ic-dim", "4", "--gen-dim", "16", "--fac-dim", "4", "--batch-size", "16",
              "--threads", "1"]
DEMO_STEPS = {False: ["--max-steps", "4", "--n-samples", "2"],
              True: ["--max-steps", "300", "--eval-every", "50", "--n-samples", "20"]}
# a code cell with one of these, or ending in an expression, shows something
DRAWS = re.compile(r"plt\.|\.plot\(|print\(|display\(|show\(\)")


@contextlib.contextmanager
def environment(**env):
    """os.environ with `env` set (None: unset) for the block; kernels started in it inherit it."""
    old = {k: os.environ.get(k) for k in env}
    try:
        set_environ(env)
        yield
    finally:
        set_environ(old)


def set_environ(env: dict) -> None:
    for k, v in env.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = str(v)


def execute(name: str, timeout: int, **env) -> nbformat.NotebookNode:
    """The notebook `name` executed from the repository root; a cell's error raises."""
    nb = nbformat.read(ROOT / f"{name}.ipynb", as_version=4)
    with environment(**KERNEL_ENV, **env):
        NotebookClient(nb, timeout=timeout, kernel_name="python3", record_timing=False,
                       resources={"metadata": {"path": str(ROOT)}}).execute()
    return nb


def run_tutorial(tiny: bool, timeout: int = 900) -> nbformat.NotebookNode:
    return execute("lfads_tutorial", timeout, LFADS_TUTORIAL_TINY="1" if tiny else None)


def run_data_demo(tmp: Path, stored: bool, timeout: int = 600) -> nbformat.NotebookNode:
    """data_demo.ipynb offline, in `tmp`: HOME (ONE writes ~/.one), the notebook's temporary
    folder, and a model trained on the fixture's insertion as `python -m src.prep_data` and
    `python -m src.main` would make it, for the notebook's last section."""
    from one.api import ONE

    home, work = tmp / "home", tmp / "lfads_demo_run"
    home.mkdir(parents=True)
    try:
        with environment(HOME=home):
            run_dir = train_on_fixture(work, DEMO_MODEL + DEMO_STEPS[stored])
            return execute("data_demo", timeout, HOME=home, TMPDIR=tmp, LFADS_DEMO_OFFLINE="1",
                           LFADS_DEMO_RUN=run_dir)
    finally:
        ONE.cache_clear()  # ONE keeps its instances, which point into `tmp`


def train_on_fixture(work: Path, flags: list) -> Path:
    """The fixture's cache, its main insertion prepared with the defaults, a model trained on
    it and its lfads_output.h5 written (src.main's steps, without the analyses after them);
    the run folder."""
    import torch

    from src import main as cli
    from src.ibl import prep
    from src.ibl.fixture import make_local_cache

    info = make_local_cache(work / "one_cache")
    pid = info.pids["main"]
    args = ["--local", "--cache-dir", str(info.cache_dir), "--out-dir", str(work / "data"),
            "--pids", pid]
    assert prep.main(args) == 0
    args = cli.build_parser().parse_args(["--data-dir", str(work / "data"), "--ins", pid,
                                          "--results-dir", str(work / "results"),
                                          "--run", pid, *flags])
    threads = torch.get_num_threads()  # --threads sets the process' count
    try:
        sessions, mcfg, tcfg, run_dir, _ = cli.prepare(args)
        trainer = cli.build(sessions, mcfg, tcfg, run_dir, None, 0, 1, lambda *a, **k: None)
        trainer.fit()
        cli.export(trainer)
    finally:
        torch.set_num_threads(threads)
    return Path(run_dir)


# -----------------------------------------------------------------------------
# the stored form


def clean(nb: nbformat.NotebookNode, tmp: Path | None = None) -> nbformat.NotebookNode:
    """What is stored: the outputs as a reader saw them (a stream's consecutive pieces joined,
    progress bars at their last state), without timings or the kernel's version, and the
    temporary folders under `tmp` shown as /tmp/lfads_demo."""
    nb.metadata = nbformat.from_dict(METADATA)
    temp = re.compile(re.escape(str(tmp)) + r"/lfads_demo_\w+") if tmp else None
    for cell in nb.cells:
        cell.metadata.pop("execution", None)
        if cell.cell_type != "code":
            continue
        outputs = []
        for o in cell.outputs:
            if (o.output_type == "stream" and outputs and outputs[-1].output_type == "stream"
                    and outputs[-1].name == o.name):
                outputs[-1].text += o.text
            else:
                outputs.append(o)
        for o in outputs:
            if o.output_type == "stream":
                # what a terminal shows: each line's text after its last carriage return
                o.text = "\n".join(line.rsplit("\r", 1)[-1] for line in o.text.split("\n"))
            for key in ("text", "text/plain", "text/html"):
                field = o if key == "text" else o.get("data", {})
                if temp and isinstance(field.get(key), str):
                    field[key] = temp.sub("/tmp/lfads_demo", field[key])
        cell.outputs = [o for o in outputs if o.output_type != "stream" or o.text.strip()]
    return nb


def shows_something(source: str) -> bool:
    """A code cell that draws or prints, or whose last statement is an expression."""
    if DRAWS.search(source):
        return True
    try:
        body = ast.parse(source).body
    except SyntaxError:  # IPython syntax (magics): judged by the patterns alone
        return False
    return bool(body) and isinstance(body[-1], ast.Expr) and not source.rstrip().endswith(";")


def texts(nb) -> str:
    """Every text output of a notebook, joined."""
    out = []
    for cell in nb.cells:
        for o in cell.get("outputs", []):
            out.append(o.get("text", ""))
            out.extend(v for k, v in o.get("data", {}).items() if k.startswith("text/"))
    return "\n".join(out)


# -----------------------------------------------------------------------------
# tests


def test_tutorial_runs_tiny():
    nb = run_tutorial(tiny=True, timeout=300)
    text = texts(nb)
    assert "stopped at step 8 (max_steps)" in text
    assert "r2_heldout" in text and "co_bps" in text  # the metrics of the rates


def test_data_demo_runs_offline(tmp_path):
    pytest.importorskip("one.api", reason="the IBL stack: ./setup.sh --dev")
    text = texts(clean(run_data_demo(tmp_path, stored=False, timeout=300), tmp_path))
    assert "1 ok, 0 skipped, 0 failed" in text
    assert "rates (" in text  # the trained run was found and drawn
    assert str(tmp_path) not in text


@pytest.mark.parametrize("name", NOTEBOOKS)
def test_stored_with_outputs(name):
    """Every cell that shows something has its output stored, none an error, and nothing of
    the machine that ran it: timings, the repository's place, temporary folders."""
    nb = nbformat.read(ROOT / f"{name}.ipynb", as_version=4)
    nbformat.validate(nb)
    code = [c for c in nb.cells if c.cell_type == "code"]
    missing = [i for i, c in enumerate(code) if shows_something(c.source) and not c.outputs]
    assert not missing, f"{name}.ipynb: code cells {missing} (counting code cells from 0) " \
                        f"have no stored output; run `python tests/test_notebooks.py {name}`"
    errors = [o.get("ename") for c in code for o in c.outputs if o.output_type == "error"]
    assert not errors, f"{name}.ipynb stores errors: {errors}"
    assert all("execution" not in c.metadata for c in nb.cells)
    text = texts(nb)
    for noise in (str(ROOT), "lfads_demo_", "lfads_tutorial_"):
        assert noise not in text, f"{name}.ipynb's outputs show {noise!r}"


def test_shows_something():
    assert shows_something("fig, ax = plt.subplots()")
    assert shows_something("x = 1\nx")
    assert shows_something("trials.head()")
    assert not shows_something("x = 1")
    assert not shows_something("import os\ndef f():\n    return 1")
    assert not shows_something("x = 1\nx;")


# -----------------------------------------------------------------------------
# python tests/test_notebooks.py [name ...]: store the outputs


def main(names: list[str]) -> int:
    unknown = set(names) - set(NOTEBOOKS)
    if unknown:
        print(f"unknown notebooks {sorted(unknown)}; choose from {NOTEBOOKS}", file=sys.stderr)
        return 2
    for name in names or NOTEBOOKS:
        with tempfile.TemporaryDirectory() as tmp:
            tmp = Path(tmp).resolve()
            nb = run_data_demo(tmp, stored=True) if name == "data_demo" else \
                run_tutorial(tiny=False)
            nbformat.write(clean(nb, tmp), ROOT / f"{name}.ipynb")
        print(f"wrote {name}.ipynb with its outputs")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
