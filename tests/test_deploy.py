"""The platform build, rehearsed: a Heroku-style Python buildpack takes the one
package-manager file at the root (requirements.txt), installs it with pip into the
Python that .python-version names, and runs the Procfile. Here the same happens from
a clean clone of the committed tree, so a build that would break on the platform
breaks CI first.

Both tests that need the package index skip without it, but only outside CI
(.ci/run sets CI): there, an unreachable index is a failure like any other.
"""

from __future__ import annotations

import asyncio
import os
import re
import shlex
import shutil
import subprocess
import tomllib
from pathlib import Path
from typing import NoReturn

import httpx
import pytest
from packaging.requirements import Requirement
from packaging.specifiers import SpecifierSet
from packaging.utils import canonicalize_name
from sqlalchemy.engine import make_url
from uv import find_uv_bin

from tests.factories import user_body
from tests.support import (
    REPO,
    fetch_value,
    fresh_postgres_database,
    path_with,
    procfile_command,
    running_service,
)

PYPROJECT = tomllib.loads((REPO / "pyproject.toml").read_text())
# The one command that rewrites requirements.txt from pyproject.toml: runtime dependencies
# only, pinned with hashes, one resolution for every Python from 3.11 on. Its options stay
# on the command line: in [tool.uv.pip] they would steer `uv pip install` too (to 3.11's
# wheels on any Python).
COMPILE_COMMAND = (
    "uv pip compile pyproject.toml --universal --python-version 3.11 --generate-hashes"
    " -o requirements.txt"
)
# Every file the buildpack takes as a package manager's; it refuses a build with two.
PACKAGE_MANAGER_FILES = ("requirements.txt", "Pipfile", "Pipfile.lock", "poetry.lock", "uv.lock")
IN_CI = bool(os.environ.get("CI"))

pytestmark = pytest.mark.deploy


def skip_unless_in_ci(reason: str) -> NoReturn:
    """A missing prerequisite skips on a developer's machine and fails in CI."""
    if IN_CI:
        pytest.fail(f"{reason} (CI is set, so this is not skipped)", pytrace=False)
    pytest.skip(reason)


