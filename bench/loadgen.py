"""Signed deliveries and the load generator: wrk (installed on demand) or a Python fallback.

Deliveries are signed right before each run, because Standard Webhooks refuses a timestamp
more than 5 minutes old, and written to a file that every wrk thread reads its own share of.
"""

from __future__ import annotations

import contextlib
import http.client
import json
import multiprocessing
import os
import shutil
import subprocess
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

import standardwebhooks

from bench.common import WEBHOOK_PATH, log

LUA_SCRIPT = Path(__file__).resolve().parent / "wrk_deliveries.lua"
WRK_THREADS = 2


@dataclass(frozen=True)
class LoadResult:
    """What one load run measured."""

    generator: str
    requests: int
    seconds: float
    p50_ms: float
    p99_ms: float
    max_ms: float
    errors: int  # non-2xx answers plus socket errors
    wraps: int  # how often a connection ran out of distinct deliveries and started over

    @property
    def rps(self) -> float:
        """Requests answered per second."""
        return self.requests / self.seconds if self.seconds else 0.0


def training_payload(training_id: str, status: str) -> str:
    """A compact training body shaped like Replicate's start webhook (about 1 KB)."""
    payload = {
        "id": training_id,
        "model": "bench-owner/flux-trainer",
        "version": "1521cfb274804aedd5aaeb0c4b2ee2cf0698a86967db5dbaed79b53392ed9c0f",
        "status": status,
        "input": {
            "input_images": "https://example.invalid/inputs/high_steps-inputs.zip",
            "learning_rate": 0.0002,
            "lora_rank": 128,
            "steps": 1000,
            "trigger_word": "TOK",
        },
        "output": None,
        "error": None,
        "logs": "flux-train: step 1/1000 loss=0.4123\n",
        "metrics": {},
        "created_at": "2026-11-28T12:40:32.23Z",
        "started_at": "2026-11-28T12:46:40.156272412Z",
        "completed_at": None,
        "source": "api",
        "urls": {
            "get": f"https://api.replicate.com/v1/trainings/{training_id}",
            "cancel": f"https://api.replicate.com/v1/trainings/{training_id}/cancel",
        },
        "webhook": "https://example.invalid/webhooks/replicate",
        "webhook_events_filter": ["start", "completed"],
    }
    return json.dumps(payload, separators=(",", ":"))


def write_signed(
    path: Path,
    deliveries: Sequence[tuple[str, str]],
    secret: str,
    *,
    bad_signature: bool = False,
) -> Path:
    """Sign (webhook_id, body) pairs now and write them for the generator; returns path."""
    webhook = standardwebhooks.Webhook(secret)
    now = datetime.now(UTC)
    timestamp = str(int(now.timestamp()))
    with path.open("w") as out:
        for webhook_id, body in deliveries:
            signature = webhook.sign(webhook_id, now, body)
            if bad_signature:
                # Same length and alphabet, one byte off: refused only by the HMAC compare.
                head, digest = signature.split(",", 1)
                signature = f"{head},{'A' if digest[0] != 'A' else 'B'}{digest[1:]}"
            out.write(f"{webhook_id}\t{timestamp}\t{signature}\t{body}\n")
    return path


def ensure_wrk() -> str | None:
    """The wrk binary, installed from Debian's packages when missing and we may; else None."""
    found = shutil.which("wrk")
    if found:
        return found
    if os.environ.get("BENCH_NO_INSTALL") or os.geteuid() != 0 or not shutil.which("apt-get"):
        return None
    log("wrk is missing: installing it with apt-get (set BENCH_NO_INSTALL=1 to skip)")
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    install = ["apt-get", "install", "-y", "-qq", "wrk"]
    # A fresh machine may have no package lists yet: update only when the install fails.
    for argv in (install, ["apt-get", "update", "-qq"], install):
        if shutil.which("wrk"):
            break
        with contextlib.suppress(OSError, subprocess.TimeoutExpired):
            subprocess.run(argv, env=env, capture_output=True, timeout=300, check=False)
    return shutil.which("wrk")


def run_load(
    port: int,
    request_file: Path,
    *,
    seconds: float,
    connections: int,
    delay_ms: float = 0.0,
    generator: str | None = None,
) -> LoadResult:
    """Drive 127.0.0.1:port with the deliveries in request_file for `seconds` (generator:
    auto, wrk or python; BENCH_GENERATOR when not given)."""
    generator = generator or os.environ.get("BENCH_GENERATOR", "auto")
    wrk = ensure_wrk() if generator in ("auto", "wrk") else None
    if wrk:
        return _run_wrk(wrk, port, request_file, seconds, connections, delay_ms)
    return _run_python(port, request_file, seconds, connections, delay_ms)


