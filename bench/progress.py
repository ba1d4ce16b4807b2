"""Progress on the terminal while a bench runs: what is running, step k of n, round r of R, and
the time left, estimated from the steps done so far (each step's expected length weighs it).

On a terminal the line is redrawn in place; otherwise (a log, CI) one line per step. Always on
stderr, so `--json` output on stdout stays clean.
"""

from __future__ import annotations

import sys
import time
from typing import TextIO


def _duration(seconds: float) -> str:
    seconds = max(0, int(seconds + 0.5))
    if seconds < 60:
        return f"{seconds}s"
    return f"{seconds // 60}m{seconds % 60:02d}s"


class Progress:
    def __init__(self, total_weight: float, steps: int, stream: TextIO | None = None, quiet: bool = False) -> None:
        self.stream = stream or sys.stderr
        self.tty = self.stream.isatty()
        self.quiet = quiet
        self.total_weight = max(total_weight, 1e-9)
        self.steps = steps
        self.done_weight = 0.0
        self.done_steps = 0
        self.start = time.monotonic()
        self._width = 0

    def eta(self) -> float | None:
        """Seconds left: elapsed time per unit of weight so far, times the weight left."""
        if self.done_weight <= 0:
            return None
        elapsed = time.monotonic() - self.start
        return elapsed / self.done_weight * (self.total_weight - self.done_weight)

    def begin(self, what: str, round_: int, rounds: int, weight_hint: float | None = None) -> None:
        if self.quiet:
            return
        eta = self.eta()
        left = f", about {_duration(eta)} left" if eta is not None else (
            f", about {_duration(weight_hint)} left (estimate)" if weight_hint else "")
        text = f"[{self.done_steps + 1}/{self.steps}] {what}, round {round_} of {rounds}{left}"
        if self.tty:
            pad = max(0, self._width - len(text))
            self.stream.write("\r" + text + " " * pad)
            self._width = len(text)
        else:
            self.stream.write(text + "\n")
        self.stream.flush()

    def end(self, weight: float) -> None:
        self.done_weight += weight
        self.done_steps += 1

    def say(self, text: str) -> None:
        """A message that stays (a skipped scenario, a failed step)."""
        if self.quiet:
            return
        if self.tty and self._width:
            self.stream.write("\r" + " " * self._width + "\r")
            self._width = 0
        self.stream.write(text + "\n")
        self.stream.flush()

    def finish(self) -> None:
        if self.quiet:
            return
        self.say(f"done in {_duration(time.monotonic() - self.start)}")
