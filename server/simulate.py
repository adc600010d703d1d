"""``fedmer simulate``: a whole federation on one machine, on synthetic sites, through Flower's simulation engine.

It synthesises the sites (once: :func:`partitions.synth.writer.synthesise` reuses what it wrote), prepares them
into the cache (resumable), resolves the run config (:data:`server.server_app.DEFAULTS` <- ``--config`` TOML
<- the options given on the command line) and runs ``flwr.simulation.run_simulation`` with the real ServerApp
and ClientApp, one simulated node per site. ``run_simulation`` passes the apps an empty run config, so both get
the resolved config as overrides.

Data: scale ``default`` (8 subjects x 6 clips per site, what ``fedmer synth`` writes by default) lives in
``--data`` itself; ``small`` (4 x 4) and ``tiny`` (3 x 2) in ``<data>-small`` / ``<data>-tiny`` beside it, since
one folder holds one size. The prepared clips of every size share ``--cache`` (entries are keyed by content).

Ray runs with one worker of 2 CPUs (fastest on 2 cores; with CUDA each site's task also gets a share of the
GPU), its session files in a private short-lived temp folder (``RAY_TMPDIR``, removed afterwards), without
telemetry, update checks or runtime dependency installation.

The console gets fedmer's own lines only; Flower's and Ray's output goes to ``<out>/logs/``
(:mod:`server.run_logs`), and with ``--verbose`` to the console as well.

Flower 1.41 deprecates ``run_simulation`` in favour of ``flwr run . local`` (a background SuperLink, its
SuperExec and a ``flwr-simulation`` process). fedmer stays on ``run_simulation``: on the tiny job the move cost
37 s more per run (median 111 s against 74 s, ``benchmarks/simulation_entry.py``), and ``flwr run
--run-config`` refuses the keys ``[tool.flwr.app.config]`` does not declare. Its deprecation warning goes to
``logs/flower.log``.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
import tomllib
from collections.abc import Iterator, Mapping
from enum import StrEnum
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console

from partitions.cli import fail
from partitions.errors import DataError

console = Console(stderr=True)


class Scale(StrEnum):
    """Synthetic data size: subjects x clips per subject, per site."""

    tiny = "tiny"
    small = "small"
    default = "default"


SCALES: dict[Scale, tuple[int, int]] = {Scale.tiny: (3, 2), Scale.small: (4, 4), Scale.default: (8, 6)}
SYNTH_SEED = 0  # the data stay the same whatever the run's --seed
SYNTH_SITES = ("casme2", "samm", "smic", "casme3")
WORKERS = 2
OWN_KEYS = ("data-root", "cache-root")  # set by --data / --cache, not by the config file
RUN_ENV = {  # set before flwr is first imported: its telemetry reads the variable at import time
    "FLWR_TELEMETRY_ENABLED": "0",
    "FLWR_DISABLE_UPDATE_CHECK": "1",
    "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1",
    "RAY_ACCEL_ENV_VAR_OVERRIDE_ON_ZERO": "0",  # Ray's future default; silences its FutureWarning
    "RAY_worker_niceness": "0",  # Ray starts workers at nice 15: any other job on the machine starved the sites
}


# ----------------------------------------------------------------------------------------------- config


# Options shared by `fedmer simulate` and `fedmer train`: one declaration each.
ScaleOption = Annotated[
    Scale, typer.Option("--scale", help="Synthetic subjects x clips per site: tiny 3x2, small 4x4, default 8x6")
]
OutOption = Annotated[Path | None, typer.Option("--out", help="Run directory (default runs/<UTC timestamp>)")]
SeedOption = Annotated[int | None, typer.Option("--seed", help="Run seed: model init, splits, shuffling (default 0)")]
ConfigOption = Annotated[
    Path | None, typer.Option("--config", help="TOML file of run-config overrides (flat keys, e.g. lr = 0.0005)")
]
DataOption = Annotated[Path, typer.Option("--data", help="Synthetic databases (scale tiny/small: <data>-<scale>)")]
CacheOption = Annotated[Path, typer.Option("--cache", help="Preprocessing cache")]
DEFAULT_DATA, DEFAULT_CACHE = Path("data/synthetic"), Path("data/cache")


def load_overrides(path: Path) -> dict[str, Any]:
    """A TOML file of flat run-config keys (``num-server-rounds = 5``); DataError for anything else."""
    if not path.is_file():
        raise DataError(f"--config {path} does not exist; give a TOML file of run-config keys, e.g. lr = 0.0005")
    try:
        document = tomllib.loads(path.read_text(encoding="utf-8"))
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as error:
        raise DataError(f"--config {path} is not valid TOML: {error}") from None
    nested = [key for key, value in document.items() if not isinstance(value, bool | int | float | str)]
    if nested:
        raise DataError(
            f"--config {path}: {', '.join(nested)}: only plain values (str, int, float, bool) are allowed; the "
            "file holds flat run-config keys such as local-epochs = 2, no tables or lists"
        )
    from server.server_app import KNOWN_KEYS

    unknown = sorted(set(document) - set(KNOWN_KEYS))
    if unknown:
        raise DataError(f"--config {path}: unknown key(s) {', '.join(unknown)}; known: {', '.join(KNOWN_KEYS)}")
    owned = [key for key in OWN_KEYS if key in document]
    if owned:
        raise DataError(f"--config {path}: {', '.join(owned)} are set by --data and --cache here; remove them")
    return document


def data_root(data: Path, scale: Scale) -> Path:
    """Where the sites of one scale live: ``data`` for the default size, ``<data>-<scale>`` otherwise."""
    return data if scale is Scale.default else data.with_name(f"{data.name}-{scale.value}")


def simulation_config(
    *,
    scale: Scale,
    data: Path,
    cache: Path,
    config_file: Path | None = None,
    options: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """``DEFAULTS`` <- the config file <- the command-line ``options`` (None values: not given), with absolute
    ``data-root``, ``cache-root`` and ``out`` (Ray workers need not share the caller's working directory), and
    the run's ``run-key`` fixed here, so the ServerApp and ``config.json`` hold the one the sites are sent."""
    from server.server_app import DEFAULTS, default_out, run_key

    config: dict[str, Any] = dict(DEFAULTS)
    if config_file is not None:
        config.update(load_overrides(config_file))
    config.update({key: value for key, value in (options or {}).items() if value is not None})
    config["data-root"] = str(data_root(data, scale).resolve())
    config["cache-root"] = str(cache.resolve())
    config["out"] = str(Path(str(config["out"]).strip() or default_out()).resolve())
    config["run-key"] = run_key(config)
    return config


def check_out(out: Path) -> None:
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise DataError(f"--out {out} already holds files; choose a new run directory")


# ----------------------------------------------------------------------------------------------- data


def prepare_data(config: Mapping[str, Any], scale: Scale) -> None:
    """Synthesise the run's sites at this scale (reused when present) and prepare them into the cache, each step
    with one pool of workers over all the sites' clips."""
    from partitions.cache import prepare_sites
    from partitions.synth.writer import synthesise

    sites = [name.strip() for name in str(config["sites"]).split(",") if name.strip()]
    unknown = [name for name in sites if name not in SYNTH_SITES]
    if unknown:
        raise DataError(
            f"fedmer simulate synthesises its sites and cannot make {', '.join(unknown)}; list sites among "
            f"{', '.join(SYNTH_SITES)}"
        )
    subjects, clips = SCALES[scale]
    root, cache = Path(config["data-root"]), Path(config["cache-root"])
    written = synthesise(
        root, seed=SYNTH_SEED, sites=sites, subjects=subjects, clips_per_subject=clips, workers=WORKERS
    )
    reports = prepare_sites(written, cache, workers=WORKERS, labels=str(config["labels"]))
    for (name, path), report in zip(written.items(), reports, strict=True):
        console.print(
            f"{name}: {report.total} clips ({report.prepared} prepared, {report.reused} cached, "
            f"{len(report.skipped)} skipped) at {path}",
            highlight=False,
            soft_wrap=True,
        )


# ----------------------------------------------------------------------------------------------- Ray


@contextlib.contextmanager
def simulation_environment() -> Iterator[Path]:
    """Flower's quiet settings and a private ``RAY_TMPDIR`` (short: Ray's socket paths are length-limited),
    restored and removed afterwards."""
    ray_tmp = Path(tempfile.mkdtemp(prefix="ray"))
    values = {**RUN_ENV, "RAY_TMPDIR": str(ray_tmp)}
    saved = {key: os.environ.get(key) for key in values}
    os.environ.update(values)
    try:
        yield ray_tmp
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value
        shutil.rmtree(ray_tmp, ignore_errors=True)


def backend_config(sites: int, verbose: bool = False) -> dict[str, Any]:
    """One Ray worker of 2 CPUs; with CUDA every site's task gets an equal share of one GPU; the workers' output
    on the console only when ``verbose`` (:func:`server.run_logs.ray_init_args`)."""
    import torch

    from server.run_logs import ray_init_args

    gpus = round(1.0 / max(sites, 1), 2) if torch.cuda.is_available() else 0.0
    return {"client_resources": {"num_cpus": WORKERS, "num_gpus": gpus}, "init_args": ray_init_args(verbose)}


def run_simulation(config: Mapping[str, Any], console_out: Console | None = None, *, verbose: bool = False) -> None:
    """The federation on Flower's simulation engine with the real apps, one node per site of ``config``.

    Call it inside :func:`simulation_environment`; ``config`` is a resolved config (:func:`simulation_config`)
    whose sites are prepared (:func:`prepare_data`). Flower's and Ray's output goes to ``<out>/logs/``, and to
    the console as well only when ``verbose`` (:func:`server.run_logs.captured_logs`).
    """
    from flwr.simulation import run_simulation as flower_run_simulation

    from client.client_app import make_client_app
    from server.run_logs import captured_logs
    from server.server_app import make_server_app

    sites = len([name for name in str(config["sites"]).split(",") if name.strip()])
    ray_tmp = os.environ.get("RAY_TMPDIR")
    with captured_logs(Path(config["out"]), verbose=verbose, ray_tmp=Path(ray_tmp) if ray_tmp else None):
        flower_run_simulation(
            server_app=make_server_app(config, console=console_out),
            client_app=make_client_app(config),
            num_supernodes=sites,
            backend_config=backend_config(sites, verbose),
        )


# ----------------------------------------------------------------------------------------------- command


def simulate(
    rounds: Annotated[
        int | None, typer.Option("--rounds", min=1, help="Server rounds (default 3; overrides --config)")
    ] = None,
    strategy: Annotated[
        str | None,
        typer.Option(
            "--strategy", help="fedavg, fedavgm, fedprox, fedadam, fedmedian, krum, multikrum or personalised"
        ),
    ] = None,
    scale: ScaleOption = Scale.default,
    out: OutOption = None,
    seed: SeedOption = None,
    config: ConfigOption = None,
    data: DataOption = DEFAULT_DATA,
    cache: CacheOption = DEFAULT_CACHE,
    dp: Annotated[
        bool | None, typer.Option("--dp/--no-dp", help="Sample-level DP-SGD at every site (run config dp)")
    ] = None,
    target_epsilon: Annotated[
        float | None,
        typer.Option("--target-epsilon", help="Each site's DP budget for the whole run (dp-target-epsilon)"),
    ] = None,
    noise_multiplier: Annotated[
        float | None, typer.Option("--noise-multiplier", help="Fixed DP-SGD noise (dp-noise-multiplier)")
    ] = None,
    central_dp: Annotated[
        str | None,
        typer.Option(
            "--central-dp",
            help="User-level DP at the server: server-fixed, client-fixed, server-adaptive or client-adaptive",
        ),
    ] = None,
    verbose: Annotated[
        bool, typer.Option("--verbose", help="Show Flower's and Ray's logs too (always in <run>/logs/)")
    ] = False,
) -> None:
    """Run a federation of synthetic sites on this machine with Flower's simulation engine (Ray)."""
    options = {
        "num-server-rounds": rounds,
        "strategy": strategy,
        "seed": seed,
        "out": str(out) if out else None,
        "dp": dp,
        "dp-target-epsilon": target_epsilon,
        "dp-noise-multiplier": noise_multiplier,
        "central-dp": central_dp,
    }
    resolved: dict[str, Any] = {}
    try:
        with simulation_environment():
            from server.server_app import resolve_settings

            resolved = simulation_config(scale=scale, data=data, cache=cache, config_file=config, options=options)
            resolve_settings(resolved)  # a bad strategy, site or number stops here, before any data or Ray
            check_out(Path(resolved["out"]))
            prepare_data(resolved, scale)
            run_simulation(resolved, Console(), verbose=verbose)
    except DataError as error:
        raise fail(error) from None
    except RuntimeError as error:
        from server.records import LOGS

        console.print(f"[bold red]error:[/] {causes(error)}", highlight=False, soft_wrap=True)
        if resolved:
            console.print(f"Flower's and Ray's logs: {Path(resolved['out']) / LOGS}", highlight=False, soft_wrap=True)
        raise typer.Exit(code=1) from None


def causes(error: BaseException) -> str:
    """An error and the errors that caused it, outermost first: Flower wraps a failed run in a RuntimeError whose
    own message names no cause."""
    chain = [str(error)]
    while (error := error.__cause__) is not None:
        chain.append(f"{type(error).__name__}: {error}")
    return "; caused by ".join(chain)


def register(app: typer.Typer) -> None:
    """Add ``simulate`` to the ``fedmer`` command."""
    app.command()(simulate)
