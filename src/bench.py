"""Benchmarks, one command each; every number they print is measured in that run.

    python -m src.bench quality [...]   # does it recover the truth? (src/bench_quality.py)
    python -m src.bench speed [...]     # how fast is a training step? (src/bench_speed.py)
    python -m src.bench panel [...]     # defaults on data never tuned on? (src/bench_panel.py)
    python -m src.bench tune [...]      # does a search beat them? (src/bench_tune.py)

`python -m src.bench <name> --help` lists each one's flags.
"""

import importlib
import sys

BENCHES = {"quality": "src.bench_quality", "speed": "src.bench_speed",
           "panel": "src.bench_panel", "tune": "src.bench_tune"}


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0] not in BENCHES:
        print(__doc__.strip(), file=sys.stderr)
        return 2
    return importlib.import_module(BENCHES[argv[0]]).main(argv[1:]) or 0


if __name__ == "__main__":
    sys.exit(main())
