"""The README's file map states every file's line count; keep it true.

    python tests/test_readme.py      # rewrite the counts in README.md after editing files
"""

import re
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
ROW = re.compile(r"^\| `(?P<path>[^`]+)` \| (?P<lines>\d+) \|", re.M)


def line_count(path: Path) -> int:
    if path.suffix == ".ipynb":  # the source of its cells, not the JSON around it
        import json

        cells = json.loads(path.read_text())["cells"]
        return sum(len("".join(c["source"]).splitlines()) for c in cells)
    return len(path.read_text().splitlines())


def rows(text: str):
    return [(m["path"], int(m["lines"])) for m in ROW.finditer(text)]


def test_file_map_is_complete_and_current():
    text = (ROOT / "README.md").read_text()
    listed = dict(rows(text))
    assert listed, "README.md has no file map rows"
    stale = {p: (n, line_count(ROOT / p)) for p, n in listed.items()
             if not (ROOT / p).is_file() or line_count(ROOT / p) != n}
    assert not stale, f"README file map is stale (listed, actual): {stale}; " \
                      "run `python tests/test_readme.py`"
    code = {str(p.relative_to(ROOT)) for d in ("src", "tests") for p in (ROOT / d).glob("*.py")
            if p.name != "__init__.py"}
    missing = code - set(listed)
    assert not missing, f"files missing from the README file map: {sorted(missing)}"


if __name__ == "__main__":
    readme = ROOT / "README.md"
    new = ROW.sub(lambda m: f"| `{m['path']}` | {line_count(ROOT / m['path'])} |",
                  readme.read_text())
    readme.write_text(new)
    print("\n".join(f"{p}: {n}" for p, n in rows(new)), file=sys.stderr)
