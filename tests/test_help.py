"""Every command's --help reads the same way: each flag listed once, dashed, with a description
and a readable value name; an underscore spelling still parses but is not listed; a misspelt
flag is answered with the nearest one, in one line."""

import argparse
import importlib
import importlib.util
import re

import pytest

from src import bench

# command -> (module with build_parser, argv of its main() before the flags)
COMMANDS = {"src.main": ("src.main", []), "src.tune": ("src.tune", []),
            "src.prep_data": ("src.ibl.prep", []),
            "src.synth": ("src.synth", ["lorenz", "--out", "x.h5"])}
COMMANDS.update({f"src.bench {name}": (module, [name]) for name, module in bench.BENCHES.items()})
# the commands whose flags a misspelling is checked against (FlagParser's nearest flag)
for extra, before in (("src.decode", ["results/run"]), ("src.prep_nwb", ["file.nwb"])):
    if importlib.util.find_spec(extra):
        COMMANDS[extra] = (extra, before)  # their required arguments, so that the flag is read
NEAREST = list(COMMANDS)

ENTRY = re.compile(r"^  (-\S+(?: \S+)*)(?: {2,}(.*))?$")  # "  --flag VALUE  description"


def run_main(command: str, argv: list, capsys) -> tuple:
    """Exit code, stdout and stderr of the command's main() on argv."""
    module, before = COMMANDS[command]
    main = bench.main if command.startswith("src.bench") else importlib.import_module(module).main
    capsys.readouterr()
    with pytest.raises(SystemExit) as e:
        main([*before, *argv])
    out, err = capsys.readouterr()
    return e.value.code, out, err


def help_entries(text: str) -> dict:
    """{invocation: description} of the options and positional arguments --help lists."""
    entries, current = {}, None
    lines = text.split("\n")
    start = next(i for i, ln in enumerate(lines) if ln.startswith(("options:", "positional")))
    for ln in lines[start:]:
        m = ENTRY.match(ln)
        if m:
            current = m[1]
            entries[current] = m[2] or ""
        elif ln.startswith("   ") and current is not None:  # a description's next line
            entries[current] += " " + ln.strip()
        elif ln.startswith("  ") and not ln.startswith("   "):  # a positional argument
            name, _, desc = ln.strip().partition("  ")
            current = name
            entries[current] = desc.strip()
        else:
            current = None
    return entries


def visible_and_hidden(command: str) -> tuple:
    """The parser, its listed flags and its unlisted spellings."""
    p = importlib.import_module(COMMANDS[command][0]).build_parser()
    visible = {s for a in p._actions if a.help != argparse.SUPPRESS for s in a.option_strings}
    hidden = {s for a in p._actions if a.help == argparse.SUPPRESS for s in a.option_strings}
    return p, visible, hidden


@pytest.mark.parametrize("command", COMMANDS)
def test_help_lists_each_flag_once_dashed_and_described(command, capsys):
    code, out, _ = run_main(command, ["--help"], capsys)
    assert code == 0
    entries = help_entries(out)
    listed = [f for inv in entries for f in re.findall(r"(?:^|, )(--?[\w-]+)", inv)]
    assert len(listed) == len(set(listed)), f"listed twice: {listed}"
    p, visible, _ = visible_and_hidden(command)
    assert set(listed) == visible  # the parser's flags, all of them, and no hidden spelling
    assert not [f for f in listed if "_" in f], "an underscore spelling is listed"
    empty = [inv for inv, desc in entries.items() if len(desc.strip()) < 5]
    assert not empty, f"without a description: {empty}"
    values = {w for inv in entries for w in inv.replace(",", " ").split()
              if not w.startswith("-")}
    assert not {"PARSE_BOOL", "STR"} & values, values
    # each unlisted spelling sets what a listed flag sets: another name, not a flag of its own
    dests = lambda shown: {a.dest for a in p._actions  # noqa: E731
                           if (a.help != argparse.SUPPRESS) == shown and a.option_strings}
    assert dests(False) <= dests(True)


@pytest.mark.parametrize("command, old, new, value", [
    ("src.tune", "--generation_epochs", "--generation-epochs", "3"),
    ("src.tune", "--burn_in_epochs", "--burn-in-epochs", "7"),
    ("src.tune", "--max_steps", "--max-steps", "40"),
    ("src.tune", "--max_minutes", "--max-minutes", "2.5"),
    ("src.bench panel", "--max_minutes", "--max-minutes", "3"),
])
def test_an_underscore_spelling_still_parses_as_the_dashed_flag(command, old, new, value):
    p, visible, hidden = visible_and_hidden(command)
    assert old in hidden and new in visible
    assert vars(p.parse_args([old, value])) == vars(p.parse_args([new, value]))
    assert vars(p.parse_args([new, value])) != vars(p.parse_args([]))  # the value is taken


@pytest.mark.parametrize("command", NEAREST)
def test_a_misspelt_flag_gets_the_nearest_one(command, capsys):
    _, visible, _ = visible_and_hidden(command)
    flag = max(sorted(visible), key=len)  # the longest: its misspelling is near nothing else
    code, _, err = run_main(command, [flag[:-1]], capsys)
    assert code == 2 and err.count("\n") == 1, err
    assert f"unknown flag {flag[:-1]}; did you mean {flag}?" in err


def test_src_tune_suggests_the_flags_of_src_main_that_it_passes_on(capsys):
    code, _, err = run_main("src.tune", ["--data", "x.h5", "--kl-ic-scal", "1"], capsys)
    assert code == 2 and "unknown flag --kl-ic-scal; did you mean --kl-ic-scale?" in err
