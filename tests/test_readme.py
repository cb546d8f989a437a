"""Every command the README gives works as written from the repository root.

Commands are the lines of its ```sh blocks and the inline code spans that start with
`make`, `envoy`, `cargo`, `scripts/` or `.venv/bin/`. A `make` target must exist (`make -n`);
the ones that are quick and need nothing beyond `make build` (RUN_HERE) run for real, and so
does every other command: a README that gives a command that does not work fails here.
"""

import os
import re
import subprocess

import pytest

import harness

README = harness.ROOT / "README.md"
RUN_HERE = {"validate"}
COMMAND_WORDS = ("make", "envoy", "cargo")
COMMAND_PREFIXES = ("scripts/", ".venv/bin/", "./")


def readme_commands(text: str) -> list[str]:
    commands = []
    for block in re.findall(r"```(?:sh|bash|console)\n(.*?)```", text, re.S):
        for line in block.splitlines():
            line = line.split("#", 1)[0].strip()
            if line:
                commands.append(line)
    prose = re.sub(r"```.*?```", "", text, flags=re.S)
    for span in re.findall(r"`([^`\n]+)`", prose):
        first = span.split()[0]
        if first in COMMAND_WORDS or first.startswith(COMMAND_PREFIXES):
            commands.append(span.strip())
    return list(dict.fromkeys(commands))


COMMANDS = readme_commands(README.read_text())


def run(command: str, timeout: float) -> subprocess.CompletedProcess:
    env = dict(os.environ)
    env["PATH"] = f"{harness.ROOT / '.venv/bin'}:{harness.ROOT / '.tools/bin'}:{env['PATH']}"
    return subprocess.run(command, shell=True, cwd=harness.ROOT, env=env, capture_output=True,
                          text=True, timeout=timeout)


def test_the_readme_gives_a_validate_command():
    assert any("validate" in c for c in COMMANDS), COMMANDS
    assert {"make test", "make demo"} <= set(COMMANDS), COMMANDS


def test_the_extraction_finds_commands_and_skips_prose():
    text = ("Run `make demo`, then `envoy --mode validate -c x.yaml`; see `envoy/sidecar.yaml`,"
            " `x-envoy-overloaded: true`.\n```sh\nmake test   # everything\n```\n")
    assert readme_commands(text) == ["make test", "make demo", "envoy --mode validate -c x.yaml"]


def is_script(words: list[str]) -> bool:
    """A replay, benchmark or soak script: minutes long, and a full run records its results
    in docs/ (a test must not rewrite committed files)."""
    script = words[1] if words[0].endswith("python") and len(words) > 1 else words[0]
    return script.startswith("scripts/") and script.endswith(".py")


@pytest.mark.parametrize("command", COMMANDS)
def test_readme_command_works(command):
    words = command.split()
    if words[0] == "make":
        targets = [w for w in words[1:] if not w.startswith("-") and "=" not in w]
        for target in targets:
            dry = run(f"make -n {target}", 60)
            assert dry.returncode == 0, f"{command}: {dry.stderr[-2000:]}"
        if not set(targets) <= RUN_HERE:
            return  # long runs (make test, demo, bench, soak, fuzz) are run elsewhere
    elif is_script(words):
        # It runs as written (executable, imports, arguments parse); the run itself is
        # the demo's and the benchmarks' business.
        command += " --help"
    result = run(command, 600)
    assert result.returncode == 0, f"{command}:\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}"


def test_the_readme_states_the_wasm_size_of_this_build():
    """The README's approximate size holds for the module built from this commit."""
    m = re.search(r"The `\.wasm` is about (\d+) KB", README.read_text())
    assert m, "the README no longer states the module's size"
    stated = int(m.group(1)) * 1000
    actual = harness.WASM.stat().st_size
    assert abs(actual - stated) <= 0.1 * stated, f"README says about {m.group(1)} KB, the build is {actual:,} bytes"
