"""webhook-sync: keeps Replicate training status in PostgreSQL in sync (webhooks plus a poller)."""

from __future__ import annotations

__version__ = "0.1.0"
