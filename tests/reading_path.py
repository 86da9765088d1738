"""The reading path: our modules that a default single-session run imports, with their lines.

    .venv/bin/python tests/reading_path.py

runs `python -m src.main` in this process on the example session with the default settings
but a 2-step ceiling (same code path: new run, one session, one process, figures), into a
temporary folder, and lists every `src` file it imported. tests/test_readme.py checks the
README's table against it.
"""

import json
import os
import subprocess
import sys
import tempfile

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def reading_path() -> list[tuple[str, int]]:
    """[(path relative to the repository, lines)] of the src files a default run imports,
    measured in a fresh interpreter (this one may have imported more already)."""
    out = subprocess.run([sys.executable, os.path.abspath(__file__), "--json"], cwd=ROOT,
                         capture_output=True, text=True, check=True).stdout
    return [tuple(row) for row in json.loads(out.strip().splitlines()[-1])]


def measure() -> list[tuple[str, int]]:
    sys.path.insert(0, ROOT)
    from src.main import main

    with tempfile.TemporaryDirectory() as out:
        argv = ["--data", os.path.join(ROOT, "eg_data", "lorenz.h5"), "--results-dir", out,
                "--max-steps", "2", "--eval-every", "1", "--n-samples", "1"]
        assert main(argv) == 0
    files = sorted({os.path.relpath(m.__file__, ROOT) for name, m in list(sys.modules.items())
                    if (name == "src" or name.startswith("src.")) and getattr(m, "__file__", None)})
    return [(f, sum(1 for _ in open(os.path.join(ROOT, f)))) for f in files]


if __name__ == "__main__":
    if sys.argv[1:] == ["--json"]:
        files = measure()
        print(json.dumps(files))
        sys.exit(0)
    files = reading_path()
    print()
    for f, n in files:
        print(f"{n:5d}  {f}")
    print(f"{sum(n for _, n in files):5d}  in {sum(n > 0 for _, n in files)} files with code "
          f"({len(files)} modules with the empty src/__init__.py)")
