"""No measured figure is written into the docs from a script's source.

scripts/*.py write docs/*.md; every number they write must come from the run that writes it
(or be quoted from a results file in the repository, with its date, commit and command).
This looks through every string literal of scripts/*.py (docstrings excepted: they are not
written to docs) for the signatures of a measurement: a ratio with its range, a time of day,
a date, a hostcall count, a cost in µs or ns. A figure computed at run time is an f-string
expression, not part of a literal, and is not matched.
"""

import ast
import re
from pathlib import Path

import pytest

import harness

SCRIPTS = sorted((harness.ROOT / "scripts").glob("*.py"))

# The incident the replay is about happened on a date that does not change.
ALLOWED = {"2020-06-11"}

MEASURED = {
    "ratio with a range": re.compile(r"\b\d+\.\d+x \(\d"),
    "ratio by proxy CPU": re.compile(r"\b\d+\.\d+x (by|of) (proxy CPU|the no-op)"),
    "time of day": re.compile(r"\b\d\d:\d\d(\s*[-–]\s*\d\d:\d\d)?\s*UTC|\b\d\d:\d\d\s*[-–]\s*\d\d:\d\d\b"),
    "date": re.compile(r"\b20\d\d-\d\d-\d\d\b"),
    "hostcall count": re.compile(r"\b\d+(\.\d+)? (hostcalls|allocation callbacks)\b"),
    "cost in µs or ns": re.compile(r"(?<![<>] )\b\d+(\.\d+)? ?(µs|ns)\b"),
}


def literals(source: str) -> list[tuple[int, str]]:
    """(line, text) of every string constant but docstrings, f-strings' literal parts included."""
    tree = ast.parse(source)
    docstrings = set()
    for node in ast.walk(tree):
        if isinstance(node, (ast.Module, ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            first = node.body[0] if node.body else None
            if isinstance(first, ast.Expr) and isinstance(first.value, ast.Constant):
                docstrings.add(id(first.value))
    return [(node.lineno, node.value) for node in ast.walk(tree)
            if isinstance(node, ast.Constant) and isinstance(node.value, str) and id(node) not in docstrings]


def figures(source: str) -> list[str]:
    found = []
    for line, text in literals(source):
        for what, pattern in MEASURED.items():
            for m in pattern.finditer(text):
                if m.group(0) not in ALLOWED:
                    found.append(f"line {line}: {what}: ...{text[max(0, m.start() - 50):m.end() + 30]!r}")
    return found


@pytest.mark.parametrize("script", SCRIPTS, ids=[s.name for s in SCRIPTS])
def test_no_measured_figure_in_script_source(script):
    found = figures(script.read_text())
    assert not found, (f"{script.relative_to(harness.ROOT)} writes figures that its run did not measure "
                       "(compute them, or quote a results file in the repository):\n" + "\n".join(found))


def test_the_check_catches_what_the_bench_once_wrote():
    planted = '''
NOTE = """this build with reuse off ran at 0.88x (0.85-0.89) of the no-op filter, 0.86x by proxy CPU
(shared-core duel, 8 runs of 3 s, 2026-11-26 02:26 UTC): 21 hostcalls and 9 allocation callbacks
per tick; `reply/overloaded_503` 262 ns"""
rate = 3.2
ok = f"ran at {rate:.2f}x ({rate:.2f}-{rate:.2f}) with {rate:g} hostcalls"
'''
    found = " ".join(figures(planted))
    for what in MEASURED:
        assert what in found, (what, found)
    assert "line 6" not in found, found  # the f-string's figures come from the run
    assert figures('TARGET = "pass path >= 0.90x the no-op filter, decision < 1 µs, on 2020-06-11"') == []