def _run_wrk(
    wrk: str, port: int, request_file: Path, seconds: float, connections: int, delay_ms: float
) -> LoadResult:
    threads = min(WRK_THREADS, connections)
    env = {
        **os.environ,
        "BENCH_REQUESTS": str(request_file),
        "BENCH_THREADS": str(threads),
        "BENCH_PATH": WEBHOOK_PATH,
        "BENCH_DELAY_MS": str(round(delay_ms)),
    }
    argv = [
        wrk,
        f"-t{threads}",
        f"-c{connections}",
        f"-d{round(seconds)}s",
        "--timeout",
        "10s",
        "-s",
        str(LUA_SCRIPT),
        f"http://127.0.0.1:{port}{WEBHOOK_PATH}",
    ]
    done = subprocess.run(argv, env=env, capture_output=True, text=True, timeout=seconds + 60)
    for line in done.stdout.splitlines():
        if line.startswith("BENCHJSON "):
            data = json.loads(line.removeprefix("BENCHJSON "))
            break
    else:
        raise RuntimeError(f"wrk gave no result: {done.stdout[-500:]} {done.stderr[-500:]}")
    errors = sum(
        data[key]
        for key in ("connect_errors", "read_errors", "write_errors", "status_errors", "timeouts")
    )
    return LoadResult(
        generator="wrk",
        requests=data["requests"],
        seconds=data["duration_us"] / 1e6,
        p50_ms=data["p50_us"] / 1000,
        p99_ms=data["p99_us"] / 1000,
        max_ms=data["max_us"] / 1000,
        errors=errors,
        wraps=data["wraps"],
    )


# --- the fallback: processes of keep-alive http.client connections ------------------------


def _python_worker(
    args: tuple[int, list[str], float, int, float, float],
) -> tuple[list[float], int, int]:
    """One process: `connections` threads, each a keep-alive connection, closed loop."""
    port, lines, seconds, connections, delay_ms, start_at = args
    latencies: list[float] = []
    errors = 0
    wraps = 0
    lock = threading.Lock()

    def connection_loop(share: list[str]) -> None:
        nonlocal errors, wraps
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
        mine: list[float] = []
        bad = 0
        wrapped = 0
        position = 0
        deadline = start_at + seconds
        while time.time() < deadline and share:
            if position == len(share):
                position = 0
                wrapped += 1
            webhook_id, timestamp, signature, body = share[position].split("\t", 3)
            position += 1
            headers = {
                "Content-Type": "application/json",
                "webhook-id": webhook_id,
                "webhook-timestamp": timestamp,
                "webhook-signature": signature,
            }
            began = time.perf_counter()
            try:
                conn.request("POST", WEBHOOK_PATH, body=body.encode(), headers=headers)
                response = conn.getresponse()
                response.read()
                if not 200 <= response.status < 300:
                    bad += 1
            except (OSError, http.client.HTTPException):
                bad += 1
                conn.close()
                conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
            mine.append(time.perf_counter() - began)
            if delay_ms:
                time.sleep(delay_ms / 1000)
        conn.close()
        with lock:
            latencies.extend(mine)
            errors += bad
            wraps += wrapped

    while time.time() < start_at:
        time.sleep(0.001)
    workers = [
        threading.Thread(target=connection_loop, args=(lines[index::connections],))
        for index in range(connections)
    ]
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join()
    return latencies, errors, wraps


def _run_python(
    port: int, request_file: Path, seconds: float, connections: int, delay_ms: float
) -> LoadResult:
    lines = request_file.read_text().splitlines()
    processes = max(1, min(os.cpu_count() or 1, connections))
    per_process = [
        connections // processes + (i < connections % processes) for i in range(processes)
    ]
    start_at = time.time() + 0.5
    # Each process takes a disjoint slice of lines, so deliveries stay distinct.
    jobs = [
        (port, lines[offset::processes], seconds, count, delay_ms, start_at)
        for offset, count in enumerate(per_process)
    ]
    with multiprocessing.get_context("fork").Pool(processes) as pool:
        results = pool.map(_python_worker, jobs)
    latencies = sorted(value for result in results for value in result[0])
    if not latencies:
        raise RuntimeError("the Python load generator got no answer at all")

    def percentile(fraction: float) -> float:
        return latencies[min(len(latencies) - 1, int(fraction * len(latencies)))] * 1000

    return LoadResult(
        generator="python",
        requests=len(latencies),
        seconds=seconds,
        p50_ms=percentile(0.50),
        p99_ms=percentile(0.99),
        max_ms=latencies[-1] * 1000,
        errors=sum(result[1] for result in results),
        wraps=sum(result[2] for result in results),
    )
