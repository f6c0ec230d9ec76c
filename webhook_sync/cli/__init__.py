"""The `webhook-sync` command: each subcommand builds a Config and calls the use cases.

Commands live in one module per concern and register themselves on the group in `base`;
importing them here is what makes them part of `main`.
"""

from __future__ import annotations

from webhook_sync.cli import dev, feed, importing, notifications, operator, poller, trainings
from webhook_sync.cli.base import main

__all__ = ["dev", "feed", "importing", "main", "notifications", "operator", "poller", "trainings"]
