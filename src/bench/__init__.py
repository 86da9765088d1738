"""Benchmarks, one command each; every number they print is measured in that run.

    python -m src.bench quality [...]   # does it recover the truth? (src/bench/quality.py)
    python -m src.bench speed [...]     # how fast is a training step? (src/bench/speed.py)
    python -m src.bench panel [...]     # defaults on data never tuned on? (src/bench/panel.py)
    python -m src.bench tune [...]      # does a search beat them? (src/bench/tune.py)
    python -m src.bench media [...]     # the figures of media/ and the README (src/bench/media.py)

`python -m src.bench <name> --help` lists each one's flags.
"""

import importlib
import sys

BENCHES = {"quality": "src.bench.quality", "speed": "src.bench.speed",
           "panel": "src.bench.panel", "tune": "src.bench.tune", "media": "src.bench.media"}


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] in (["-h"], ["--help"]):  # asked for: the list, and success
        print(__doc__.strip())
        return 0
    if not argv or argv[0] not in BENCHES:
        print(__doc__.strip(), file=sys.stderr)
        return 2
    return importlib.import_module(BENCHES[argv[0]]).main(argv[1:]) or 0
