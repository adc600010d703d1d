"""Which site a node is, the run's training settings, and the site's data split.

A deployed node names its site in ``node_config`` (``dataset``, ``data-path``, optional ``cache-path``,
``subset``, ``labels``, ``device``, ``site-index``). A simulated node only gets ``partition-id``: the run
config's ``sites`` (comma-separated database names), ``data-root`` and ``cache-root`` map it to
``<data-root>/<sites[partition-id]>``, so one ``flwr run`` reproduces a deployment. Every bad setting stops
here with one :class:`DataError` that names the site and the fix, before any training starts.

The server imports :class:`RunSettings` to build the very model the sites train (same preset, classes and
clip shape) and :func:`num_classes` to size it without reading any site.
"""

from __future__ import annotations

import functools
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch

from client.precision import PRECISIONS
from client.privacy import MODES, PrivacySettings
from client.schedule import SCHEDULES
from client.task import LocalTraining
from models import LossWeights, ModelConfig, preset
from partitions.adapters import ADAPTERS, canonical_database
from partitions.cache import PrepareConfig
from partitions.dataset import ClipDataset
from partitions.errors import DataError
from partitions.labels import LabelledSite, label_space, load_site
from partitions.splits import subject_holdout

Config = Mapping[str, Any]
"""A Flower ``UserConfig`` (node or run config): str keys, bool/int/float/str values."""

DEFAULT_LABELS = "composite3"
DEFAULT_CACHE = "cache"  # beside the data root: <data-root>/../cache, as the README's data/synthetic + data/cache


# ----------------------------------------------------------------------------------------------- settings


def _setting(config: Config, key: str, default: Any, kind: type) -> Any:
    """``config[key]`` as ``kind`` (default when absent); DataError naming the key when it does not convert."""
    value = config.get(key, default)
    try:
        return kind(value)
    except (TypeError, ValueError):
        raise DataError(
            f"run config {key}={value!r} is not a valid {kind.__name__}; give e.g. {key}={default}"
        ) from None


def _text(config: Config, key: str) -> str:
    """A string setting, stripped; '' when absent."""
    return str(config.get(key, "")).strip()


def _flag(config: Config, key: str, default: bool) -> bool:
    """A yes/no setting: a bool, 0/1, or true/false/yes/no/on/off; DataError naming the key otherwise."""
    value = config.get(key, default)
    if isinstance(value, bool):
        return value
    text = str(value).strip().lower()
    if text in {"1", "true", "yes", "on"}:
        return True
    if text in {"0", "false", "no", "off", ""}:
        return False
    raise DataError(f"run config {key}={value!r} is not a yes/no value; give {key}=true or {key}=false")


def _optional_number(config: Config, key: str) -> float | None:
    """A number that may be left out (absent or '' -> None)."""
    if _text(config, key) == "":
        return None
    return _setting(config, key, 0.0, float)


def _names(value: str) -> tuple[str, ...]:
    """Comma-separated list -> stripped non-empty names."""
    return tuple(name.strip() for name in value.split(",") if name.strip())


