"""`make bench`: run every benchmark, print one table, append the run to bench/RESULTS.md.

Each figure is printed beside the reference measured in the same run and their ratio
(measured / reference), because this machine is shared and absolute numbers drift.
A part that cannot run says "not measured" and why, instead of a number.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
import traceback
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path

from bench.common import (
    Figure,
    admin_url,
    cpu_model,
    git_commit,
    log,
    not_measured,
    throwaway_database,
)

RESULTS = Path(__file__).resolve().parent / "RESULTS.md"
PARTS = ("dbpath", "ingest", "percall", "sweep", "scale", "big_bodies", "notify")


def _run_dbpath(admin: str) -> list[Figure]:
    from bench import dbpath

    with throwaway_database(admin) as url:
        return dbpath.measure(url)


def _run_ingest(admin: str) -> list[Figure]:
    from bench import ingest

    with throwaway_database(admin) as url:
        return ingest.measure(url)


def _run_percall(admin: str) -> list[Figure]:
    from bench import percall

    with throwaway_database(admin) as url:
        return percall.measure(url)


def _run_sweep(admin: str) -> list[Figure]:
    try:
        from bench import sweep
    except ImportError as exc:
        return [not_measured("sweep", "sweep of 10,000 in flight", f"cannot import: {exc}")]
    return sweep.measure(admin)


def _run_scale(admin: str) -> list[Figure]:
    from bench import scale

    return scale.measure(admin)


def _run_big_bodies(admin: str) -> list[Figure]:
    from bench import big_bodies

    with throwaway_database(admin) as url:
        return big_bodies.measure(url)


def _run_notify(admin: str) -> list[Figure]:
    from bench import notify

    with throwaway_database(admin) as url:
        return notify.measure(url)


RUNNERS: dict[str, Callable[[str], list[Figure]]] = {
    "dbpath": _run_dbpath,
    "ingest": _run_ingest,
    "percall": _run_percall,
    "sweep": _run_sweep,
    "scale": _run_scale,
    "big_bodies": _run_big_bodies,
    "notify": _run_notify,
}


def _number(value: float | None, unit: str = "") -> str:
    if value is None:
        return "—"
    if abs(value) >= 100:
        text = f"{value:,.0f}"
    elif abs(value) >= 10:
        text = f"{value:.1f}"
    else:
        text = f"{value:.3g}"
    return f"{text} {unit}".strip()


def render_table(figures: list[Figure]) -> list[str]:
    """The figures as one Markdown table, then their notes as a numbered list."""
    lines = [
        "| figure | measured | reference | ratio | target | met |",
        "|---|---:|---|---:|---|:-:|",
    ]
    notes = []
    for figure in figures:
        reference = ""
        if figure.reference is not None:
            reference = f"{_number(figure.reference)} ({figure.reference_name})"
        ratio = f"{figure.ratio:.2f}" if figure.ratio is not None else ""
        met = {True: "yes", False: "**no**", None: ""}[figure.met]
        measured = _number(figure.value, figure.unit) if figure.value is not None else "—"
        label = f"{figure.section}: {figure.name}"
        if figure.note:
            notes.append(figure.note)
            label += f" [{len(notes)}]"
        lines.append(f"| {label} | {measured} | {reference} | {ratio} | {figure.target} | {met} |")
    lines.append("")
    lines += [f"{number}. {note}" for number, note in enumerate(notes, start=1)]
    return lines


def _header(started: datetime, elapsed: float, commit: str, load: str) -> list[str]:
    return [
        f"## {started:%Y-%m-%d %H:%M} UTC — commit `{commit}`",
        "",
        f"- machine: {os.cpu_count()} cores, {cpu_model()}; load average at start {load}",
        f"- Python {sys.version.split()[0]}; whole run {elapsed:.0f} s; ratio = measured /"
        " reference, both from this run",
        "",
    ]


def main(argv: list[str] | None = None) -> int:
    """Run the chosen parts (all by default); print the table; record it unless told not to."""
    parser = argparse.ArgumentParser(prog="python -m bench", description=__doc__)
    parser.add_argument("--only", action="append", choices=PARTS, help="run only this part")
    parser.add_argument(
        "--no-record", action="store_true", help="print the table but leave RESULTS.md alone"
    )
    args = parser.parse_args(argv)
    parts = args.only or list(PARTS)
    started = datetime.now(UTC)
    began = time.monotonic()
    commit = git_commit()
    load = " ".join(Path("/proc/loadavg").read_text().split()[:3])
    figures: list[Figure] = []
    with admin_url() as admin:
        for part in parts:
            log(f"== {part}")
            try:
                figures += RUNNERS[part](admin)
            except Exception as exc:  # one broken part must not hide the others' figures
                traceback.print_exc()
                figures.append(not_measured(part, "all figures", f"{type(exc).__name__}: {exc}"))
    lines = _header(started, time.monotonic() - began, commit, load) + render_table(figures)
    print("\n".join(lines))
    if not args.no_record:
        existing = RESULTS.read_text() if RESULTS.exists() else _RESULTS_PREAMBLE
        RESULTS.write_text(existing.rstrip() + "\n\n" + "\n".join(lines) + "\n")
        log(f"appended to {RESULTS}")
    return 0


_RESULTS_PREAMBLE = """# Benchmark results

Appended by `make bench` (`python -m bench`), newest last. Each run names the commit it
measured (`+dirty` when the working tree differed from it), the machine and its load.
"""


if __name__ == "__main__":
    sys.exit(main())
