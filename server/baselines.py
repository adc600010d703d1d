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

- ``config.json``: the resolved run config with ``mode`` and ``protocol`` added and ``strategy`` set to the mode;
- ``metrics.jsonl``: per round, the train line(s) with the contract's ``TRAIN_METRIC_KEYS`` (central: one line
  for site ``central``, without ``site-index``; local: one per site; ``bytes-sent`` is 0, nothing leaves a
  site) and one evaluate line per site with ``EVALUATE_METRIC_KEYS`` (confusion matrix included);
- checkpoints: central ``checkpoints/round-NNNN.safetensors``, local ``checkpoints/<site>/round-NNNN.safetensors``
  (metadata ``round`` and ``site``; :func:`server.records.load_checkpoint` reads both);
- ``summary.json``, the table and ``rounds.png`` by :func:`server.server_app.write_results`: per site the last
  round's scores, pooled UF1 / UAR from the sum of the sites' confusion matrices.

The console gets one line per round (central, UF1 pooled over the sites) or per round and site (local): the
round's training loss, test UF1 and training seconds.

``--protocol loso`` replaces the subject-held-out split by leave-one-subject-out (datasets.md, "Protocols";
folds from :func:`partitions.splits.site_loso_folds`): central holds out each subject of every site in turn and
trains on every other subject of every site (MEGC2019's composite evaluation); local does the same within each
site (``test-fraction`` and ``val-fraction`` play no part). Every fold's network starts from the same initial
weights and trains the same rounds x ``local-epochs`` budget as a holdout run, with the same seeds.

No model selection on test subjects: the budget is fixed, nothing is scored before the last round, and the last
round's network predicts its held-out subject once (choosing the epoch on the test subject inflates UF1 by 6 to
14 points). UF1 / UAR are computed once on the predictions pooled over the folds, from the summed confusion
matrices (:func:`server.server_app.pooled_scores`): per site over its subjects' folds, pooled over every fold;
accuracy, EPE and NME are means over clips. Records: the same files, with a ``fold`` (``site/subject``) in every
train line (one per fold and round) and evaluate line (one per fold, at the last round), ``protocol`` and
``folds`` added to ``summary.json``, each fold's last network in
``checkpoints/<site>/<subject>/round-NNNN.safetensors``, and no ``rounds.png`` (its per-round curves describe
one network; LOSO trains one per fold). Federated LOSO is not offered: a federation per subject is too costly
on this CPU.
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
    from client.site import RunSettings, SiteData, SiteSpec
    from client.task import Evaluation, LocalTraining
    from models import F5CNet
    from partitions.dataset import ClipDataset
    from partitions.labels import LabelledSite
    from partitions.records import Sample
    from partitions.splits import SiteFold
    from server.records import RunDirectory
    from server.server_app import ServerSettings

console = Console(stderr=True)

CENTRAL_SITE = "central"
"""How central's train lines name their site (the union of all sites)."""

TRAIN, EVALUATE = "train", "evaluate"  # the phases of metrics.jsonl (server.strategies.TRAIN / EVALUATE)
FOLD = "fold"
"""The metrics.jsonl key of a LOSO line: the fold's held-out subject, ``site/subject``."""


class Mode(StrEnum):
    """Which baseline: one network on every site's training clips, or one network per site."""

    central = "central"
    local = "local"


class Protocol(StrEnum):
    """Which clips are scored: each site's held-out subjects (as the federation), or every subject in turn."""

    holdout = "holdout"
    loso = "loso"


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

    @property
    def targets(self) -> list[int]:
        """Every clip's class: central training balances its loss over the union, as each site does over its own."""
        return [target for part in self.parts for target in part.targets]


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


