"""Progress of the data layer's long work when output is not a terminal: periodic plain lines, never wrapped.

Nothing here depends on timing: the lines checked are the count-based ones (a line per further tenth of a
site), which appear however fast the work runs; timed lines may add to them but never replace them.
"""

from __future__ import annotations

import io
import os
import re
import subprocess
import sys
from pathlib import Path

from rich.console import Console

from partitions.progress import DataProgress

LINE = re.compile(r"^(\w+): (\w+) (\d+)/(\d+) clips, \d+ s$")


def plain_console(width: int = 80) -> tuple[Console, io.StringIO]:
    """A console writing to a buffer, as to a log file (not a terminal)."""
    buffer = io.StringIO()
    return Console(file=buffer, width=width, force_terminal=False), buffer


def counts(text: str, site: str) -> list[int]:
    """The done-counts of a site's progress lines, in order (checking every line's shape on the way)."""
    found = []
    for line in text.splitlines():
        match = LINE.match(line)
        assert match, f"not a progress line: {line!r}"
        if match[1] == site:
            found.append(int(match[3]))
    return found


def one_site(total: int, every_seconds: float) -> str:
    """What a site of ``total`` clips finished one by one prints to a non-terminal console."""
    console, buffer = plain_console()
    with DataProgress("prepared", console=console, every_seconds=every_seconds) as shown:
        site = shown.add("casme2", total)
        for _ in range(total):
            shown.advance(site)
    return buffer.getvalue()


def test_lines_come_at_the_start_each_tenth_and_the_end() -> None:
    text = one_site(48, every_seconds=1e9)
    assert counts(text, "casme2") == [0, 5, 10, 15, 20, 25, 30, 35, 40, 45, 48]
    assert text.splitlines()[-1].startswith("casme2: prepared 48/48 clips, ")


def test_timed_lines_only_add_to_the_counted_ones() -> None:
    assert counts(one_site(20, every_seconds=0.0), "casme2") == list(range(21))  # every clip is "stale" at once


def test_sites_sharing_one_pool_keep_their_own_counts() -> None:
    console, buffer = plain_console()
    with DataProgress("synthesised", console=console, every_seconds=1e9) as shown:
        first, second = shown.add("casme2", 4), shown.add("smic", 2)
        for site in (first, second, first, first, second, first):
            shown.advance(site)
    text = buffer.getvalue()
    assert counts(text, "casme2") == [0, 1, 2, 3, 4] and counts(text, "smic") == [0, 1, 2]
    assert "casme2: synthesised 4/4 clips" in text and "smic: synthesised 2/2 clips" in text


def test_lines_are_never_wrapped_whatever_the_width() -> None:
    console, buffer = plain_console(width=12)
    with DataProgress("prepared", console=console) as shown:
        site = shown.add("a-rather-long-site-name", 3)
        shown.advance(site, 3)
    lines = buffer.getvalue().splitlines()
    assert lines[-1].startswith("a-rather-long-site-name: prepared 3/3 clips, ") and len(lines) == 2


def test_disabled_progress_prints_nothing() -> None:
    console, buffer = plain_console()
    with DataProgress("prepared", console=console, enabled=False) as shown:
        shown.advance(shown.add("casme2", 5), 5)
    assert buffer.getvalue() == ""


def test_synth_command_writes_progress_lines_to_a_log_file(tmp_path: Path) -> None:
    """`fedmer synth` with stdout and stderr going to a file, as in a log."""
    log = tmp_path / "synth.log"
    command = [
        sys.executable,
        "-c",
        "from server.cli import app; app()",
        "synth",
        "--out",
        str(tmp_path / "out"),
        "--sites",
        "samm",
        "--subjects",
        "1",
        "--clips-per-subject",
        "2",
    ]
    environment = {**os.environ, "COLUMNS": "20", "TERM": "dumb"}
    with log.open("w") as handle:
        done = subprocess.run(
            command, stdout=handle, stderr=subprocess.STDOUT, env=environment, timeout=300, check=False
        )
    text = log.read_text()
    assert done.returncode == 0, text
    lines = [line for line in text.splitlines() if line.startswith("samm: synthesised")]
    assert counts("\n".join(lines), "samm") == [0, 1, 2], text
