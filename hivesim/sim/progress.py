"""A one-line progress display for ``hivesim run``: time, live peers, the workload's headline.

On a terminal the line is redrawn in place; otherwise (CI, a log file) a plain line is printed every
few seconds, so logs stay readable.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path
from typing import Any, TextIO


class Progress:
    def __init__(self, duration: float, enabled: bool = True, stream: TextIO | None = None, every: float = 5.0) -> None:
        self.duration = duration
        self.enabled = enabled
        self.stream = stream or sys.stderr
        self.tty = self.stream.isatty()
        self.every = every
        self._last = 0.0
        self._drawn = False

    def note(self, message: str) -> None:
        if not self.enabled:
            return
        self._clear()
        print(f"hivesim: {message}", file=self.stream, flush=True)

    def update(self, elapsed: float, alive: int, total: int, headline: str) -> None:
        if not self.enabled:
            return
        now = time.monotonic()
        if not self.tty and now - self._last < self.every:
            return
        self._last = now
        width = 24
        done = min(1.0, elapsed / self.duration)
        bar = "#" * int(done * width) + "-" * (width - int(done * width))
        line = f"[{bar}] {elapsed:5.1f}/{self.duration:.0f} s  peers {alive}/{total}  {headline}"
        if self.tty:
            print("\r" + line[:160].ljust(100), end="", file=self.stream, flush=True)
            self._drawn = True
        else:
            print(line, file=self.stream, flush=True)

    def _clear(self) -> None:
        if self._drawn:
            print(file=self.stream)
            self._drawn = False

    def done(self, summary: dict[str, Any], run_dir: Path, figures: list[Path]) -> None:
        if not self.enabled:
            return
        self._clear()
        out = self.stream
        status = "interrupted" if summary.get("interrupted") else ("failed" if summary.get("error") else "finished")
        print(f"hivesim: run {summary['name']} {status} in {summary['wall_time_s']} s "
              f"({summary['peers']} peers; at the end {summary['actors_at_end']} actors using "
              f"{summary['memory_mib'].get('actors_total_at_end')} MiB)", file=out)
        events = summary.get("events", {})
        if any(events.values()):
            print("  events: " + ", ".join(f"{v} {k}" for k, v in events.items() if v), file=out)
        for key, value in (summary.get("workload") or {}).items():
            print(f"  {key}: {value}", file=out)
        if summary.get("shaper"):
            s = summary["shaper"]
            print(f"  link shaper: {s['held_messages']} messages held, released {s['mean_late_ms']} ms late on average "
                  f"(max {s['max_late_ms']} ms)", file=out)
        print(f"  results: {run_dir}", file=out)
        for figure in figures:
            print(f"  figure:  {figure}", file=out)
        out.flush()
