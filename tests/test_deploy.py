"""What a Heroku-style platform reads: the lock (requirements.txt), .python-version, app.json."""

from __future__ import annotations

import json
import os
import re
import sys
from importlib import metadata
from typing import Any

import pytest
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

from tests.support import REPO, procfile
from webhook_sync.config import Config

PIN = re.compile(r"^([A-Za-z0-9][A-Za-z0-9._-]*)==(\S+)$")
# Set by the platform itself, not by whoever deploys: the Postgres add-on and the router.
PLATFORM_SETTINGS = {"DATABASE_URL", "PORT"}


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


def runtime_closure(
    name: str, extras: frozenset[str] = frozenset(), seen: set[tuple[str, str]] | None = None
) -> set[str]:
    """Every distribution `name` needs at run time here, with the extras asked of it (such
    as `gunicorn[gevent]`); other extras' needs left out."""
    seen = set() if seen is None else seen
    for text in metadata.requires(name) or []:
        requirement = Requirement(text)
        needed = canonicalize_name(requirement.name)
        wanted = ("", *extras)
        if requirement.marker and not any(
            requirement.marker.evaluate({"extra": extra}) for extra in wanted
        ):
            continue
        for extra in ("", *requirement.extras):
            if (needed, extra) not in seen:
                seen.add((needed, extra))
                runtime_closure(needed, frozenset(requirement.extras), seen)
    return {distribution for distribution, _ in seen}


def setting_names() -> set[str]:
    """Every environment variable Config.from_env reads."""
    read: set[str] = set()

    class Recorder(dict[str, str]):
        def get(self, key: str, default: Any = None) -> Any:
            read.add(key)
            return default

    Config.from_env(Recorder())
    return read


def app_json() -> dict[str, Any]:
    """app.json, parsed."""
    return json.loads((REPO / "app.json").read_text(encoding="utf-8"))


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


def test_app_json_describes_every_setting_but_the_platform_s() -> None:
    """app.json lists every setting the service reads, except the two Heroku sets itself,
    each with a description and an explicit `required` (app.json's default is true)."""
    env = app_json()["env"]

    assert set(env) == setting_names() - PLATFORM_SETTINGS
    assert [name for name, spec in env.items() if not spec.get("description")] == []
    assert {name for name, spec in env.items() if spec.get("required") is not False} == {
        "REPLICATE_API_TOKEN"
    }
    assert all(isinstance(spec["required"], bool) for spec in env.values())


def test_app_json_runs_the_procfile_with_postgres() -> None:
    """The formation is the Procfile's long-running processes; the Postgres add-on provides
    DATABASE_URL; migrations are the Procfile's release phase, not an app.json script."""
    app = app_json()
    processes = procfile()

    assert set(app["formation"]) == set(processes) - {"release"} == {"web", "worker"}
    assert all(spec["quantity"] >= 1 for spec in app["formation"].values())
    assert app["addons"] == [{"plan": "heroku-postgresql", "as": "DATABASE"}]
    assert processes["release"] == "webhook-sync migrate"
    assert "scripts" not in app
    assert app["buildpacks"] == [{"url": "heroku/python"}]


def test_readme_says_what_security_is_ours_and_what_is_the_platform_s() -> None:
    """The README's security section, and docs/security.md in detail, say what the service
    defends against by itself and what it expects in front of it and of the database."""
    readme = (REPO / "README.md").read_text(encoding="utf-8")
    section = readme.split("\n## Security\n", 1)[1].split("\n## ", 1)[0]
    details = (REPO / "docs" / "security.md").read_text(encoding="utf-8")

    for phrase in ("constant time", "TLS in front", "public HTTPS URL", "verify-full"):
        assert phrase in section
    assert "docs/security.md" in section
    assert "## What the service defends against by itself" in details
    assert "## What it expects of the platform" in details
    for threat in ("Slow clients", "Growing `/metrics`", "Probing `/readyz`", "Rewriting"):
        assert threat in details
