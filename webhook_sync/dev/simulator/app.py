"""The simulator's HTTP face: Replicate's training routes under /v1 and admin routes under /_admin.

Admin routes need no token (the simulator is a local development tool):

- `GET /_admin`: the seed, these routes and how many webhook tasks wait.
- `GET|POST /_admin/faults`: read or change faults (POST a JSON object of some fields).
- `GET|POST /_admin/lifecycle`: read or change durations and fail share of new trainings.
- `POST /_admin/trainings`: create many trainings at once (a `BulkPlan` as JSON), with
  new ids or with the `ids` given.
- `GET /_admin/trainings`: `{"count", "by_status", "trainings": {id: status}}`, the truth now.
- `GET /_admin/trainings/{id}`: the simulator's whole record of one training.
- `GET|DELETE /_admin/requests`: API request counts (DELETE resets them).
- `GET /_admin/deliveries`: `{"deliveries": [...]}`, every webhook attempt and dropped message.
"""

from __future__ import annotations

import json
import time
from typing import Any

from flask import Flask, Response, g, request
from werkzeug.exceptions import HTTPException

from webhook_sync.dev.simulator import engine, settings

PROBLEM_JSON = "application/problem+json"
CREATE_ROUTE = "/v1/models/<owner>/<name>/versions/<version>/trainings"


def create_app(sim: engine.Simulator) -> Flask:
    """A Flask app serving `sim`; creates nothing at import time."""
    app = Flask("webhook_sync.simulator")

    @app.before_request
    def apply_faults() -> Response | None:
        if request.path.startswith("/_admin"):
            return None
        rule = request.url_rule.rule if request.url_rule else "(unmatched)"
        g.route = f"{request.method} {rule.replace('<', '{').replace('>', '}')}"
        g.training_id = (request.view_args or {}).get("training_id")
        latency = sim.faults.latency_ms
        if latency:
            time.sleep(latency / 1000)  # the simulated API latency itself, not a wait
        if not sim.authorized(request.headers.get("Authorization")):
            detail = (
                "You did not pass a valid authentication token"
                if request.headers.get("Authorization")
                else "You did not pass an authentication token"
            )
            title = "Unauthenticated" if sim.faults.unauthenticated_title else None
            return problem(401, detail, title)
        refusal = sim.admit(request_kind(rule, request.method))
        if refusal is None:
            return None
        if isinstance(refusal.body, str):
            response = Response(refusal.body, refusal.status, mimetype="text/html")
        else:
            response = json_response(refusal.body, refusal.status)
        response.headers.update(refusal.headers)
        return response

    @app.after_request
    def count(response: Response) -> Response:
        if "route" in g:
            sim.count_request(g.route, g.training_id, response.status_code)
        return response

    @app.errorhandler(settings.SimulatorError)
    def simulator_error(exc: settings.SimulatorError) -> Response:
        return problem(exc.status_code, str(exc))

    @app.errorhandler(HTTPException)
    def http_error(exc: HTTPException) -> Response:
        detail = "Not found." if exc.code == 404 else (exc.description or exc.name)
        return problem(exc.code or 500, detail)

    @app.post(CREATE_ROUTE)
    def create_training(owner: str, name: str, version: str) -> Response:
        return json_response(sim.create_training(owner, name, version, json_body()), 201)

    @app.get("/v1/trainings")
    def list_trainings() -> Response:
        return json_response(sim.list_trainings(request.args.get("cursor"), request.base_url))

    @app.get("/v1/trainings/<training_id>")
    def get_training(training_id: str) -> Response:
        return json_response(sim.get_training(training_id))

    @app.post("/v1/trainings/<training_id>/cancel")
    def cancel_training(training_id: str) -> Response:
        return json_response(sim.cancel_training(training_id))

    # A training id is also a prediction id: create responses point clients here.
    @app.get("/v1/predictions/<training_id>")
    def get_prediction(training_id: str) -> Response:
        return json_response(sim.get_training(training_id, view="webhook"))

    @app.post("/v1/predictions/<training_id>/cancel")
    def cancel_prediction(training_id: str) -> Response:
        return json_response(sim.cancel_training(training_id))

    @app.get("/v1/webhooks/default/secret")
    def webhook_secret() -> Response:
        return json_response({"key": sim.secret})

    register_admin_routes(app, sim)
    return app


