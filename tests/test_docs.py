"""The documentation stands on its own: every relative link in README.md and docs/*.md reaches
a file of the repository (and, with #anchor, a heading of it), every repository path cited in
backticks exists, every document in docs/ is linked from the README, and no file refers to
notes outside the repository.

Backticked paths are checked when they look like files of the repository (src/..., tests/...,
docs/..., media/..., eg_data/..., bench/..., .ci/..., or a top-level file) and hold no
placeholder (<run>, *, {train,valid}): paths a user creates, such as results/<run>/ or
data/<pid>.h5, are not the repository's.
"""

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
LINK = re.compile(r"!?\[[^\]]*\]\(([^)\s]+)\)")  # [text](target) and ![alt](target)
CODE = re.compile(r"`([^`\n]+)`")
PREFIXES = ("src/", "tests/", "docs/", "media/", "eg_data/", "bench/", ".ci/")
TOP_LEVEL = {"README.md", "setup.sh", "pyproject.toml", "data_demo.ipynb", ".gitignore"}
# spelt in two parts, so that this file does not mention them itself
OUTSIDE = ("DESIGN" ".md", "../" "shared")
CHECKED = ["src", "tests", "docs", "README.md", "setup.sh", "pyproject.toml", "data_demo.ipynb"]


def rel(path: Path) -> str:
    return str(path.relative_to(ROOT))


def prose(text: str) -> str:
    """The text without fenced code blocks (indented ones hold no backticks or links)."""
    return re.sub(r"^```.*?^```", "", text, flags=re.M | re.S)


def anchors(md: Path) -> set:
    """GitHub's anchors of a markdown file's headings: lower case, punctuation dropped,
    spaces as hyphens, a repeated heading numbered -1, -2, ..."""
    seen, out = {}, set()
    for m in re.finditer(r"^#{1,6} +(.+?) *#*$", prose(md.read_text()), re.M):
        slug = re.sub(r"[^\w\- ]", "", m[1].strip().lower()).replace(" ", "-")
        n = seen.get(slug, 0)
        seen[slug] = n + 1
        out.add(slug if n == 0 else f"{slug}-{n}")
    return out


def links(md: Path):
    for target in LINK.findall(prose(md.read_text())):
        if not re.match(r"[a-z][a-z0-9+.-]*:", target):  # http:, https:, mailto: are not ours
            yield target


def cited_paths(md: Path):
    for code in CODE.findall(prose(md.read_text())):
        for word in code.split():
            if (word.startswith(PREFIXES) or word in TOP_LEVEL) and not set("<*{$") & set(word):
                yield word


@pytest.mark.parametrize("md", DOCS, ids=rel)
def test_links_reach_files_and_headings(md):
    bad = []
    for target in links(md):
        path, _, anchor = target.partition("#")
        dest = (md.parent / path).resolve() if path else md
        if not dest.is_relative_to(ROOT) or not dest.exists():
            bad.append(f"{target}: no such file in the repository")
        elif anchor and (dest.suffix != ".md" or anchor not in anchors(dest)):
            bad.append(f"{target}: {rel(dest)} has no heading '#{anchor}'")
    assert not bad, f"{rel(md)}: broken links: {bad}"


@pytest.mark.parametrize("md", DOCS, ids=rel)
def test_cited_repository_paths_exist(md):
    missing = sorted({p for p in cited_paths(md) if not (ROOT / p.rstrip("/")).exists()})
    assert not missing, f"{rel(md)} cites paths that do not exist: {missing}"


def test_every_document_is_linked_from_the_readme():
    readme = ROOT / "README.md"
    linked = {(ROOT / t.partition("#")[0]).resolve() for t in links(readme)}
    orphans = [rel(d) for d in DOCS[1:] if d.resolve() not in linked]
    assert not orphans, f"docs not linked from README.md: {orphans}"


def checked_files():
    for name in CHECKED:
        path = ROOT / name
        files = sorted(path.rglob("*")) if path.is_dir() else [path]
        yield from (f for f in files if f.is_file() and "__pycache__" not in f.parts)


@pytest.mark.parametrize("path", list(checked_files()), ids=rel)
def test_nothing_refers_outside_the_repository(path):
    text = path.read_text(errors="replace")
    found = [s for s in OUTSIDE if s in text]
    assert not found, f"{rel(path)} mentions {found}: cite docs/ (or the README) instead"


def test_the_checks_see_links_paths_and_anchors():
    """The parsers find what they should in the README, so the tests above are not vacuous."""
    readme = ROOT / "README.md"
    assert "docs/design.md#the-session-file" in set(links(readme))
    assert "src/model.py" in set(cited_paths(readme))
    assert "results/<run>/" not in set(cited_paths(readme))
    assert "what-lfads-is" in anchors(readme)
