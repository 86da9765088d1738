"""Every `python -m src...` command that README.md and docs/ show parses against its command's
own parser: a flag the code does not have, or a value it refuses, fails here, not for a reader.
The commands are parsed, not run."""

import argparse
import glob
import importlib
import os
import re
import shlex

import pytest

from tests.conftest import ROOT

DOCS = [os.path.join(ROOT, "README.md"), *sorted(glob.glob(os.path.join(ROOT, "docs", "*.md")))]
COMMAND = re.compile(r"-m (src(?:\.\w+)+)((?: +[^\s`|&;>#]+)*)")


class Parsed(Exception):
    """Raised instead of running: the flags parsed."""


def shown(text: str) -> list[str]:
    """The commands in a Markdown text: in code blocks (lines continued by a backslash joined)
    and in inline code with a flag (a span may wrap over lines; one without a flag names the
    command in prose: `python -m src.decode` re-scores a run)."""
    blocks = re.findall(r"^```[^\n]*\n(.*?)^```", text, re.S | re.M)
    lines = [ln.split(" #")[0] for b in blocks for ln in b.replace("\\\n", " ").splitlines()]
    spans = re.findall(r"`([^`]+)`", re.sub(r"^```.*?^```", "", text, flags=re.S | re.M))
    spans = [" ".join(s.split()) for s in spans]
    return lines + [s for s in spans if " -" in s.split("-m ", 1)[-1]]


def commands() -> list[tuple[str, str, list[str]]]:
    """(file, module, argv) of every command shown; placeholders such as <run> become 1."""
    found = set()
    for path in DOCS:
        for piece in shown(open(path).read()):
            for module, rest in COMMAND.findall(re.sub(r"<[^>]*>", "1", piece)):
                argv = [a for a in shlex.split(rest) if a not in ("...", "[...]")]
                found.add((os.path.relpath(path, ROOT), module, tuple(argv)))
    return [(f, m, list(a)) for f, m, a in sorted(found)]


def parse_only(self, args=None, namespace=None):
    """ArgumentParser.parse_known_args that parses, then stops the command."""
    raise Parsed(ORIGINAL(self, args, namespace))


ORIGINAL = argparse.ArgumentParser.parse_known_args


def test_the_docs_show_commands():
    modules = {m for _, m, _ in commands()}
    assert {"src.main", "src.bench", "src.synth", "src.tune", "src.prep_data"} <= modules


@pytest.mark.parametrize("where,module,argv", commands(),
                         ids=lambda x: " ".join(x) if isinstance(x, list) else str(x))
def test_a_command_in_the_docs_parses(where, module, argv, monkeypatch):
    monkeypatch.setattr(argparse.ArgumentParser, "parse_known_args", parse_only)
    main = importlib.import_module(module).main
    try:
        main(argv)
    except SystemExit as e:  # --help exits 0; a flag or a value refused, 2
        assert e.code == 0 and "--help" in argv, f"{where}: python -m {module} {' '.join(argv)}"
        return
    except Parsed as parsed:
        _, extra = parsed.args[0]
    else:
        raise AssertionError(f"{where}: python -m {module} {' '.join(argv)} parsed nothing")
    if module == "src.tune":  # the search passes the flags it does not know to each member
        from src.main import build_parser

        monkeypatch.setattr(argparse.ArgumentParser, "parse_known_args", ORIGINAL)
        extra = build_parser().parse_known_args(["--data", "x", *extra])[1]
    assert extra == [], f"{where}: python -m {module} {' '.join(argv)}"


def flag_spans() -> list[tuple[str, str]]:
    """(file, span) of inline code that gives one of src.main's flags, with or without a value:
    `--no-readin-train`, `--lr-patience 3`."""
    from src.main import build_parser

    takes = {s: a.nargs != 0 for a in build_parser()._actions for s in a.option_strings}
    found = set()
    for path in DOCS:
        text = re.sub(r"^```.*?^```", "", open(path).read(), flags=re.S | re.M)
        for span in re.findall(r"`(--[\w-]+(?: [^`\s]+)?)`", text):
            flag = span.split()[0]  # a flag that takes a value, named alone, is a mention
            if flag in takes and flag != "--help" and (" " in span or not takes[flag]):
                found.add((os.path.relpath(path, ROOT), re.sub(r"<[^>]*>", "1", span)))
    return sorted(found)


def test_the_flags_the_docs_give_parse():
    from src.main import build_parser

    spans = flag_spans()
    assert len(spans) > 20
    bad = [(f, s) for f, s in spans if build_parser().parse_known_args(s.split())[1]]
    assert bad == []