@dataclass(frozen=True)
class RunSettings:
    """Run-config settings every site shares; every key has a default, since ``run_simulation`` may pass none."""

    preset: str = "lite"
    ccc_graph: str = "positions"
    batch_size: int = 4  # twice the steps of 8 in the main job's few epochs (README "The main job's budget")
    local_epochs: int = 2
    # The training recipe (README "A recipe that learns"; benchmarks/recipe.py measured each part)
    lr: float = 1e-3  # the schedule's peak
    lr_schedule: str = "cosine"  # or "constant"; over the whole run (client.schedule)
    warmup_epochs: float = 1.0
    weight_decay: float = 1e-4
    class_balance: bool = True  # CE weighted by each site's inverse class frequency (not under DP)
    label_smoothing: float = 0.1
    seed: int = 0
    test_fraction: float = 0.25
    val_fraction: float = 0.0
    local_params: tuple[str, ...] = ()
    weights: LossWeights = field(default_factory=LossWeights)
    rounds: int = 3  # num-server-rounds: a DP site plans its noise over the whole run
    precision: str = "fp32"  # or "bf16": autocast where the site's device computes bf16 natively

    @classmethod
    def from_config(cls, run_config: Config) -> RunSettings:
        """Read and check ``preset``, ``ccc-graph``, ``batch-size``, ``local-epochs``, ``lr``, ``lr-schedule``,
        ``warmup-epochs``, ``weight-decay``, ``class-balance``, ``label-smoothing``, ``seed``, ``test-fraction``,
        ``val-fraction``, ``local-params``, ``precision`` and ``weight-{mer,flow,landmarks,au}``."""
        defaults = cls()
        base = LossWeights()
        settings = cls(
            preset=_setting(run_config, "preset", defaults.preset, str),
            ccc_graph=_setting(run_config, "ccc-graph", defaults.ccc_graph, str),
            batch_size=_setting(run_config, "batch-size", defaults.batch_size, int),
            local_epochs=_setting(run_config, "local-epochs", defaults.local_epochs, int),
            lr=_setting(run_config, "lr", defaults.lr, float),
            lr_schedule=_setting(run_config, "lr-schedule", defaults.lr_schedule, str),
            warmup_epochs=_setting(run_config, "warmup-epochs", defaults.warmup_epochs, float),
            weight_decay=_setting(run_config, "weight-decay", defaults.weight_decay, float),
            class_balance=_flag(run_config, "class-balance", defaults.class_balance),
            label_smoothing=_setting(run_config, "label-smoothing", defaults.label_smoothing, float),
            seed=_setting(run_config, "seed", defaults.seed, int),
            test_fraction=_setting(run_config, "test-fraction", defaults.test_fraction, float),
            val_fraction=_setting(run_config, "val-fraction", defaults.val_fraction, float),
            local_params=_names(_text(run_config, "local-params")),
            rounds=_setting(run_config, "num-server-rounds", defaults.rounds, int),
            precision=_setting(run_config, "precision", defaults.precision, str),
            weights=LossWeights(
                mer=_setting(run_config, "weight-mer", base.mer, float),
                flow=_setting(run_config, "weight-flow", base.flow, float),
                landmarks=_setting(run_config, "weight-landmarks", base.landmarks, float),
                au=_setting(run_config, "weight-au", base.au, float),
            ),
        )
        settings.check()
        return settings

    def check(self) -> None:
        """DataError naming the run-config key for values no site could train with."""
        if self.batch_size < 1 or self.local_epochs < 1:
            raise DataError(
                f"run config batch-size={self.batch_size} and local-epochs={self.local_epochs} must both "
                "be at least 1; fix them in the run config"
            )
        if self.precision not in PRECISIONS:
            raise DataError(
                f"run config precision={self.precision!r}: choose one of {', '.join(PRECISIONS)}; fix it in the "
                "run config"
            )
        if self.lr_schedule not in SCHEDULES or self.lr <= 0 or self.warmup_epochs < 0 or self.weight_decay < 0:
            raise DataError(
                f"run config lr={self.lr}, lr-schedule={self.lr_schedule!r}, warmup-epochs={self.warmup_epochs}, "
                f"weight-decay={self.weight_decay}: the rate must be positive, the schedule one of "
                f"{', '.join(SCHEDULES)}, warm-up and decay not negative; fix them in the run config"
            )
        if not 0 <= self.label_smoothing < 1:
            raise DataError(
                f"run config label-smoothing={self.label_smoothing} must lie in [0, 1); fix it in the run config"
            )
        if not 0 < self.test_fraction < 1 or not 0 <= self.val_fraction < 1:
            raise DataError(
                f"run config test-fraction={self.test_fraction} must lie in (0, 1) and val-fraction="
                f"{self.val_fraction} in [0, 1); fix them in the run config"
            )
        try:
            self.model_config(1)
        except ValueError as error:
            raise DataError(f"run config preset/ccc-graph: {error}") from None

    def round_seed(self, site_index: int, server_round: int) -> int:
        """Seed of one site's round (training and evaluation): seed + site index + server round, so sites and
        rounds draw apart and a baseline replays a federated site's draws."""
        return self.seed + site_index + server_round

    def local_training(
        self,
        server_round: int,
        seed: int,
        device: str,
        epochs: int | None = None,
        lr: float | None = None,
        mu: float = 0.0,
        prior_weight: float = 0.0,
    ) -> LocalTraining:
        """Round ``server_round``'s local training: epochs ``(r - 1) E`` to ``r E`` of the run's schedule, which
        spans ``num-server-rounds x E`` epochs. ``epochs`` and ``lr`` are the server's, where it sends them."""
        epochs = self.local_epochs if epochs is None else epochs
        return LocalTraining(
            epochs=epochs,
            lr=self.lr if lr is None else lr,
            lr_schedule=self.lr_schedule,
            warmup_epochs=self.warmup_epochs,
            total_epochs=max(self.rounds, server_round) * epochs,
            weight_decay=self.weight_decay,
            balance_classes=self.class_balance,
            label_smoothing=self.label_smoothing,
            mu=mu,
            prior_weight=prior_weight,
            batch_size=self.batch_size,
            seed=seed,
            first_epoch=max(server_round - 1, 0) * epochs,
            local_params=self.local_params,
            weights=self.weights,
            device=device,
            precision=self.precision,
            server_round=server_round,
        )

    def model_config(self, classes: int, prepare: PrepareConfig | None = None) -> ModelConfig:
        """The network every site trains: the preset, sized for the clips ``fedmer prepare`` writes."""
        prepare = prepare or PrepareConfig()
        return preset(
            self.preset, num_classes=classes, ccc_graph=self.ccc_graph, frames=prepare.t, image_size=prepare.size
        )


