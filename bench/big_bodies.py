"""Big forged bodies: the peak memory of one `web` worker while eight clients each post
32 MiB (MAX_WEBHOOK_BYTES) under a fresh, well-formed signature that does not match.

Such a post must be read to the end before the HMAC can refuse it, so this is the most
memory unsigned traffic can make a worker spend. Issue 11 asks for at most 150 MB of peak
RSS; the reference is a hello-world worker under the same gunicorn settings and the same
eight posts, measured in the same run. Each server runs one worker (WEB_CONCURRENCY=1) so
that all eight posts land on the worker whose peak (VmHWM) is read.
"""

from __future__ import annotations

import contextlib
import tempfile
import threading
from pathlib import Path

import requests

from bench import ingest, loadgen
from bench.common import (
    BENCH_SECRET,
    WEBHOOK_PATH,
    Figure,
    children,
    environment,
    log,
    rss_mib,
)

SECTION = "memory"
CLIENTS = 8
BODY_BYTES = 32 * 1024 * 1024
TARGET_MB = 150.0
MIB_PER_MB = 1_000_000 / 1024 / 1024


def _forged_posts(port: int, body: bytes, workdir: Path) -> list[int]:
    """Send CLIENTS posts of `body` at once, each with a fresh signature one byte off; return
    the status codes (a refused connection counts as 0)."""
    signed = loadgen.write_signed(
        workdir / "forged.tsv",
        [(f"msg_big{n}", "{}") for n in range(CLIENTS)],
        BENCH_SECRET,
        bad_signature=True,
    )
    lines = [line.split("\t") for line in signed.read_text().splitlines()]
    codes = [0] * CLIENTS
    start = threading.Barrier(CLIENTS)

    def post(index: int) -> None:
        webhook_id, timestamp, signature, _ = lines[index]
        headers = {
            "webhook-id": webhook_id,
            "webhook-timestamp": timestamp,
            "webhook-signature": signature,
            "content-type": "application/json",
        }
        start.wait()
        with contextlib.suppress(requests.RequestException):
            answer = requests.post(
                f"http://127.0.0.1:{port}{WEBHOOK_PATH}", data=body, headers=headers, timeout=120
            )
            codes[index] = answer.status_code

    threads = [threading.Thread(target=post, args=(n,)) for n in range(CLIENTS)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return codes


def _peak_under_load(
    server: ingest.Server, body: bytes, workdir: Path
) -> tuple[float, float, list[int]]:
    """The worker's peak RSS (MiB) before and after the forged posts, and their answers."""
    [worker] = children(server.process.pid)
    requests.get(f"http://127.0.0.1:{server.port}/healthz", timeout=10)
    before = rss_mib(worker, "VmHWM") or 0.0
    codes = _forged_posts(server.port, body, workdir)
    after = rss_mib(worker, "VmHWM") or 0.0
    return before, after, codes


def measure(database_url: str) -> list[Figure]:
    """Peak RSS of a web worker and of a hello-world worker under the same forged posts."""
    # JSON-looking bytes: the refusal must not depend on what the body holds.
    body = b'{"logs": "' + b"x" * (BODY_BYTES - 12) + b'"}'
    assert len(body) == BODY_BYTES
    peaks: dict[str, tuple[float, float, list[int]]] = {}
    with tempfile.TemporaryDirectory(prefix="webhook-sync-bench-memory-") as folder:
        for app in ("web", "gthread", "hello"):
            with (
                environment(WEB_CONCURRENCY="1"),
                ingest.serve(app, database_url, Path(folder)) as server,
            ):
                peaks[app] = _peak_under_load(server, body, Path(folder))
            log(
                f"memory {app}: worker peak {peaks[app][0]:.0f} -> {peaks[app][1]:.0f} MiB"
                f" under {CLIENTS} x 32 MiB forged posts, answers {sorted(set(peaks[app][2]))}"
            )
    web_before, web_peak, web_codes = peaks["web"]
    gthread_peak = peaks["gthread"][1]
    hello_peak = peaks["hello"][1]
    target_mib = TARGET_MB * MIB_PER_MB
    return [
        Figure(
            SECTION,
            f"web worker peak RSS, {CLIENTS} x 32 MiB bad-signature posts",
            web_peak,
            "MiB",
            reference=hello_peak,
            reference_name="hello-world worker, same posts",
            target=f"<= {TARGET_MB:.0f} MB ({target_mib:.0f} MiB)",
            better="lower",
            met=web_peak <= target_mib and set(web_codes) == {401},
            note=f"one worker, {CLIENTS} clients at once; peak before the posts "
            f"{web_before:.0f} MiB; answers {web_codes.count(401)} x 401 of {CLIENTS}; "
            f"the same web on gthread (before gevent) {gthread_peak:.0f} MiB",
        )
    ]
