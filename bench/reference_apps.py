"""The two yardsticks the real `web` is measured against, served by the same gunicorn settings.

- `hello_app()`: Flask answering "ok"; the ceiling of Flask under gunicorn on this machine.
- `minimal_app()`: the design's practical limit. It verifies the Standard Webhooks signature
  on the raw body, runs one guarded UPDATE and commits: no inbox, no transition log, no
  NOTIFY. The real receiver does all of that as well, so it should come within 0.8 of this.

Both are factories (`gunicorn 'bench.reference_apps:minimal_app()'`) and connect to the
database lazily, one connection per thread, after gunicorn has forked.
"""

from __future__ import annotations

import json
import os
import threading

import psycopg2
import standardwebhooks
from flask import Flask, Response, request
from standardwebhooks.webhooks import WebhookVerificationError

WEBHOOK_PATH = "/webhooks/replicate"
# The guard is the same idea as the real funnel's compare-and-set: never move a finished row.
GUARDED_UPDATE = (
    "UPDATE webhook_sync.trainings SET replicate_status = %(status)s, updated_at = now(),"
    " updated_by = 'webhook' WHERE id = %(id)s AND training_status = 'training'"
    " AND replicate_status IS DISTINCT FROM %(status)s"
)


def hello_app() -> Flask:
    """A Flask app that answers every webhook POST with 200 and does nothing else."""
    app = Flask("bench_hello")

    @app.post(WEBHOOK_PATH)
    def receive() -> Response:
        return Response('{"result":"ok"}', 200, mimetype="application/json")

    return app


def minimal_app() -> Flask:
    """Verify the signature, run one guarded UPDATE, commit; 401 on a bad signature."""
    webhook = standardwebhooks.Webhook(os.environ["REPLICATE_WEBHOOK_SECRET"].split()[0])
    database_url = os.environ["DATABASE_URL"]
    local = threading.local()
    app = Flask("bench_minimal")

    def connection() -> psycopg2.extensions.connection:
        conn = getattr(local, "conn", None)
        if conn is None or conn.closed:
            conn = local.conn = psycopg2.connect(database_url)
        return conn

    @app.post(WEBHOOK_PATH)
    def receive() -> Response:
        body = request.get_data()
        try:
            webhook.verify(body, dict(request.headers), json_parse=False)
        except (WebhookVerificationError, ValueError):
            return Response('{"error":"bad signature"}', 401, mimetype="application/json")
        payload = json.loads(body)
        conn = connection()
        with conn.cursor() as cur:
            cur.execute(GUARDED_UPDATE, {"id": payload["id"], "status": payload["status"]})
            changed = cur.rowcount
        conn.commit()
        result = "applied" if changed else "unchanged"
        return Response(json.dumps({"result": result}), 200, mimetype="application/json")

    return app
