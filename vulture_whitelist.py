"""What vulture cannot see used (`make lint` runs vulture over the package and this file).

Never run: each line only names a use, and says whose it is.
"""

# ruff: noqa: B018  (bare expressions are how a vulture whitelist names a use)

from webhook_sync import (
    db,
    gauges,
    importing,
    pool,
    service,
    sweep,
    training,
    vocabulary,
    wakeup,
    web,
)
from webhook_sync.cli import operator
from webhook_sync.dev import simulator
from webhook_sync.dev.simulator import webhooks

# Read by name by their framework or library.
operator.ParsedType.convert  # click calls a ParamType's convert
gauges._Readings.collect  # prometheus_client calls a collector's collect
simulator._QuietHandler.log_request  # http.server calls it; ours is quiet
pool.psycopg2.pool.ThreadedConnectionPool.minconn  # putconn reads it
web.Flask.json_provider_class.sort_keys  # Flask's JSON provider reads it
web.create_app_from_env  # the Procfile's web line: gunicorn calls the factory

# Fields read through dataclasses.asdict or getattr, never by name.
sweep.SweepResult.missed_webhooks  # log_fields: the sweep's summary line
sweep.SweepResult.unchanged
sweep.SweepResult.pending_applied
sweep.SweepResult.api_calls
sweep.SweepResult.stopped
sweep.SweepResult.discovery_calls
sweep.SweepResult.discovery_seconds
sweep.SweepResult.host_adopted
sweep.SweepResult.host_reconciled
importing.ImportSummary.invalid  # the summary's JSON and text, by asdict
wakeup.InsertListener.served  # how many rows the listener served: its tests read it
db.receive_delivery_statement  # the prepared statement's server-side name: tests and operators
training.Training.started_at  # service._changed_fields: REFRESHED_COLUMNS by getattr
webhooks.Delivery.response_status  # /_admin/deliveries, read by the demo
service.ApplyResult.old_training_status  # the result's before and after of both statuses

# The sets the database's CHECK constraints admit, compared with them by test_vocabulary.
vocabulary.EVENT_SOURCES
vocabulary.TRANSITION_OUTCOMES
# The outcomes `webhook_events_unfinished_idx` and sql/0008 `receive_delivery` spell.
vocabulary.UNFINISHED_EVENT_OUTCOMES
