"""pgserver imported for `make run`, `make demo` and the tests, without platformdirs' warning."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

LOAD = "from webhook_sync.dev import embedded_postgres; embedded_postgres.load_pgserver()"


def import_with_warnings_as_errors(code: str) -> subprocess.CompletedProcess[str]:
    """Run `code` in a new interpreter that turns every warning into an error, without
    XDG_RUNTIME_DIR, as in a container or a CI shell."""
    env = {key: value for key, value in os.environ.items() if key != "XDG_RUNTIME_DIR"}
    return subprocess.run(
        [sys.executable, "-W", "error", "-c", code],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


def test_load_pgserver_drops_the_runtime_dir_warning_a_bare_import_raises() -> None:
    """Without XDG_RUNTIME_DIR `import pgserver` warns (RuntimeDirWarning); load_pgserver
    imports the same module and prints nothing."""
    bare = import_with_warnings_as_errors("import pgserver")
    if bare.returncode == 0:
        pytest.skip("this platformdirs does not warn about XDG_RUNTIME_DIR")

    ours = import_with_warnings_as_errors(LOAD)

    assert "RuntimeDirWarning: XDG_RUNTIME_DIR is not set" in bare.stderr
    assert (ours.returncode, ours.stdout, ours.stderr) == (0, "", "")
