"""``fedmer index``: what a site holds, as a dict for ``--json`` and as a table for people.

The counts come from :func:`partitions.labels.load_site`, so they are exactly
what training will see (label space and subset list applied); no image is
decoded. Database facts are in ``/work/shared/reference/datasets.md``.
"""

from __future__ import annotations

from pathlib import Path

from rich.console import Console
from rich.table import Table

from .labels import load_site


def describe_site(dataset: str, root: Path, labels: str = "native", subset: Path | None = None) -> dict:
    """Samples, subjects, per-class counts (every class of the space, zeros included) and skipped entries."""
    site = load_site(dataset, Path(root), labels=labels, subset=subset)
    counts = dict.fromkeys(site.space.classes, 0)
    for target in site.targets:
        counts[site.space.classes[target]] += 1
    return {
        "database": site.database,
        "root": str(site.root),
        "labels": site.space.name,
        "samples": len(site.samples),
        "subjects": len(site.subjects),
        "classes": counts,
        "skipped": [{"entry": s.entry, "reason": s.reason} for s in site.skipped],
    }


def render_description(description: dict, console: Console) -> None:
    """Print a site description: a summary line, a class table and, when any, the skipped entries."""
    console.print(
        f"[bold]{description.get('database', '?')}[/] at {description.get('root', '?')} "
        f"(labels: {description.get('labels', '?')}): {description['samples']} samples, "
        f"{description['subjects']} subjects",
        highlight=False,
        soft_wrap=True,  # one line whatever the width: a log is searched line by line
    )
    total = max(description["samples"], 1)
    classes = Table(title="Classes")
    classes.add_column("class")
    classes.add_column("samples", justify="right")
    classes.add_column("share", justify="right")
    for name, count in description["classes"].items():
        classes.add_row(name, str(count), f"{100 * count / total:.1f}%")
    console.print(classes)
    skipped = description["skipped"]
    if skipped:
        table = Table(title=f"Skipped ({len(skipped)})")
        table.add_column("entry", overflow="fold")
        table.add_column("reason", overflow="fold")
        for item in skipped:
            table.add_row(item["entry"], item["reason"])
        console.print(table)
