"""The README is what users copy from: every `whaleid ...` line in its fenced blocks must name a real
command with real options, each option given a value when it takes one; and the README must not point
at files a user's checkout lacks (the workplace's ../shared)."""
import re
import shlex

import click
import pytest

from conftest import ROOT
from whaleid.cli import main

README = ROOT / "README.md"


def command_lines(text: str) -> list[str]:
    """The `whaleid ...` lines of the fenced blocks, continuation lines joined, comments dropped."""
    lines, fenced = [], False
    for raw in text.replace("\\\n", " ").splitlines():
        if raw.strip().startswith("```"):
            fenced = not fenced
            continue
        if fenced and raw.strip().startswith("whaleid"):
            lines.append(raw.split(" #")[0].strip())
    return lines


def parse_problems(line: str) -> list[str]:
    """What is wrong with `line` as a whaleid command (empty: it parses), without running anything."""
    words = shlex.split(line)[1:]
    if not words:
        return []
    if words[0].startswith("-"):
        known = {o for p in main.params for o in p.opts + p.secondary_opts} | {"--help"}
        return [] if all(w in known for w in words if w.startswith("-")) else [f"unknown option in {line!r}"]
    command = main.get_command(click.Context(main), words[0])
    if command is None:
        return [f"no command {words[0]!r} in {line!r}"]
    options = {o: p for p in command.params if isinstance(p, click.Option) for o in p.opts + p.secondary_opts}
    options["--help"] = click.Option(["--help"], is_flag=True)
    problems, positional, i = [], [], 1
    while i < len(words):
        w = words[i]
        if w.startswith("-"):
            name = w.split("=", 1)[0]
            p = options.get(name)
            if p is None:
                problems.append(f"{words[0]}: no option {name} in {line!r}")
            elif not p.is_flag and "=" not in w:
                if i + 1 >= len(words) or words[i + 1].startswith("--"):
                    problems.append(f"{words[0]} {name} needs a value in {line!r}")
                i += 1
        else:
            positional.append(w)
        i += 1
    arguments = [p for p in command.params if isinstance(p, click.Argument)]
    if len(positional) > sum(p.nargs if p.nargs > 0 else 99 for p in arguments):
        problems.append(f"{words[0]} takes no positional {positional} in {line!r}")
    return problems


def test_the_checker_finds_a_wrong_command_option_and_missing_value():
    assert parse_problems("whaleid train --work W") == []
    assert parse_problems("whaleid trian --work W")[0].startswith("no command 'trian'")
    assert parse_problems("whaleid train --wrok W")[0].startswith("train: no option --wrok")
    assert parse_problems("whaleid train --work")[0].startswith("train --work needs a value")
    assert parse_problems("whaleid train extra --work W")[0].startswith("train takes no positional")
    assert command_lines("x\n```\nwhaleid a --b c \\\n  --d e   # note\nls\n```\nwhaleid z\n") == ["whaleid a --b c    --d e"]


def test_every_whaleid_line_of_the_readme_names_a_real_command_and_options():
    lines = command_lines(README.read_text())
    assert len(lines) >= 8, lines  # the quick starts are there
    problems = [p for line in lines for p in parse_problems(line)]
    assert problems == []


def test_readme_points_only_at_files_a_checkout_has():
    text = README.read_text()
    assert "../shared" not in text and "shared/data" not in text
    for link in re.findall(r"\]\(([^)#]+)", text):
        if not link.startswith("http"):
            assert (ROOT / link).exists(), f"README links {link}, which the repository lacks"


@pytest.mark.parametrize("doc", sorted((ROOT / "docs").glob("*.md")), ids=lambda p: p.name)
def test_docs_do_not_point_at_the_workplace(doc):
    assert "../shared" not in doc.read_text()
