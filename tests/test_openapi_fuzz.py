"""schemathesis against the OpenAPI description the running web process serves: every
operation, as generated and (for the webhook) re-signed with the real secret; never a 5xx."""

from __future__ import annotations

import json
import os
import shlex
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
import requests
import schemathesis
from hypothesis import HealthCheck, given, settings
from schemathesis import GenerationMode
from schemathesis.checks import not_a_server_error

from tests.e2e_support import ManagedProcess, admin_execute
from tests.support import REPO, VENV_BIN, database_url_for, free_port, procfile, wait_until
from tests.web_support import SECRET, sign_headers

pytestmark = [pytest.mark.slow, pytest.mark.timeout(300)]
API_TOKEN = "fuzz-token-aaaaaaaaaaaa"


@pytest.fixture(scope="module")
def web_url(
    pg_admin_url: str, template_database: str, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[str]:
    """gunicorn from the Procfile's `web` line on a free port, on a database of its own."""
    name = f"wst_fuzz_{uuid.uuid4().hex[:12]}"
    admin_execute(pg_admin_url, f'CREATE DATABASE "{name}" TEMPLATE "{template_database}"')
    port = free_port()
    env = {
        **os.environ,
        "PATH": str(VENV_BIN) + os.pathsep + os.environ.get("PATH", ""),
        "DATABASE_URL": database_url_for(pg_admin_url, name),
        "REPLICATE_WEBHOOK_SECRET": SECRET,
        "API_TOKENS": API_TOKEN,
        "PORT": str(port),
        "WEB_CONCURRENCY": "2",
        "MAX_WEBHOOK_BYTES": str(1024 * 1024),
    }
    web_line = shlex.split(procfile()["web"])
    argv = [*web_line, "--bind", f"127.0.0.1:{port}", "--no-control-socket"]
    process = ManagedProcess("web", argv, env, Path(tmp_path_factory.mktemp("fuzz-web")))
    process.start()
    url = f"http://127.0.0.1:{port}"
    try:
        wait_until(lambda: _ready(url) or not process.running(), timeout=30, message="web")
        assert process.running(), process.output()[-2000:]
        yield url
    finally:
        process.stop()
        admin_execute(pg_admin_url, f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
    assert "Traceback" not in process.output()


def _ready(url: str) -> bool:
    try:
        return requests.get(url + "/readyz", timeout=2).status_code == 200
    except requests.RequestException:
        return False


SHIPPED = REPO / "webhook_sync" / "openapi.yaml"


@pytest.fixture(scope="module")
def web_schema() -> schemathesis.BaseSchema:
    """The shipped description (which the running app serves, see below)."""
    return schemathesis.openapi.from_path(SHIPPED)


def operation_cases() -> list[tuple[str, GenerationMode]]:
    """Every operation the shipped description documents, with valid input, and with
    input that violates the description where there is any to violate (the POST)."""
    shipped = schemathesis.openapi.from_path(SHIPPED)
    labels = [result.ok().label for result in shipped.get_all_operations()]
    return [(label, GenerationMode.POSITIVE) for label in labels] + [
        (label, GenerationMode.NEGATIVE) for label in labels if label.startswith("POST ")
    ]


def test_served_description_is_the_shipped_one(web_url: str) -> None:
    """The running app serves webhook_sync/openapi.yaml byte for byte."""
    served = requests.get(web_url + "/openapi.yaml", timeout=10)

    assert served.status_code == 200
    assert served.text == SHIPPED.read_text()


@pytest.mark.parametrize(
    ("label", "mode"),
    operation_cases(),
    ids=lambda value: value.value if isinstance(value, GenerationMode) else value,
)
def test_no_operation_answers_5xx(
    web_schema: schemathesis.BaseSchema, web_url: str, label: str, mode: GenerationMode
) -> None:
    """Generated requests, valid or not, and each POST re-signed: never a 5xx."""
    operation = next(
        result.ok() for result in web_schema.get_all_operations() if result.ok().label == label
    )
    session = requests.Session()
    seen: list[int] = []

    @settings(
        max_examples=80,
        deadline=None,
        database=None,
        suppress_health_check=list(HealthCheck),
    )
    @given(case=operation.as_strategy(generation_mode=mode))
    def call(case: schemathesis.Case) -> None:
        # The API's routes are generated with the token, so they are reached, not refused.
        headers = {"Authorization": f"Bearer {API_TOKEN}"} if case.path.startswith("/v1/") else None
        response = case.call(base_url=web_url, session=session, headers=headers)
        seen.append(response.status_code)
        case.validate_response(response, checks=[not_a_server_error])
        if case.method.upper() == "POST" and case.path == "/webhooks/replicate":
            seen.append(_call_signed(case, web_url, session))

    call()

    assert seen
    assert all(code < 500 for code in seen)
    if "/v1/" in label:
        assert set(seen) != {401}, "the API was never reached past its token check"


def _call_signed(case: schemathesis.Case, web_url: str, session: requests.Session) -> int:
    """Send the generated request again with a valid signature over its exact body."""
    kwargs = case.as_transport_kwargs(base_url=web_url)
    body = kwargs.pop("json", None)
    data = kwargs.pop("data", None)
    if body is not None:
        data = json.dumps(body).encode()
    elif isinstance(data, str):
        data = data.encode()
    data = data or b""
    headers = {**(kwargs.pop("headers", None) or {}), **sign_headers(data)}
    response = session.request(
        kwargs["method"], kwargs["url"], headers=headers, data=data, timeout=30
    )
    assert response.status_code < 500, response.text
    assert response.status_code in (200, 400, 413), response.text
    return response.status_code
