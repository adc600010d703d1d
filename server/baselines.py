"""``fedmer train --mode central|local``: the federation's two baselines, same network, data, splits and records.

- ``central`` trains one network on the union of every site's training split (what pooling the data would
  give) and scores it on each site's test split;
- ``local`` trains one network per site on that site's training split alone (what a site gets without the
  federation) and scores it on the site's own test split.

The run config is resolved exactly as ``fedmer simulate`` resolves it (:func:`server.simulate.simulation_config`:
``DEFAULTS`` <- ``--config`` TOML <- options, checked by :func:`server.server_app.resolve_settings`), the same
synthetic sites are prepared (:func:`server.simulate.prepare_data`) and every site is split by
:func:`client.site.load_data` with the run's :class:`client.site.SplitSettings`: with the same seed each site
holds out the same test subjects as in the federation. Strategy keys are checked but play no part.

Compute budget: a round is ``local-epochs`` epochs of training, then an evaluation of every site's test split,
so R rounds here cost what R federation rounds with the same local epochs cost. Each round is one call of
:func:`client.task.train_local`, as a site's federated round is: a fresh Adam, seed ``seed + site index + round``
(site index 0 for central), augmentation epochs from ``(round - 1) * local-epochs`` on, FED-PsyAU's prior weight
decaying over the rounds, and the AU co-occurrence prior of the training clips the network sees (all sites'
for central, which is the federation's prior; the site's own for local). Every network starts from the
federation's initial weights (``torch.manual_seed(seed)``, then the build). Plain torch in this process: no
Flower engine, no Ray.

Records (:class:`server.records.RunDirectory`), as the federation writes them:

- ``config.json``: the resolved run config with ``mode`` added and ``strategy`` set to the mode;
- ``metrics.jsonl``: per round, the train line(s) with the contract's ``TRAIN_METRIC_KEYS`` (central: one line
  for site ``central``, without ``site-index``; local: one per site; ``bytes-sent`` is 0, nothing leaves a
  site) and one evaluate line per site with ``EVALUATE_METRIC_KEYS`` (confusion matrix included);
- checkpoints: central ``checkpoints/round-NNNN.safetensors``, local ``checkpoints/<site>/round-NNNN.safetensors``
  (metadata ``round`` and ``site``; :func:`server.records.load_checkpoint` reads both);
- ``summary.json``, the table and ``rounds.png`` by :func:`server.server_app.write_results`: per site the last
  round's scores, pooled UF1 / UAR from the sum of the sites' confusion matrices.

The console gets one line per round (central, UF1 pooled over the sites) or per round and site (local): the
round's training loss, test UF1 and training seconds.
"""

from __future__ import annotations

import copy
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from enum import StrEnum
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer
from rich.console import Console

from partitions.cli import fail
from partitions.errors import DataError
from server.simulate import (
    DEFAULT_CACHE,
    DEFAULT_DATA,
    CacheOption,
    ConfigOption,
    DataOption,
    OutOption,
    Scale,
    ScaleOption,
    SeedOption,
    check_out,
    prepare_data,
    simulation_config,
    simulation_environment,
)

if TYPE_CHECKING:  # torch and the model stack load only when a run starts: `fedmer --help` stays fast
    from client.site import SiteData
    from client.task import LocalTraining
    from models import F5CNet
    from partitions.dataset import ClipDataset
    from partitions.records import Sample
    from server.records import RunDirectory
    from server.server_app import ServerSettings

console = Console(stderr=True)

CENTRAL_SITE = "central"
"""How central's train lines name their site (the union of all sites)."""

TRAIN, EVALUATE = "train", "evaluate"  # the phases of metrics.jsonl (server.strategies.TRAIN / EVALUATE)


class Mode(StrEnum):
    """Which baseline: one network on every site's training clips, or one network per site."""

    central = "central"
    local = "local"


# ----------------------------------------------------------------------------------------------- pieces


@dataclass
class Ledger:
    """What :func:`server.server_app.write_results` reads of a strategy: each site's metrics, and failures
    (none here: a failing round stops the run)."""

    site_metrics: list[dict[str, Any]] = field(default_factory=list)
    failures: list[dict[str, Any]] = field(default_factory=list)

    def add(self, server_round: int, phase: str, site_index: int, metrics: Mapping[str, Any]) -> None:
        self.site_metrics.append(
            {"round": server_round, "phase": phase, "site_index": site_index, "metrics": dict(metrics)}
        )