PRIVACY_KEYS = (
    "dp",
    "dp-target-epsilon",
    "dp-noise-multiplier",
    "dp-max-grad-norm",
    "dp-delta",
    "dp-poisson",
    "dp-mode",
    "dp-query-noise",
    "dp-seeded-noise",
)
"""Sample-level DP settings: run config keys, each overridable per site in its node config."""


def privacy_settings(node_config: Config, run_config: Config) -> PrivacySettings:
    """The site's DP settings: the run config's ``dp-*`` keys, with the node config's own ``dp-*`` keys winning
    (a site may demand a smaller budget than the federation's). DataError naming the key for a bad value."""
    config = {**run_config, **{key: value for key, value in node_config.items() if key in PRIVACY_KEYS}}
    defaults = PrivacySettings()
    mode = _text(config, "dp-mode") or defaults.mode
    if mode not in MODES:
        raise DataError(f"dp-mode={mode!r} is not a per-sample gradient mode; use one of {', '.join(MODES)}")
    try:
        return PrivacySettings(
            enabled=_flag(config, "dp", False),
            noise_multiplier=_optional_number(config, "dp-noise-multiplier"),
            target_epsilon=_optional_number(config, "dp-target-epsilon"),
            max_grad_norm=_setting(config, "dp-max-grad-norm", defaults.max_grad_norm, float),
            delta=_optional_number(config, "dp-delta"),
            poisson_sampling=_flag(config, "dp-poisson", defaults.poisson_sampling),
            mode=mode,  # type: ignore[arg-type]
            query_noise=_setting(config, "dp-query-noise", defaults.query_noise, float),
            seeded_noise=_flag(config, "dp-seeded-noise", defaults.seeded_noise),
        )
    except ValueError as error:  # PrivacySettings names the field; say which keys set it
        raise DataError(
            f"dp settings: {error}; set dp-target-epsilon and/or dp-noise-multiplier, dp-max-grad-norm, dp-delta, "
            "dp-query-noise in the run config (or a site's node config)"
        ) from None


