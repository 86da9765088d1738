"""No module of src imports one that imports it back, directly or through others, counting
the imports inside functions too: a circle makes the order of imports matter and hides which
module is the lower one."""

import ast
import os

from tests.conftest import ROOT


def src_modules() -> dict:
    """{module name: file} of every module under src/."""
    found = {}
    for folder, _, files in os.walk(os.path.join(ROOT, "src")):
        for f in files:
            if f.endswith(".py"):
                path = os.path.join(folder, f)
                name = os.path.relpath(path, ROOT)[:-3].replace(os.sep, ".")
                found[name.removesuffix(".__init__")] = path
    return found


def imports(path: str, modules: dict) -> set:
    """The src modules a file imports anywhere in it (module level or in a function)."""
    out = set()
    for node in ast.walk(ast.parse(open(path).read())):
        if isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            out.add(node.module)
            out.update(f"{node.module}.{a.name}" for a in node.names)  # from src import plots
        elif isinstance(node, ast.Import):
            out.update(a.name for a in node.names)
    return {m for m in out if m in modules}


def circles(graph: dict) -> list[list[str]]:
    """Each module from which a path of imports leads back to it, with that path."""
    found = []
    for start in sorted(graph):
        stack, seen = [(start, [start])], set()
        while stack:
            node, path = stack.pop()
            for nxt in sorted(graph[node]):
                if nxt == start:
                    found.append(path + [start])
                elif nxt not in seen:
                    seen.add(nxt)
                    stack.append((nxt, path + [nxt]))
    return found


def test_the_circle_finder_finds_a_circle():
    assert circles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}})[0] == ["a", "b", "c", "a"]
    assert circles({"a": {"b"}, "b": set()}) == []


def test_no_src_module_imports_one_that_imports_it_back():
    modules = src_modules()
    graph = {m: imports(p, modules) - {m} for m, p in modules.items()}
    assert graph["src.main"] and "src.runs" in graph["src.chop"]  # the finder sees imports
    assert circles(graph) == []
