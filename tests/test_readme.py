"""The line counts in docs/files.md and the README's reading path stay true.

    python tests/test_readme.py      # rewrite the counts after editing files
"""

import re
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
ROW = re.compile(r"^\| `(?P<path>[^`]+)` \| (?P<lines>\d+) \|", re.M)
TOTAL = re.compile(r"\*\*(?P<files>\d+) files, (?P<lines>[\d,]+) lines\*\*")


def line_count(path: Path) -> int:
    if path.suffix == ".ipynb":  # the source of its cells, not the JSON around it
        import json

        cells = json.loads(path.read_text())["cells"]
        return sum(len("".join(c["source"]).splitlines()) for c in cells)
    return len(path.read_text().splitlines())


def rows(text: str):
    return [(m["path"], int(m["lines"])) for m in ROW.finditer(text)]


def test_file_map_is_complete_and_current():
    listed = dict(rows((ROOT / "docs" / "files.md").read_text()))
    stale = {p: (n, line_count(ROOT / p)) for p, n in listed.items()
             if not (ROOT / p).is_file() or line_count(ROOT / p) != n}
    assert not stale, f"docs/files.md is stale (listed, actual): {stale}; " \
                      "run `python tests/test_readme.py`"
    code = {str(p.relative_to(ROOT)) for d in ("src", "tests") for p in (ROOT / d).rglob("*.py")
            if line_count(p) > 0}
    missing = code - set(listed)
    assert not missing, f"files missing from docs/files.md: {sorted(missing)}"


def test_the_readme_reading_path_is_what_a_default_run_imports():
    from tests.reading_path import reading_path

    measured = [(f, n) for f, n in reading_path() if n > 0]  # the empty src/__init__.py aside
    text = (ROOT / "README.md").read_text()
    assert dict(rows(text)) == dict(measured)
    total = TOTAL.search(text)
    assert (int(total["files"]), int(total["lines"].replace(",", ""))) == (
        len(measured), sum(n for _, n in measured))


def rewrite(path: Path, measured=None) -> str:
    counts = dict(measured or [])
    def count(m):
        p = m["path"]
        n = counts.get(p) or (line_count(ROOT / p) if (ROOT / p).is_file() else m["lines"])
        return f"| `{p}` | {n} |"

    new = ROW.sub(count, path.read_text())
    if measured:
        new = TOTAL.sub(f"**{len(measured)} files, {sum(counts.values()):,} lines**", new)
    path.write_text(new)
    return new


if __name__ == "__main__":
    sys.path.insert(0, str(ROOT))
    from tests.reading_path import reading_path

    rewrite(ROOT / "docs" / "files.md")
    rewrite(ROOT / "README.md", [(f, n) for f, n in reading_path() if n > 0])
    print("rewrote the counts of docs/files.md and README.md", file=sys.stderr)
