"""The README's promises that can drift: the two commands and the CI entry point."""

from __future__ import annotations

import re

from tests.support import REPO


def _commands() -> list[str]:
    section = (REPO / "README.md").read_text().split("## Two commands", 1)[1].split("\n## ", 1)[0]
    return re.findall(r"```sh\n(.+?)\n```", section)


def test_readme_has_exactly_two_commands() -> None:
    run, test = _commands()

    assert run.endswith("python -m service")
    assert test.endswith("python -m pytest")


def test_ci_runs_the_readme_test_command() -> None:
    _, test = _commands()
    ci_lines = (REPO / ".ci" / "run").read_text().splitlines()

    assert test in ci_lines
