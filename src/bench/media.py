"""`python -m src.bench media`: the figures of media/ and the README, regenerated.

Runs the quick start (`python -m src.main --data eg_data/lorenz.h5 --run quickstart`, the
README's numbers) and the stitching example of docs/stitching.md (three synthetic Lorenz
sessions), then copies their figures into media/. The quality bench's figures
(media/quality_*.png) come from `python -m src.bench quality`.
"""

import argparse
import os
import sys

from src import main as lfads_main
from src.synth import LorenzConfig, make_lorenz, write_session
from src.utils import FlagParser, atomic_copy

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
QUICKSTART = ("curves.png", "rates.png", "factors.png", "inputs.png", "truth.png")


def build_parser() -> argparse.ArgumentParser:
    p = FlagParser(prog="python -m src.bench media", description=__doc__)
    p.add_argument("--results-dir", default="results", help="where the two runs go "
                   "(default: results)")
    p.add_argument("--media", default=os.path.join(ROOT, "media"), help="where the figures go "
                   "(default: the repository's media/)")
    p.add_argument("--only", choices=("quickstart", "stitch"), help="regenerate one set only")
    return p


def quickstart(results: str, media: str) -> int:
    argv = ["--data", os.path.join(ROOT, "eg_data", "lorenz.h5"), "--results-dir", results,
            "--run", "quickstart", "--overwrite"]
    print(f"== python -m src.main {' '.join(argv)}", flush=True)
    code = lfads_main.main(argv)
    for name in QUICKSTART if code == 0 else ():
        atomic_copy(os.path.join(results, "quickstart", name), os.path.join(media, name))
    return code


def stitch(results: str, media: str) -> int:
    data = os.path.join(results, "stitch_data")
    os.makedirs(data, exist_ok=True)
    for s in (1, 2, 3):  # docs/stitching.md: --readout-seed s --neurons 10 s + 10
        n = 10 * s + 10
        cfg = LorenzConfig(readout_seed=s, n_neurons=n, n_heldout=n // 4)
        write_session(os.path.join(data, f"s{s}.h5"), *make_lorenz(cfg))
    argv = ["--data", os.path.join(data, "*.h5"), "--results-dir", results, "--run", "stitch",
            "--overwrite"]
    print(f"== python -m src.main {' '.join(argv)}", flush=True)
    code = lfads_main.main(argv)
    if code == 0:
        atomic_copy(os.path.join(results, "stitch", "factors_shared.png"),
                    os.path.join(media, "stitch_factors_shared.png"))
    return code


def main(argv=None) -> int:
    a = build_parser().parse_args(argv)
    os.makedirs(a.media, exist_ok=True)
    for name, make in (("quickstart", quickstart), ("stitch", stitch)):
        if a.only in (None, name) and make(a.results_dir, a.media) != 0:
            return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
