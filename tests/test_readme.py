"""The README's promises that can drift: the two commands, the CI entry point, and
the local platform run."""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import httpx
import pytest

from tests.factories import user_body
from tests.support import REPO, ServiceProcess, free_port, wait_until_live


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


@pytest.mark.process
def test_the_local_platform_run_works_as_written(tmp_path: Path) -> None:
    """The README's honcho lines, run by bash in a fresh shell: no virtualenv on PATH
    until the script activates it."""
    venv = Path(sys.prefix)
    if not (venv / "bin" / "activate").exists():
        pytest.skip("the tests are not running from a virtualenv to activate")
    section = (REPO / "README.md").read_text().split("**Locally, as the platform runs it**", 1)[1]
    match = re.search(r"```sh\n(.+?)\n```", section, re.S)
    assert match, "the README shows the local platform run as a sh block"
    for name in ("Procfile", ".env.example"):
        shutil.copy(REPO / name, tmp_path / name)
    (tmp_path / ".venv").symlink_to(venv)
    fresh_path = [
        entry for entry in os.environ["PATH"].split(os.pathsep) if entry != str(venv / "bin")
    ]
    environment = {name: value for name, value in os.environ.items() if name != "VIRTUAL_ENV"}
    port = free_port()
    log_path = tmp_path / "honcho.log"
    with log_path.open("w") as log:
        process = subprocess.Popen(
            ["bash", "-ec", match.group(1)],
            cwd=tmp_path,
            env={**environment, "PATH": os.pathsep.join(fresh_path), "PORT": str(port)},
            stdout=log,
            stderr=subprocess.STDOUT,
            text=True,
            start_new_session=True,
        )
    honcho = ServiceProcess(process, f"http://127.0.0.1:{port}", log_path)
    try:
        wait_until_live(honcho, timeout=30)
        created = httpx.post(f"{honcho.base_url}/users", json=user_body(), timeout=10)
    finally:
        with contextlib.suppress(ProcessLookupError):  # honcho may have stopped already
            honcho.terminate()
        process.wait(timeout=30)

    assert created.status_code == 201, honcho.log()
    assert (tmp_path / "service.db").exists()