class SiteUnion:
    """Every site's training split end to end (a torch ``ConcatDataset``) that passes ``set_epoch`` on to each
    split, so each clip gets the augmentation it gets on its own site in the same epoch."""

    def __init__(self, parts: Sequence[ClipDataset]) -> None:
        from torch.utils.data import ConcatDataset

        self.parts = list(parts)
        self.union = ConcatDataset(self.parts)

    def __len__(self) -> int:
        return len(self.union)

    def __getitem__(self, index: int) -> dict[str, Any]:
        return self.union[index]

    def set_epoch(self, epoch: int) -> None:
        for part in self.parts:
            part.set_epoch(epoch)

    @property
    def samples(self) -> list[Sample]:
        return [sample for part in self.parts for sample in part.samples]


def load_sites(settings: ServerSettings) -> list[SiteData]:
    """Each site's split data, exactly as the federation's node for partition ``i`` loads it."""
    from client.site import SiteSpec, SplitSettings, load_data

    split = SplitSettings.of(settings.run)
    return [
        load_data(SiteSpec.from_config({"partition-id": index}, settings.config), split)
        for index in range(len(settings.sites))
    ]


def initial_model(settings: ServerSettings) -> F5CNet:
    """The federation's initial network (what every site receives in round 1)."""
    import torch

    from models import build_model

    torch.manual_seed(settings.run.seed)
    return build_model(settings.run.model_config(settings.classes))


def au_prior(parts: Sequence[Sequence[Sample]]) -> list[float]:
    """The AU co-occurrence prior the federation's query round would build from these training splits."""
    from client.task import au_cooccurrence
    from server.strategies import cooccurrence_prior

    return cooccurrence_prior([au_cooccurrence(samples)[0].flatten().tolist() for samples in parts])


def round_training(settings: ServerSettings, site_index: int, server_round: int, device: str) -> LocalTraining:
    """One round's training, as a site's federated round with the run config's settings."""
    from client.task import LocalTraining
    from server.strategies import decay_prior_weight

    run = settings.run
    return LocalTraining(
        epochs=run.local_epochs,
        lr=run.lr,
        prior_weight=decay_prior_weight(server_round, settings.rounds),
        batch_size=run.batch_size,
        seed=run.seed + site_index + server_round,
        first_epoch=(server_round - 1) * run.local_epochs,
        weights=run.weights,
        device=device,
        server_round=server_round,
    )


def site_checkpoint_path(run: RunDirectory, site: str, server_round: int) -> Path:
    """``checkpoints/<site>/round-NNNN.safetensors``: local mode keeps one network per site."""
    from server.records import CHECKPOINTS, checkpoint_name

    return run.path / CHECKPOINTS / site / checkpoint_name(server_round)


def save_site_checkpoint(run: RunDirectory, site: str, server_round: int, model: F5CNet) -> Path:
    """One site's network after a round, as :meth:`RunDirectory.save_checkpoint` writes the global one (atomic;
    metadata ``round`` and ``site``)."""
    import torch
    from safetensors.torch import save

    from partitions.cache import atomic_write

    tensors = {
        name: torch.as_tensor(tensor).detach().to("cpu").clone(memory_format=torch.contiguous_format)
        for name, tensor in model.state_dict().items()
    }
    path = site_checkpoint_path(run, site, server_round)
    atomic_write(path, save(tensors, metadata={"round": str(int(server_round)), "site": site}))
    return path


def _uf1(value: float | None) -> float:
    return float("nan") if value is None else value


def _progress(
    console_out: Console, server_round: int, rounds: int, site: str, loss: float, uf1: float, seconds: float
) -> None:
    """The federation's progress line (:class:`server.server_app.Progress`)."""
    console_out.print(
        f"round {server_round}/{rounds}  {site:<10} loss {loss:.4f}  UF1 {uf1:.4f}  {seconds:.1f}s", highlight=False
    )


# ----------------------------------------------------------------------------------------------- the modes


def train_central(
    settings: ServerSettings, sites: Sequence[SiteData], run: RunDirectory, ledger: Ledger, console_out: Console
) -> None:
    """One network on the union of the sites' training splits, scored on every site's test split each round."""
    from client.task import evaluate_local, evaluate_metrics, set_au_prior, train_local, train_metrics
    from server.server_app import pooled_scores

    model = initial_model(settings)
    set_au_prior(model, au_prior([data.train.samples for data in sites]))
    union = SiteUnion([data.train for data in sites])
    device = sites[0].spec.device
    run_settings = settings.run
    for server_round in range(1, settings.rounds + 1):
        outcome = train_local(model, union, settings.classes, round_training(settings, 0, server_round, device))
        metrics = train_metrics(None, outcome, bytes_sent=0)
        run.append_metrics(server_round, TRAIN, CENTRAL_SITE, metrics)
        confusions = []
        for index, data in enumerate(sites):
            seed = run_settings.seed + index + server_round
            result = evaluate_local(model, data.test, settings.classes, run_settings.batch_size, device, seed=seed)
            evaluation = evaluate_metrics(index, result)
            run.append_metrics(server_round, EVALUATE, settings.site_name(index), evaluation)
            ledger.add(server_round, EVALUATE, index, evaluation)
            confusions.append(result.confusion)
        run.save_checkpoint(server_round, model.state_dict())
        pooled = pooled_scores(confusions)["uf1"]
        _progress(
            console_out, server_round, settings.rounds, CENTRAL_SITE, metrics["loss"], _uf1(pooled), outcome.seconds
        )


