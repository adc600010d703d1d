"""The processes a test starts: list them, stop them by process group, and prove that none is left.

Flower's SuperLink, SuperNode and SuperExec detach some of their children into sessions of their own, and those
outlive their parents; so a process counts as the test's when it descends from the test (or from a process the
test started) or when its command line holds a marker only the test uses (its private Ray or Flower folder).
"""

from __future__ import annotations

import os
import signal
import time
from collections.abc import Iterable
from pathlib import Path


def processes() -> dict[int, tuple[int, str]]:
    """pid -> (parent pid, command line) of every process this user can see."""
    found = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
            command = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        parent = int(stat[stat.rindex(")") + 2 :].split()[1])  # fields after "(comm)": state, ppid, ...
        found[int(entry.name)] = (parent, command)
    return found


def descendants(root: int, table: dict[int, tuple[int, str]]) -> set[int]:
    """Every process below ``root`` in ``table`` (:func:`processes`)."""
    children: dict[int, list[int]] = {}
    for pid, (parent, _command) in table.items():
        children.setdefault(parent, []).append(pid)
    found, stack = set(), [root]
    while stack:
        for child in children.get(stack.pop(), []):
            if child not in found:
                found.add(child)
                stack.append(child)
    return found


def _marked(table: dict[int, tuple[int, str]], markers: Iterable[Path | str]) -> set[int]:
    """Processes whose command line holds one of the markers."""
    texts = [str(marker) for marker in markers]
    return {pid for pid, (_parent, command) in table.items() if any(text in command for text in texts)}


def _alive(pids: Iterable[int], table: dict[int, tuple[int, str]]) -> set[int]:
    """Those of ``pids`` still running (an exited process not yet reaped, a zombie, has no command line)."""
    return {pid for pid in pids if table.get(pid, (0, ""))[1].strip()}


def leftovers(before: set[int], *markers: Path | str, watched: Iterable[int] = (), wait: float = 20.0) -> list[str]:
    """Processes started during the run that still live: our descendants not in ``before``, any of ``watched``,
    or anything whose command line holds a marker (waiting up to ``wait`` seconds for them to end)."""
    watched = set(watched)
    deadline = time.monotonic() + wait
    while True:
        table = processes()
        started = (descendants(os.getpid(), table) - before) | watched | _marked(table, markers)
        alive = [f"{pid}: {table[pid][1][:160]}" for pid in sorted(_alive(started, table))]
        if not alive or time.monotonic() > deadline:
            return alive
        time.sleep(0.5)


def _signal_groups(pids: Iterable[int], number: signal.Signals) -> None:
    """Send ``number`` to the process group of each pid, never to the test's own group."""
    own = os.getpgrp()
    groups = set()
    for pid in pids:
        try:
            groups.add(os.getpgid(pid))
        except ProcessLookupError:
            continue
    for group in groups - {own, 0, 1}:
        try:
            os.killpg(group, number)
        except ProcessLookupError:
            continue


def stop(roots: Iterable[int], *markers: Path | str, grace: float = 15.0) -> set[int]:
    """SIGTERM the process groups of ``roots``, of every process below them and of every process whose command
    line holds a marker; SIGKILL what still runs after ``grace`` seconds. Returns every pid it signalled."""
    table = processes()
    targets = set(roots) | _marked(table, markers)
    for root in list(targets):
        targets |= descendants(root, table)
    _signal_groups(_alive(targets, table), signal.SIGTERM)
    deadline = time.monotonic() + grace
    while (alive := _alive(targets, processes())) and time.monotonic() < deadline:
        time.sleep(0.25)
    _signal_groups(alive, signal.SIGKILL)
    return targets
