"""The tests' own PostgreSQL starts as root from a fresh clone that other users cannot enter."""

from __future__ import annotations

import os
import shutil
import stat
import subprocess
import sys
from pathlib import Path

import pytest

from tests.support import REPO
from webhook_sync.dev import embedded_postgres

START_AND_QUERY = """
import pgserver, psycopg2
from tests.local_postgres import LocalPostgres
print(pgserver.__file__)
server = LocalPostgres().start()
try:
    conn = psycopg2.connect(server.admin_url)
    with conn.cursor() as cur:
        cur.execute("SELECT current_user")
        print(cur.fetchone()[0])
    conn.close()
finally:
    server.stop()
"""


@pytest.mark.slow
@pytest.mark.timeout(600)
@pytest.mark.skipif(os.geteuid() != 0, reason="only root hands the server to another user")
def test_local_postgres_starts_as_root_from_a_private_clone(tmp_path: Path) -> None:
    """From a clone in a 0700 folder, with pgserver installed inside the clone as
    `make install` puts it, LocalPostgres initialises and answers, and the folder is still
    0700 afterwards (pgserver's own way opens every folder above its binaries)."""
    private = tmp_path / "private"
    private.mkdir(mode=0o700)
    clone = private / "clone"
    subprocess.run(["git", "clone", "--quiet", str(REPO), str(clone)], check=True, timeout=120)
    version = f"python{sys.version_info.major}.{sys.version_info.minor}"
    site = clone / ".venv" / "lib" / version / "site-packages"
    installed = Path(embedded_postgres.load_pgserver().__file__).parent
    for package in (installed, installed.parent / "pgserver.libs"):
        if package.is_dir():
            shutil.copytree(package, site / package.name, symlinks=True)

    result = subprocess.run(
        [sys.executable, "-c", START_AND_QUERY],
        cwd=clone,
        env={**os.environ, "PYTHONPATH": f"{clone}{os.pathsep}{site}"},
        capture_output=True,
        text=True,
        timeout=180,
        check=False,
    )

    assert result.returncode == 0, result.stdout + result.stderr
    assert result.stdout.splitlines() == [str(site / "pgserver" / "__init__.py"), "postgres"]
    assert stat.S_IMODE(private.stat().st_mode) == 0o700