def package_index_reachable() -> bool:
    """Whether the package index answers at all: a failed install is only excused by that."""
    probe = subprocess.run(
        [find_uv_bin(), "pip", "compile", "-", "--no-config", "--no-cache", "--quiet"],
        input="pip\n",
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    return probe.returncode == 0


def python_for(version: str) -> Path | None:
    """This machine's interpreter for `version` ("3.13"): on PATH, or pyenv's."""
    try:
        found = subprocess.run(
            [f"python{version}", "-c", "import sys; print(sys.executable)"],
            env={**os.environ, "PYENV_VERSION": version},
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )
    except FileNotFoundError:
        return None
    return Path(found.stdout.strip()) if found.returncode == 0 else None


def pins(requirements: Path) -> set[str]:
    """`name==version ; markers` of every requirement; hashes and comments left out,
    since an index may add wheels (and so hashes) to a release already pinned."""
    return {
        line.removesuffix("\\").strip()
        for line in requirements.read_text().splitlines()
        if line and not line.startswith(("#", " "))
    }


def platform_pip_environment() -> dict[str, str]:
    """The environment of a platform build: none of this machine's pip configuration
    (local mirrors, constraints) and no active virtualenv."""
    environment = {
        name: value
        for name, value in os.environ.items()
        if not name.startswith("PIP_") and name not in ("VIRTUAL_ENV", "PYTHONPATH")
    }
    return {**environment, "PIP_CONFIG_FILE": os.devnull, "PIP_NO_INPUT": "1"}


# -- what the buildpack reads --------------------------------------------------------


def test_the_platform_finds_one_package_manager_file_and_a_python_we_test() -> None:
    found = [name for name in PACKAGE_MANAGER_FILES if (REPO / name).exists()]
    deployed = (REPO / ".python-version").read_text().strip()

    assert found == ["requirements.txt"]
    assert f"#    {COMPILE_COMMAND}\n" in (REPO / "requirements.txt").read_text()
    assert f".venv/bin/{COMPILE_COMMAND}\n" in (REPO / "README.md").read_text()
    assert re.fullmatch(r"3\.\d+", deployed), "the buildpack wants 3.N (or 3.N.N)"
    assert SpecifierSet(PYPROJECT["project"]["requires-python"]).contains(f"{deployed}.0")


def test_every_python_that_requires_python_admits_and_this_machine_has_is_tested() -> None:
    """.python-version runs the README's test command; EXTRA_PYTHONS in .ci/run the others."""
    admitted = SpecifierSet(PYPROJECT["project"]["requires-python"])
    here = {
        version
        for version in (f"3.{minor}" for minor in range(8, 20))
        if admitted.contains(f"{version}.0") and python_for(version) is not None
    }
    extra = re.search(r'^EXTRA_PYTHONS="(.*)"$', (REPO / ".ci" / "run").read_text(), re.M)
    assert extra, ".ci/run sets EXTRA_PYTHONS"

    tested = {(REPO / ".python-version").read_text().strip(), *extra.group(1).split()}

    assert here <= tested, (
        f"Python {sorted(here - tested)} is admitted by requires-python and installed here"
        " but not tested: add it to EXTRA_PYTHONS in .ci/run, or narrow requires-python"
    )


def test_requirements_txt_matches_pyproject(tmp_path: Path) -> None:
    """The committed pins are the resolver's preferences, so only a change to
    pyproject.toml (a dependency added, removed, or a range a pin no longer meets)
    makes the result differ; new releases upstream do not."""
    committed = REPO / "requirements.txt"
    regenerated = tmp_path / "requirements.txt"
    shutil.copy(committed, regenerated)

    def compile_requirements(*options: str) -> subprocess.CompletedProcess[str]:
        into = COMPILE_COMMAND.removeprefix("uv ").removesuffix("requirements.txt")
        return subprocess.run(
            [find_uv_bin(), *shlex.split(into), str(regenerated), "--quiet", *options],
            cwd=REPO,
            capture_output=True,
            text=True,
            timeout=300,
            check=False,
        )

    result = compile_requirements("--offline")  # uv's cache usually has every pin
    if result.returncode != 0:
        result = compile_requirements()
    if result.returncode != 0 and not package_index_reachable():
        skip_unless_in_ci("the package index is not reachable to resolve pyproject.toml")
    assert result.returncode == 0, result.stderr

    drift = sorted(pins(committed) ^ pins(regenerated))
    assert not drift, (
        f"requirements.txt no longer matches pyproject.toml ({', '.join(drift)});"
        f" run `{COMPILE_COMMAND}` (uv comes with the test extra, in .venv/bin)"
        " and commit requirements.txt"
    )


# -- the rehearsal -----------------------------------------------------------------


def platform_build(app: Path, into: Path) -> Path:
    """Install `app` as the buildpack does: a fresh Python of .python-version's
    version, then `pip install -r requirements.txt`. Returns its bin directory."""
    version = (app / ".python-version").read_text().strip()
    python = python_for(version)
    if python is None:
        skip_unless_in_ci(f"Python {version} (from .python-version) is not installed here")
    subprocess.run([str(python), "-m", "venv", str(into)], check=True, timeout=120)
    pip = [into / "bin" / "python", "-m", "pip"]
    install = subprocess.run(
        [*pip, "install", "-r", "requirements.txt", "--exists-action=w", "--progress-bar", "off"],
        cwd=app,
        env=platform_pip_environment(),
        capture_output=True,
        text=True,
        timeout=400,
        check=False,
    )
    if install.returncode != 0 and not package_index_reachable():
        skip_unless_in_ci("the package index is not reachable to install requirements.txt")
    assert install.returncode == 0, install.stdout[-4000:] + install.stderr[-4000:]
    return into / "bin"


def installed_distributions(bin_dir: Path) -> set[str]:
    names = "import importlib.metadata as m\nfor d in m.distributions(): print(d.metadata['Name'])"
    listing = subprocess.run(
        [bin_dir / "python", "-c", names],
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )
    return {canonicalize_name(name) for name in listing.stdout.split()}


@pytest.mark.process
@pytest.mark.postgres
@pytest.mark.timeout(900)
def test_a_clean_clone_builds_releases_serves_and_stops_as_on_the_platform(
    tmp_path: Path,
) -> None:
    if not (REPO / ".git").exists():
        skip_unless_in_ci("not a git checkout: there is no committed tree to clone")
    app = tmp_path / "app"
    subprocess.run(["git", "clone", "--quiet", str(REPO), str(app)], check=True, timeout=120)
    bin_dir = platform_build(app, tmp_path / "platform-python")
    installed = installed_distributions(bin_dir)
    test_tools = {
        canonicalize_name(Requirement(requirement).name)
        for requirement in PYPROJECT["project"]["optional-dependencies"]["test"]
    }
    broken = subprocess.run(
        [bin_dir / "python", "-m", "pip", "check"], capture_output=True, text=True, check=False
    )

    with fresh_postgres_database() as url:
        database_url = make_url(url).set(drivername="postgres").render_as_string(False)
        platform = {"DATABASE_URL": database_url, "WEB_CONCURRENCY": "2"}
        release = subprocess.run(
            procfile_command("release", root=app),
            shell=True,  # a Procfile line is a shell command
            cwd=app,
            env={**os.environ, **platform, "PATH": path_with(bin_dir)},
            capture_output=True,
            text=True,
            timeout=120,
            check=False,
        )
        schema_after_release = asyncio.run(fetch_value(url, "SELECT to_regclass('users')::text"))
        with running_service(
            platform,
            # exec: the exit status is the server's, not the shell's (dash keeps itself
            # as the parent of a lone command).
            command=f"exec {procfile_command('web', root=app)}",
            tmp_path=tmp_path,
            cwd=app,
            bin_dir=bin_dir,
        ) as service:
            health = httpx.get(f"{service.base_url}/health", timeout=10)
            created = httpx.post(f"{service.base_url}/users", json=user_body(), timeout=10)
            read = httpx.get(f"{service.base_url}{created.headers.get('location')}", timeout=10)
            service.terminate()
            exit_code = service.process.wait(timeout=30)
        log = service.log()

    assert not installed & test_tools, "the platform installs runtime dependencies only"
    assert broken.returncode == 0, broken.stdout
    assert release.returncode == 0, release.stdout + release.stderr
    assert schema_after_release == "users"
    assert health.status_code == 200, log
    assert created.status_code == 201, created.text
    assert read.status_code == 200
    assert read.json() == created.json()
    assert "with 2 worker(s)" in log
    assert exit_code == 0, log
    assert "Traceback" not in log
