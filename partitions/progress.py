"""Live progress of the data layer's long work (``fedmer synth``, ``fedmer prepare``, ``fedmer simulate``'s data step).

On a terminal it is a rich bar per site. When output goes to a log file or a pipe, a bar shows nothing until
it ends, so the progress comes as plain lines instead (``casme2: prepared 24/48 clips, 31 s``): one when a
site starts, one each time a further tenth of its clips is done, one after at most ``every_seconds`` when
clips finished since the last line, and one when it is done. The count-based lines alone already show
progress; the timed ones keep a slow site visibly alive. Plain lines are never wrapped, whatever width the
console assumes.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from types import TracebackType
from typing import Any

from rich.console import Console

LINES_PER_SITE = 10
EVERY_SECONDS = 10.0


@dataclass
class _Count:
    """One site's count for the plain lines."""

    label: str
    total: int
    done: int = 0
    shown: int = 0  # ``done`` when the last line was printed
    start: float = field(default_factory=time.monotonic)
    last_line: float = field(default_factory=time.monotonic)


class DataProgress:
    """Progress of several sites' clips: ``add`` a site, ``advance`` it as clips finish.

    ``verb`` says what finishing a clip means (``prepared``, ``written``). Use it as a context manager; it
    prints nothing when ``enabled`` is false.
    """

    def __init__(
        self,
        verb: str,
        *,
        noun: str = "clips",
        console: Console | None = None,
        enabled: bool = True,
        every_seconds: float = EVERY_SECONDS,
        lines_per_site: int = LINES_PER_SITE,
    ) -> None:
        self.verb, self.noun = verb, noun
        self.console = console or Console(stderr=True)
        self.enabled = enabled
        self.every_seconds = every_seconds
        self.lines_per_site = max(1, lines_per_site)
        self._counts: list[_Count] = []
        self._bar: Any = None
        if enabled and self.console.is_terminal:
            from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

            self._bar = Progress(
                TextColumn(f"[bold]{verb}[/] {{task.description}}"),
                BarColumn(),
                MofNCompleteColumn(),
                TimeElapsedColumn(),
                console=self.console,
            )

    def __enter__(self) -> DataProgress:
        if self._bar is not None:
            self._bar.start()
        return self

    def __exit__(
        self, kind: type[BaseException] | None, error: BaseException | None, trace: TracebackType | None
    ) -> None:
        if self._bar is not None:
            self._bar.stop()

    def add(self, label: str, total: int) -> int:
        """Start counting a site's ``total`` clips; returns the handle ``advance`` takes."""
        self._counts.append(_Count(label, total))
        if self._bar is not None:
            self._bar.add_task(label, total=total)
        elif self.enabled:
            self._line(self._counts[-1])
        return len(self._counts) - 1

    def advance(self, site: int, clips: int = 1) -> None:
        """Count ``clips`` more finished clips of a site."""
        count = self._counts[site]
        count.done += clips
        if self._bar is not None:
            self._bar.advance(site, clips)
        elif self.enabled and self._line_due(count):
            self._line(count)

    def _line_due(self, count: _Count) -> bool:
        """Due at the end, at each further tenth of the site, or when clips finished since a line ``every_seconds``
        old (a site waiting for its turn in a shared pool stays quiet)."""
        step = max(1, math.ceil(count.total / self.lines_per_site))
        crossed = count.done // step > count.shown // step
        stale = count.done > count.shown and time.monotonic() - count.last_line >= self.every_seconds
        return count.done >= count.total or crossed or stale

    def _line(self, count: _Count) -> None:
        count.shown, count.last_line = count.done, time.monotonic()
        seconds = count.last_line - count.start
        self.console.print(
            f"{count.label}: {self.verb} {count.done}/{count.total} {self.noun}, {seconds:.0f} s",
            markup=False,
            highlight=False,
            soft_wrap=True,
        )