def resolve_device(name: str) -> str:
    """``auto`` -> CUDA when present, else CPU; anything else as given (``cpu``, ``cuda:1``)."""
    name = name.strip() or "auto"
    if name == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    return name


# ----------------------------------------------------------------------------------------------- the site


@dataclass(frozen=True)
class SiteSpec:
    """Where one site's data lies and how it is labelled; hashable, so loaded data can be cached by it."""

    index: int
    dataset: str  # canonical database name
    root: Path
    cache: Path
    labels: str = DEFAULT_LABELS
    subset: Path | None = None
    device: str = "cpu"
    state: Path | None = None  # node config state-path; None: the default under the cache (client.state)

    @property
    def state_folder(self) -> Path:
        """Where the site's privacy ledger and local parameters live between messages and restarts."""
        return self.state or self.cache / "site-state" / f"site-{self.index}-{self.dataset}"

    @property
    def label(self) -> str:
        """How errors and logs name the site."""
        return f"site {self.index} ({self.dataset} at {self.root})"

    @classmethod
    def from_config(cls, node_config: Config, run_config: Config) -> SiteSpec:
        """The node's site: from its own node config when it names a dataset, else from its partition id."""
        if "dataset" in node_config:
            spec = cls._deployed(node_config, run_config)
        elif "partition-id" in node_config:
            spec = cls._simulated(node_config, run_config)
        else:
            raise DataError(
                f"node config {dict(node_config)} names no site: start the SuperNode with --node-config "
                "\"dataset='casme2' data-path='/data/casme2'\" (or run a simulation, whose nodes get a partition-id)"
            )
        spec.check()
        return replace(spec, dataset=canonical_database(spec.dataset) or spec.dataset)

    @classmethod
    def _deployed(cls, node_config: Config, run_config: Config) -> SiteSpec:
        """A SuperNode's ``--node-config``: dataset, data-path and the optional rest."""
        index = _setting(node_config, "site-index", 0, int)
        dataset = _text(node_config, "dataset")
        if not _text(node_config, "data-path"):
            raise DataError(f"site {index} ({dataset}): node config has no data-path; add data-path='/path/to/site'")
        root = Path(_text(node_config, "data-path")).expanduser()
        cache = _text(node_config, "cache-path")
        return cls(
            index=index,
            dataset=dataset,
            root=root,
            cache=Path(cache).expanduser() if cache else root.parent.parent / DEFAULT_CACHE,
            labels=_text(node_config, "labels") or _text(run_config, "labels") or DEFAULT_LABELS,
            subset=_optional_path(_text(node_config, "subset") or _text(run_config, "subset")),
            device=resolve_device(_text(node_config, "device") or _text(run_config, "device")),
            state=_optional_path(_text(node_config, "state-path")),
        )

    @classmethod
    def _simulated(cls, node_config: Config, run_config: Config) -> SiteSpec:
        """A simulated node: partition id -> the run config's ``sites`` list under ``data-root``."""
        index = _setting(node_config, "partition-id", 0, int)
        sites = _names(_text(run_config, "sites"))
        if not 0 <= index < len(sites):
            listed = ",".join(sites) or "nothing"
            raise DataError(
                f"site {index} (partition-id {index}): run config sites lists {len(sites)} site(s) ({listed}); "
                f"give one database per simulated node, e.g. --run-config \"sites='casme2,samm,smic'\", or run "
                f"with num-supernodes={len(sites)}"
            )
        data_root = Path(_text(run_config, "data-root") or "data").expanduser()
        cache = _text(run_config, "cache-root")
        return cls(
            index=index,
            dataset=sites[index],
            root=data_root / sites[index],
            cache=Path(cache).expanduser() if cache else data_root.parent / DEFAULT_CACHE,
            labels=_text(run_config, "labels") or DEFAULT_LABELS,
            subset=_optional_path(_text(run_config, "subset")),
            device=resolve_device(_text(node_config, "device") or _text(run_config, "device")),
        )

    def check(self) -> None:
        """Unknown database or missing folder: stop before anything loads."""
        if canonical_database(self.dataset) is None:
            raise DataError(
                f"{self.label}: unknown dataset {self.dataset!r}; use one of {', '.join(ADAPTERS)} "
                "(node config dataset=..., or the run config's sites list in simulation)"
            )
        if not self.root.is_dir():
            raise DataError(
                f"{self.label}: data path {self.root} does not exist; point data-path (or the run config's "
                "data-root) at the folder that holds the database"
            )