def round_training(run: RunSettings, site_index: int, server_round: int, device: str) -> LocalTraining:
    """One round's training, as a site's federated round: seeded by the run's seed + site index + round, the AU
    prior's weight decaying over the run's rounds as the server sends it."""
    from server.strategies import decay_prior_weight

    return run.local_training(
        server_round,
        seed=run.round_seed(site_index, server_round),
        device=device,
        prior_weight=decay_prior_weight(server_round, run.rounds),
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
        outcome = train_local(model, union, settings.classes, round_training(settings.run, 0, server_round, device))
        metrics = train_metrics(None, outcome, bytes_sent=0)
        run.append_metrics(server_round, TRAIN, CENTRAL_SITE, metrics)
        confusions = []
        for index, data in enumerate(sites):
            seed = run_settings.round_seed(index, server_round)
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
            options = round_training(settings.run, index, server_round, device)
            outcome = train_local(model, data.train, settings.classes, options)
            metrics = train_metrics(index, outcome, bytes_sent=0)
            run.append_metrics(server_round, TRAIN, site, metrics)
            ledger.add(server_round, TRAIN, index, metrics)
            seed = run_settings.round_seed(index, server_round)
            result = evaluate_local(model, data.test, settings.classes, run_settings.batch_size, device, seed=seed)
            evaluation = evaluate_metrics(index, result)
            run.append_metrics(server_round, EVALUATE, site, evaluation)
            ledger.add(server_round, EVALUATE, index, evaluation)
            save_site_checkpoint(run, site, server_round, model)
            _progress(console_out, server_round, settings.rounds, site, metrics["loss"], result.uf1, outcome.seconds)


# ----------------------------------------------------------------------------------------------- LOSO


@dataclass(frozen=True)
class LosoFold:
    """One leave-one-subject-out fold: the clips its network trains on and its held-out subject's clips."""

    name: str  # the held-out subject, "site/subject"
    site_index: int  # the held-out subject's site
    trainer: int | None  # the site whose network trains (local), None for central (the union of the sites)
    train: SiteUnion
    test: ClipDataset
    device: str


@dataclass(frozen=True)
class WholeSite:
    """A site and all its labelled samples: LOSO splits them itself, without the holdout split (a site of one
    subject, which no holdout can split, still serves central LOSO)."""

    spec: SiteSpec
    site: LabelledSite


def load_whole_sites(settings: ServerSettings) -> list[WholeSite]:
    """Every site of the run, read as the federation's node for partition ``i`` reads it (before splitting)."""
    from client.site import SiteSpec, read_site

    sites = []
    for index in range(len(settings.sites)):
        spec = SiteSpec.from_config({"partition-id": index}, settings.config)
        try:
            sites.append(WholeSite(spec, read_site(spec)))
        except DataError as error:
            raise DataError(f"{spec.label}: {error}") from None
    return sites


def _clips(data: WholeSite, indices: Sequence[int], train: bool, seed: int) -> ClipDataset:
    """Prepared clips of ``data``'s samples at ``indices``, as :func:`client.site.load_data` opens a split."""
    from client.site import open_clips

    try:
        return open_clips(data.spec, data.site, indices, train=train, seed=seed)
    except DataError as error:
        raise DataError(f"{data.spec.label}: {error}") from None


def fold_data(settings: ServerSettings, members: Sequence[WholeSite], fold: SiteFold, trainer: int | None) -> LosoFold:
    """A fold of :func:`partitions.splits.site_loso_folds` over ``members`` as datasets."""
    seed = settings.run.seed
    held = members[fold.site]
    parts = [
        _clips(data, indices, True, seed) for data, indices in zip(members, fold.train, strict=True) if len(indices)
    ]
    return LosoFold(
        name=f"{settings.site_name(held.spec.index)}/{fold.subject}",
        site_index=held.spec.index,
        trainer=trainer,
        train=SiteUnion(parts),
        test=_clips(held, fold.test, False, seed),
        device=held.spec.device,
    )


def build_loso_folds(settings: ServerSettings, sites: Sequence[WholeSite], mode: Mode) -> list[LosoFold]:
    """Central: one fold per subject of every site over the union of the sites; local: the folds of each site
    alone, site by site. DataError naming the site when a local site holds fewer than 2 subjects."""
    from partitions.splits import site_loso_folds

    groups = [(list(sites), None)] if mode is Mode.central else [([data], data.spec.index) for data in sites]
    folds = []
    for members, trainer in groups:
        try:
            splits = site_loso_folds([data.site.samples for data in members])
        except DataError as error:
            where = "the sites together" if trainer is None else members[0].spec.label
            raise DataError(f"--protocol loso, {where}: {error}") from None
        folds += [fold_data(settings, members, fold, trainer) for fold in splits]
    return folds


def train_fold(
    settings: ServerSettings, fold: LosoFold, start: F5CNet, run: RunDirectory, console_out: Console, number: str
) -> Evaluation:
    """One fold: a copy of the initial network trained for the whole budget on the fold's training clips, then
    its held-out subject predicted once (no score before the last round, nothing selected on it)."""
    from client.task import evaluate_local, evaluate_metrics, set_au_prior, train_local, train_metrics

    model = copy.deepcopy(start)
    set_au_prior(model, au_prior([part.samples for part in fold.train.parts]))
    trainer = CENTRAL_SITE if fold.trainer is None else settings.site_name(fold.trainer)
    for server_round in range(1, settings.rounds + 1):
        options = round_training(settings.run, fold.trainer or 0, server_round, fold.device)  # central seeds as site 0
        outcome = train_local(model, fold.train, settings.classes, options)
        metrics = {**train_metrics(fold.trainer, outcome, bytes_sent=0), FOLD: fold.name}
        run.append_metrics(server_round, TRAIN, trainer, metrics)
        console_out.print(
            f"fold {number}  {fold.name:<14} round {server_round}/{settings.rounds}  {trainer:<10} "
            f"loss {metrics['loss']:.4f}  {outcome.seconds:.1f}s",
            highlight=False,
        )
    seed = settings.run.round_seed(fold.site_index, settings.rounds)
    result = evaluate_local(model, fold.test, settings.classes, settings.run.batch_size, fold.device, seed=seed)
    evaluation = {**evaluate_metrics(fold.site_index, result), FOLD: fold.name}
    run.append_metrics(settings.rounds, EVALUATE, settings.site_name(fold.site_index), evaluation)
    save_site_checkpoint(run, fold.name, settings.rounds, model)
    return result


def _clip_mean(results: Sequence[Evaluation], key: str) -> float | None:
    """Mean over every clip of the folds of a per-fold mean (accuracy, EPE, NME); None without clips."""
    clips = sum(result.examples for result in results)
    return sum(getattr(result, key) * result.examples for result in results) / clips if clips else None


def pooled_site_scores(results: Sequence[Evaluation]) -> dict[str, float | None]:
    """A summary row from several folds' predictions: UF1 / UAR once on all their clips, the rest per clip."""
    from server.server_app import pooled_scores

    return {
        **pooled_scores([result.confusion for result in results]),
        **{key: _clip_mean(results, key) for key in ("accuracy", "epe", "nme")},
    }


def write_loso_results(
    run: RunDirectory, settings: ServerSettings, results: Sequence[tuple[int, Evaluation]], console_out: Console
) -> None:
    """``summary.json`` over the pooled predictions of all folds (per site: its subjects' folds), the table."""
    from server.records import COLLAPSED, collapsed, site_table, summary_document
    from server.server_app import pooled_scores, print_collapse_warnings

    confusions = {
        index: [result.confusion for site, result in results if site == index] for index in range(len(settings.sites))
    }
    sites = {
        settings.site_name(index): {
            **pooled_site_scores([result for site, result in results if site == index]),
            COLLAPSED: collapsed(confusions[index]),
        }
        for index in range(len(settings.sites))
    }
    everything = [result.confusion for _, result in results]
    pooled = {**pooled_scores(everything), COLLAPSED: collapsed(everything)}
    run.write_summary(settings.rounds, sites, pooled, extra={"protocol": Protocol.loso.value, "folds": len(results)})
    console_out.print(site_table(summary_document(settings.rounds, sites, pooled)))
    print_collapse_warnings(settings, confusions, console_out)
    console_out.print(f"scores pooled over the predictions of {len(results)} LOSO folds", highlight=False)
    console_out.print(f"run directory: {run.path}", highlight=False)


def train_loso(
    settings: ServerSettings, folds: Sequence[LosoFold], run: RunDirectory, console_out: Console
) -> list[tuple[int, Evaluation]]:
    """Every fold in turn from the same initial network; each fold's held-out site and predictions."""
    start = initial_model(settings)
    results = []
    for number, fold in enumerate(folds, start=1):
        result = train_fold(settings, fold, start, run, console_out, f"{number}/{len(folds)}")
        results.append((fold.site_index, result))
        running = pooled_site_scores([evaluation for _, evaluation in results])
        console_out.print(
            f"fold {number}/{len(folds)}  {fold.name:<14} {result.examples} clip(s), accuracy {result.accuracy:.4f}, "
            f"pooled UF1 so far {_uf1(running['uf1']):.4f}",
            highlight=False,
        )
    return results


# ----------------------------------------------------------------------------------------------- a run


def refuse_privacy(config: Mapping[str, Any]) -> None:
    """DataError for DP settings: the baselines train without any privacy mechanism, and silently ignoring a
    config's ``dp`` or ``central-dp`` would report non-private scores as private ones."""
    from client.site import privacy_settings
    from server.central_dp import OFF, central_dp_mode

    if privacy_settings({}, config).enabled or central_dp_mode(config) != OFF:
        raise DataError(
            "fedmer train has no differential privacy: dp and central-dp apply to a federation's sites and server; "
            "remove them from --config, or run fedmer simulate --dp"
        )


def run_baseline(
    config: Mapping[str, Any],
    mode: Mode | str,
    console_out: Console | None = None,
    protocol: Protocol | str = Protocol.holdout,
) -> Path:
    """One whole baseline run on a resolved config whose sites are prepared; returns the run directory.

    DataError (before anything is written) for a bad setting, a site that is not prepared, or (LOSO) too few
    subjects.
    """
    from server.records import RunDirectory
    from server.server_app import resolve_settings, write_results

    mode, protocol = Mode(mode), Protocol(protocol)
    console_out = console_out or Console()
    settings = resolve_settings(config)
    refuse_privacy(settings.config)
    loso = protocol is Protocol.loso
    folds = build_loso_folds(settings, load_whole_sites(settings), mode) if loso else []
    sites = [] if loso else load_sites(settings)
    run = RunDirectory(settings.out)
    run.write_config({**settings.config, "strategy": mode.value, "mode": mode.value, "protocol": protocol.value})
    split = f"loso ({len(folds)} folds)" if loso else protocol.value
    console_out.print(
        f"fedmer train: {mode.value}, {split}, {settings.rounds} rounds of {settings.run.local_epochs} epoch(s), "
        f"sites {', '.join(settings.site_names)}; records in {run.path}",
        highlight=False,
    )
    if loso:
        write_loso_results(run, settings, train_loso(settings, folds, run, console_out), console_out)
        return run.path
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
        typer.Option(
            "--rounds",
            min=1,
            help="Rounds of local-epochs epochs (default 3); holdout evaluates after each, loso after the last",
        ),
    ] = None,
    protocol: Annotated[
        Protocol,
        typer.Option(
            "--protocol",
            help="holdout: the federation's held-out test subjects per site; loso: leave-one-subject-out over every "
            "subject (central: of all sites, MEGC2019 composite; local: within each site), scores pooled over folds",
        ),
    ] = Protocol.holdout,
    scale: ScaleOption = Scale.default,
    out: OutOption = None,
    seed: SeedOption = None,
    config: ConfigOption = None,
    data: DataOption = DEFAULT_DATA,
    cache: CacheOption = DEFAULT_CACHE,
) -> None:
    """Train the federation's network without federation: on the union of the synthetic sites (central) or on each
    site alone (local), with the same splits and run-directory records as `fedmer simulate`, or leave-one-subject-out
    (--protocol loso)."""
    options = {"num-server-rounds": rounds, "seed": seed, "out": str(out) if out else None}
    try:
        with simulation_environment():  # Flower's quiet settings before flwr is first imported
            from server.server_app import resolve_settings

            resolved = simulation_config(scale=scale, data=data, cache=cache, config_file=config, options=options)
            resolve_settings(resolved)  # a bad site or number stops here, before any data
            refuse_privacy(resolved)
            check_out(Path(resolved["out"]))
            prepare_data(resolved, scale)
            run_baseline(resolved, mode, Console(), protocol)
    except DataError as error:
        raise fail(error) from None


def register(app: typer.Typer) -> None:
    """Add ``train`` to the ``fedmer`` command."""
    app.command()(train)