def train_local_sites(
    settings: ServerSettings, sites: Sequence[SiteData], run: RunDirectory, ledger: Ledger, console_out: Console
) -> None:
    """One network per site on its own training split, scored on its own test split; round by round, all sites
    in turn (as the federation's records run)."""
    from client.task import evaluate_local, evaluate_metrics, set_au_prior, train_local, train_metrics

    start = initial_model(settings)
    models = []
    for data in sites:
        model = copy.deepcopy(start)
        set_au_prior(model, au_prior([data.train.samples]))
        models.append(model)
    run_settings = settings.run
    for server_round in range(1, settings.rounds + 1):
        for index, (data, model) in enumerate(zip(sites, models, strict=True)):
            site, device = settings.site_name(index), data.spec.device
            options = round_training(settings, index, server_round, device)
            outcome = train_local(model, data.train, settings.classes, options)
            metrics = train_metrics(index, outcome, bytes_sent=0)
            run.append_metrics(server_round, TRAIN, site, metrics)
            ledger.add(server_round, TRAIN, index, metrics)
            seed = run_settings.seed + index + server_round
            result = evaluate_local(model, data.test, settings.classes, run_settings.batch_size, device, seed=seed)
            evaluation = evaluate_metrics(index, result)
            run.append_metrics(server_round, EVALUATE, site, evaluation)
            ledger.add(server_round, EVALUATE, index, evaluation)
            save_site_checkpoint(run, site, server_round, model)
            _progress(console_out, server_round, settings.rounds, site, metrics["loss"], result.uf1, outcome.seconds)


def run_baseline(config: Mapping[str, Any], mode: Mode | str, console_out: Console | None = None) -> Path:
    """One whole baseline run on a resolved config whose sites are prepared; returns the run directory.

    DataError (before anything is written) for a bad setting or a site that is not prepared.
    """
    from server.records import RunDirectory
    from server.server_app import resolve_settings, write_results

    mode = Mode(mode)
    console_out = console_out or Console()
    settings = resolve_settings(config)
    sites = load_sites(settings)
    run = RunDirectory(settings.out)
    run.write_config({**settings.config, "strategy": mode.value, "mode": mode.value})
    console_out.print(
        f"fedmer train: {mode.value}, {settings.rounds} rounds of {settings.run.local_epochs} epoch(s), sites "
        f"{', '.join(settings.site_names)}; records in {run.path}",
        highlight=False,
    )
    ledger = Ledger()
    train = train_central if mode is Mode.central else train_local_sites
    train(settings, sites, run, ledger, console_out)
    write_results(run, ledger, settings, console_out)  # type: ignore[arg-type]  # reads site_metrics, failures
    return run.path


# ----------------------------------------------------------------------------------------------- command


def train(
    mode: Annotated[
        Mode,
        typer.Option("--mode", help="central: one network on every site's training clips; local: one network per site"),
    ],
    rounds: Annotated[
        int | None,
        typer.Option("--rounds", min=1, help="Rounds of local-epochs epochs, each ending in an evaluation (default 3)"),
    ] = None,
    scale: ScaleOption = Scale.default,
    out: OutOption = None,
    seed: SeedOption = None,
    config: ConfigOption = None,
    data: DataOption = DEFAULT_DATA,
    cache: CacheOption = DEFAULT_CACHE,
) -> None:
    """Train the federation's network without federation: on the union of the synthetic sites (central) or on each
    site alone (local), with the same splits and run-directory records as `fedmer simulate`."""
    options = {"num-server-rounds": rounds, "seed": seed, "out": str(out) if out else None}
    try:
        with simulation_environment():  # Flower's quiet settings before flwr is first imported
            from server.server_app import resolve_settings

            resolved = simulation_config(scale=scale, data=data, cache=cache, config_file=config, options=options)
            resolve_settings(resolved)  # a bad site or number stops here, before any data
            check_out(Path(resolved["out"]))
            prepare_data(resolved, scale)
            run_baseline(resolved, mode, Console())
    except DataError as error:
        raise fail(error) from None


def register(app: typer.Typer) -> None:
    """Add ``train`` to the ``fedmer`` command."""
    app.command()(train)
