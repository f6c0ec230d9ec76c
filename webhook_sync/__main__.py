"""Allows `python -m webhook_sync`, the same as the `webhook-sync` command."""

from __future__ import annotations

from webhook_sync.cli import main

if __name__ == "__main__":
    main()