def _optional_path(text: str) -> Path | None:
    return Path(text).expanduser() if text else None


def num_classes(dataset: str, labels: str = DEFAULT_LABELS) -> int:
    """Classes of a label space for a database, without reading the site (the server sizes the model so)."""
    return len(label_space(labels, dataset).classes)


# ----------------------------------------------------------------------------------------------- loading


@dataclass(frozen=True)
class SiteData:
    """One site's labelled samples split by subject into train / (validation) / test clip datasets."""

    spec: SiteSpec
    site: LabelledSite
    train: ClipDataset
    test: ClipDataset
    val: ClipDataset | None
    test_subjects: tuple[str, ...]
    val_subjects: tuple[str, ...]

    @property
    def num_classes(self) -> int:
        return len(self.site.space.classes)


@dataclass(frozen=True)
class SplitSettings:
    """What a site's split depends on (a cache key next to the SiteSpec)."""

    seed: int = 0
    test_fraction: float = 0.25
    val_fraction: float = 0.0

    @classmethod
    def of(cls, settings: RunSettings) -> SplitSettings:
        return cls(settings.seed, settings.test_fraction, settings.val_fraction)


def split_indices(site: LabelledSite, split: SplitSettings, index: int) -> tuple[np.ndarray, ...]:
    """Subject-held-out (train, val, test) indices into ``site.samples``; seeded by seed + site index."""
    holdout = subject_holdout(site.samples, fraction=split.test_fraction, seed=split.seed + index)
    train, test, val = holdout.train, holdout.val, np.zeros(0, dtype=np.int64)
    if split.val_fraction > 0:
        inner = subject_holdout([site.samples[i] for i in train], fraction=split.val_fraction, seed=split.seed + index)
        train, val = train[inner.train], train[inner.val]
    return train, val, test


def _subjects(site: LabelledSite, indices: np.ndarray) -> tuple[str, ...]:
    return tuple(sorted({site.samples[i].subject for i in indices}))


def read_site(spec: SiteSpec) -> LabelledSite:
    """The site's labelled samples, as every reader of a site (split or LOSO) reads them."""
    return load_site(spec.dataset, spec.root, labels=spec.labels, subset=spec.subset)


def open_clips(spec: SiteSpec, site: LabelledSite, indices: Sequence[int], *, train: bool, seed: int) -> ClipDataset:
    """Prepared clips of ``site``'s samples at ``indices``; training clips augment from seed + site index, so a
    site's augmentations are the same whichever split or fold the clips serve."""
    options = {"train": True, "seed": seed + spec.index} if train else {"train": False}
    return ClipDataset.from_site(site, list(indices), spec.cache, **options)


@functools.lru_cache(maxsize=8)
def load_data(spec: SiteSpec, split: SplitSettings) -> SiteData:
    """Read the site, split it and open its prepared clips; every DataError names the site.

    Cached per (site, split) in-process: a simulation worker serves several partitions in turn.
    """
    try:
        site = read_site(spec)
        train, val, test = split_indices(site, split, spec.index)
        train_set = open_clips(spec, site, train.tolist(), train=True, seed=split.seed)
        test_set = open_clips(spec, site, test.tolist(), train=False, seed=split.seed)
        val_set = open_clips(spec, site, val.tolist(), train=False, seed=split.seed) if len(val) else None
    except DataError as error:
        raise DataError(f"{spec.label}: {error}") from None
    return SiteData(spec, site, train_set, test_set, val_set, _subjects(site, test), _subjects(site, val))
