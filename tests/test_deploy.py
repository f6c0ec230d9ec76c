"""What a Heroku-style platform reads: the lock (requirements.txt) and .python-version."""

from __future__ import annotations

import os
import re
import sys
from importlib import metadata

import pytest
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

from tests.support import REPO

PIN = re.compile(r"^([A-Za-z0-9][A-Za-z0-9._-]*)==(\S+)$")


def lock_lines() -> list[str]:
    """requirements.txt without comments and blank lines."""
    text = (REPO / "requirements.txt").read_text(encoding="utf-8")
    lines = (line.split("#", 1)[0].strip() for line in text.splitlines())
    return [line for line in lines if line]


def lock_pins() -> dict[str, str]:
    """The lock's exact pins by normalised name (the project's own `.` line left out)."""
    pins = {}
    for line in lock_lines():
        if match := PIN.match(line):
            pins[canonicalize_name(match[1])] = match[2]
    return pins


def runtime_closure(name: str, seen: set[str] | None = None) -> set[str]:
    """Every distribution `name` needs at run time here (its extras' needs left out)."""
    seen = set() if seen is None else seen
    for text in metadata.requires(name) or []:
        requirement = Requirement(text)
        needed = canonicalize_name(requirement.name)
        if requirement.marker and not requirement.marker.evaluate({"extra": ""}):
            continue
        if needed not in seen:
            seen.add(needed)
            runtime_closure(needed, seen)
    return seen


def test_lock_is_exact_pins_and_the_project() -> None:
    """Every line of requirements.txt is `name==version`, plus one `.` installing the project
    (no hashes: pip's hash-checking mode refuses a local directory such as `.`)."""
    lines = lock_lines()

    assert lines.count(".") == 1
    assert [line for line in lines if line != "." and not PIN.match(line)] == []
    assert "--hash" not in (REPO / "requirements.txt").read_text(encoding="utf-8")


def test_lock_is_the_runtime_closure_of_setup_cfg() -> None:
    """The lock pins exactly what the project needs at run time, each pin satisfying
    setup.cfg: a dependency added, dropped or narrowed without `make lock` fails here."""
    pins = lock_pins()
    direct = [Requirement(text) for text in metadata.requires("webhook-sync") or []]
    runtime = [r for r in direct if not r.marker or r.marker.evaluate({"extra": ""})]

    unmet = []
    for requirement in runtime:
        pin = pins.get(canonicalize_name(requirement.name))
        if pin is None or not requirement.specifier.contains(pin):
            unmet.append(str(requirement))

    assert set(pins) == runtime_closure("webhook-sync")
    assert unmet == []


def test_suite_runs_on_the_locked_versions() -> None:
    """`make install` put exactly the deploy's pins in the environment the suite runs in."""
    pins = lock_pins()

    installed = {name: metadata.version(name) for name in pins}

    assert installed == pins


def test_python_version_is_the_one_the_suite_runs_on() -> None:
    """.python-version names one minor version, the one this suite runs on (CI enforces it;
    elsewhere a different interpreter is reported as a skip)."""
    wanted = (REPO / ".python-version").read_text(encoding="utf-8").strip()
    running = f"{sys.version_info.major}.{sys.version_info.minor}"
    if running != wanted and not os.environ.get("CI"):
        pytest.skip(f"the suite runs on Python {running}; deploys use {wanted}")

    assert re.fullmatch(r"3\.\d+", wanted)
    assert running == wanted