def register_admin_routes(app: Flask, sim: engine.Simulator) -> None:
    """Add the token-free /_admin routes (documented in this module's docstring)."""

    @app.get("/_admin")
    def admin_index() -> Response:
        return json_response(
            {
                "seed": sim.seed,
                "routes": [
                    "GET|POST /_admin/faults",
                    "GET|POST /_admin/lifecycle",
                    "GET|POST /_admin/trainings",
                    "GET /_admin/trainings/{id}",
                    "GET|DELETE /_admin/requests",
                    "GET /_admin/deliveries",
                ],
                "pending_tasks": sim.pending_tasks(),
            }
        )

    @app.route("/_admin/faults", methods=["GET", "POST"])
    def admin_faults() -> Response:
        if request.method == "POST":
            sim.set_faults(**json_body())
        return json_response(sim.faults.to_dict())

    @app.route("/_admin/lifecycle", methods=["GET", "POST"])
    def admin_lifecycle() -> Response:
        if request.method == "POST":
            sim.set_lifecycle(**json_body())
        return json_response(sim.lifecycle.to_dict())

    @app.post("/_admin/trainings")
    def admin_create_many() -> Response:
        ids = sim.create_many(bulk_plan(json_body()))
        return json_response({"created": len(ids), "ids": ids}, 201)

    @app.get("/_admin/trainings")
    def admin_trainings() -> Response:
        statuses = sim.true_statuses()
        by_status: dict[str, int] = {}
        for status in statuses.values():
            by_status[status] = by_status.get(status, 0) + 1
        return json_response(
            {"count": len(statuses), "by_status": by_status, "trainings": statuses}
        )

    @app.get("/_admin/trainings/<training_id>")
    def admin_training(training_id: str) -> Response:
        return json_response(sim.describe_training(training_id))

    @app.route("/_admin/requests", methods=["GET", "DELETE"])
    def admin_requests() -> Response:
        if request.method == "DELETE":
            sim.reset_request_counts()
        return json_response(sim.request_counts())

    @app.get("/_admin/deliveries")
    def admin_deliveries() -> Response:
        return json_response({"deliveries": sim.deliveries()})


def request_kind(rule: str, method: str) -> str:
    """Which rate limit a request counts against: `create`, `read` (GETs) or `write`."""
    if rule == CREATE_ROUTE:
        return "create"
    return "read" if method == "GET" else "write"


def bulk_plan(body: dict[str, Any]) -> settings.BulkPlan:
    """A BulkPlan from admin JSON (`webhook_events_filter` names `events`; lists become tuples)."""
    fields = dict(body)
    if "webhook_events_filter" in fields:
        fields["events"] = fields.pop("webhook_events_filter")
    known = set(settings.BulkPlan.__dataclass_fields__)
    if unknown := set(fields) - known:
        raise settings.SimulatorError(f"unknown fields {sorted(unknown)} (known: {sorted(known)})")
    for name in ("created_ago", "finish_in", "events", "ids"):
        if name in fields:
            if not isinstance(fields[name], list):
                raise settings.SimulatorError(f"{name} must be a list")
            fields[name] = tuple(fields[name])
    return settings.BulkPlan(**fields)


def json_body() -> dict[str, Any]:
    """The request's JSON object; SimulatorError (400) if it is not one."""
    # Like Replicate, read the body as JSON whatever Content-Type the client sent.
    body = request.get_json(force=True, silent=True)
    if not isinstance(body, dict):
        raise settings.SimulatorError("The request body must be a JSON object")
    return body


def json_response(obj: Any, status: int = 200) -> Response:
    """A compact JSON response."""
    return Response(json.dumps(obj, separators=(",", ":")), status, mimetype="application/json")


def problem(status: int, detail: str, title: str | None = None) -> Response:
    """A Replicate-style error, `{"title"?: …, "detail": …, "status": …}` (its key order),
    as application/problem+json."""
    fields = {"title": title} if title else {}
    fields.update(detail=detail, status=status)
    return Response(json.dumps(fields, separators=(",", ":")), status, mimetype=PROBLEM_JSON)
