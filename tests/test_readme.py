"""README.md cannot silently rot: every code block marked `<!-- readme-test -->` runs, shrunk.

Convention: the line right before a fence is `<!-- readme-test -->` or `<!-- readme-test: "old" -> "new"; ... -->`
(substitutions that shrink the commands, e.g. fewer steps). In a ```bash block every line is a command
(`\\` continues it); in a ```text block the lines starting with `$ ` are. A command exits 0 unless its
line ends in `# exit code N`; a verdict (0 or 3) may flip when shrunk, so either is accepted for either,
while 2 (bad input) must be exactly 2. Marked blocks run in README order, in one temporary directory holding
`recipes/`, so later blocks use the runs earlier ones made.
"""

from __future__ import annotations

import re
import shlex
import shutil
from pathlib import Path

import pytest

from lmctk.cli import main

ROOT = Path(__file__).resolve().parents[1]
MARK = re.compile(r"^<!-- readme-test(?::(.*))? -->$")
SUB = re.compile(r'"([^"]*)" -> "([^"]*)"')


def readme_commands(text: str) -> list[tuple[str, int]]:
    """(command, expected exit code) of every marked block, shrunk, in README order."""
    lines, commands = text.splitlines(), []
    for i, line in enumerate(lines[:-1]):
        mark = MARK.match(line.strip())
        if not mark or not lines[i + 1].startswith("```"):
            continue
        subs = SUB.findall(mark.group(1) or "")
        kind, body = lines[i + 1][3:].strip(), []
        for row in lines[i + 2:]:
            if row.startswith("```"):
                break
            body.append(row)
        joined = "\n".join(body).replace("\\\n", " ").splitlines()
        picked = [row for row in joined if row.strip()] if kind == "bash" else [
            row[2:] for row in joined if row.startswith("$ ")]
        for command in picked:
            for old, new in subs:
                command = command.replace(old, new)
            code = re.search(r"#\s*exit code (\d+)\s*$", command)
            commands.append((command, int(code.group(1)) if code else 0))
    return commands


def test_readme_commands_are_found_and_shrunk():
    commands = readme_commands((ROOT / "README.md").read_text())
    assert any(c.startswith("lmctk butterfly") for c, _ in commands)
    assert any(c.startswith("lmctk soup --recipe") for c, _ in commands)
    assert any(code == 3 for _, code in commands) and any(code == 2 for _, code in commands)
    toy = '<!-- readme-test: "--steps 300" -> "--steps 5" -->\n```text\n$ lmctk train --steps 300 \\\n  --out r\nout\n```\n'
    assert readme_commands(toy) == [("lmctk train --steps 5    --out r", 0)]


LOOP = re.compile(r"^for (\w+) in ([^;]+); do (.+); done$")


def expand(command: str) -> list[list[str]]:
    """The lmctk argv lists of a README command line (a `for v in ...; do ...; done` loop unrolled)."""
    command = re.sub(r"\s+#.*$", "", command).strip()
    loop = LOOP.match(command)
    if loop:
        var, values, body = loop.groups()
        return [argv for value in values.split() for argv in expand(body.replace(f"${var}", value))]
    argv = shlex.split(command)
    assert argv[0] == "lmctk", f"README commands run lmctk only: {command}"
    return [argv[1:]]


@pytest.mark.slow
def test_readme_commands_run(tmp_path, monkeypatch, capsys):
    """Every marked README command, shrunk, exits with the code the README shows (in-process: one import)."""
    shutil.copytree(ROOT / "recipes", tmp_path / "recipes")
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("COLUMNS", "80")
    for command, expected in readme_commands((ROOT / "README.md").read_text()):
        allowed = {2} if expected == 2 else {0, 3}
        for argv in expand(command):
            code = main(argv)
            out = capsys.readouterr()
            assert code in allowed, f"{command}\n{out.out[-2000:]}\n{out.err[-2000:]}"
