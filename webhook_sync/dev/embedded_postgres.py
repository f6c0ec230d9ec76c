"""pgserver, the dev extra's embedded PostgreSQL, imported without platformdirs' warning.

pgserver's `PostgresServer` class asks platformdirs for the user's runtime directory (for
its lock file) while the module is being imported. Where XDG_RUNTIME_DIR is not set
(containers, CI, ssh sessions without a login manager) platformdirs then warns
`RuntimeDirWarning: XDG_RUNTIME_DIR is not set, falling back to /tmp/runtime-<uid>` and
uses that folder, which serves a lock file well. The warning asks nothing of whoever runs
`make run` or `make demo`, so it is silenced here, for that one import only; every
import of pgserver goes through `load_pgserver`.
"""

from __future__ import annotations

import warnings
from types import ModuleType


def load_pgserver() -> ModuleType:
    """Import and return pgserver (ImportError without the dev extra); a RuntimeDirWarning
    raised by the import is dropped, every other warning is left alone."""
    import platformdirs

    # Older platformdirs releases have no such warning, and do not warn.
    category = getattr(platformdirs, "RuntimeDirWarning", None)
    with warnings.catch_warnings():
        if category is not None:
            warnings.simplefilter("ignore", category)
        import pgserver
    return pgserver
