"""``fedmer synth | index | prepare``: the data layer's commands.

Each command is a thin shell over one function of this package; bad input
arrives as :class:`DataError` and is printed as one message, exit code 2.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console

from .errors import DataError

console = Console(stderr=True)

DatasetOpt = Annotated[str, typer.Option("--dataset", help="casme2, samm, smic (HS), smic-vis, smic-nir or casme3")]
RootOpt = Annotated[Path, typer.Option("--root", help="The database's top folder, as distributed")]
LabelsOpt = Annotated[
    str, typer.Option("--labels", help="composite3, casme2-5, samm-5, smic-3, casme3-7, or 'native' (raw emotions)")
]
SubsetOpt = Annotated[
    Path | None, typer.Option("--subset", help="Official sample list, CSV rows db,subject,filename,label")
]


def fail(error: DataError) -> typer.Exit:
    """Print a data error as the user sees it and return the exit to raise."""
    console.print(f"[bold red]error:[/] {error}", highlight=False)
    return typer.Exit(code=2)


def synth(
    out: Annotated[Path, typer.Option("--out", help="Folder that receives one database folder per site")],
    seed: Annotated[int, typer.Option("--seed")] = 0,
    sites: Annotated[str, typer.Option("--sites", help="Comma-separated: casme2, samm, smic, casme3")] = (
        "casme2,samm,smic"
    ),
    subjects: Annotated[int, typer.Option("--subjects", min=1)] = 8,
    clips_per_subject: Annotated[int, typer.Option("--clips-per-subject", min=1)] = 6,
) -> None:
    """Write synthetic ME databases in their native layouts, with exact ground truth beside the frames."""
    from .synth.writer import synthesise

    try:
        written = synthesise(
            out, seed=seed, sites=[s.strip() for s in sites.split(",") if s.strip()],
            subjects=subjects, clips_per_subject=clips_per_subject,
        )
    except DataError as error:
        raise fail(error) from None
    for site, path in written.items():
        console.print(f"{site}: {path}")


def index(
    dataset: DatasetOpt,
    root: RootOpt,
    labels: LabelsOpt = "native",
    subset: SubsetOpt = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print one JSON object")] = False,
) -> None:
    """Say what a site holds (samples, subjects, classes, skipped entries) without decoding an image."""
    from .index import describe_site, render_description

    try:
        description = describe_site(dataset, root, labels=labels, subset=subset)
    except DataError as error:
        raise fail(error) from None
    if as_json:
        typer.echo(json.dumps(description, indent=2))
    else:
        render_description(description, Console())


def prepare(
    dataset: DatasetOpt,
    root: RootOpt,
    cache: Annotated[Path, typer.Option("--cache", help="Cache folder (shared by all sites and settings)")],
    workers: Annotated[int, typer.Option("--workers", min=1)] = 1,
    labels: LabelsOpt = "native",
    subset: SubsetOpt = None,
) -> None:
    """Detect, align and crop faces, sample T frames and compute TV-L1 flow into a resumable cache."""
    from .cache import prepare_site, render_report

    try:
        report = prepare_site(dataset, root, cache, workers=workers, labels=labels, subset=subset)
    except DataError as error:
        raise fail(error) from None
    render_report(report, Console())


def register(app: typer.Typer) -> None:
    """Add the data layer's commands to the ``fedmer`` command."""
    app.command()(synth)
    app.command()(index)
    app.command()(prepare)
