"""``fedmer prepare``: site data -> model-ready clips in a resumable, parameter-keyed cache.

Per clip (as MOL, Shao et al. TPAMI 2025, and common ME pipelines): T frames
spread over the ME interval (:mod:`.sampling`), a face found and aligned once
on the first sampled frame (:mod:`.face`), 68 landmarks on every sampled
frame, and TV-L1 flow between consecutive crops as pseudo ground truth
(:mod:`.flow`). Synthetic databases also get their exact flow and landmarks
in crop coordinates, so the pipeline itself can be scored.

Cache layout (``<cache>`` is shared by all sites and settings)::

    <cache>/prep-v<version>-<digest>/          one folder per PrepareConfig
        config.json                           the parameters behind the digest
        <database>/<subject>/<clip>-<fp>.npz  one entry per sample (fp: sample fingerprint)
        reports/<dataset>.json                last run's summary, skipped samples and why

Entries are written to a temp file in the same folder and renamed into place,
so a crash never leaves a readable half entry; a rerun skips every entry that
exists. Bytes are deterministic (fixed zip timestamps, one OpenCV thread), so
1 or N workers give identical files.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import re
import tempfile
import time
import zipfile
from collections.abc import Iterable, Sequence
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import asdict, dataclass, field
from itertools import pairwise
from multiprocessing import get_context
from pathlib import Path
from typing import Any

import cv2
import numpy as np

from .errors import DataError
from .face import (
    AlignConfig,
    eye_centres,
    face_models,
    resize_transform,
    similarity_from_eyes,
    to_crop,
    warp,
    whole_frame_rect,
)
from .flow import FlowConfig, consecutive_flow, crop_pixels_in_frame, displacements_to_crop, tvl1
from .progress import DataProgress
from .records import Sample, Skipped
from .sampling import SamplingPlan, TooFewFrames, assemble, plan_sampling

STAGES = ("decode", "detect", "landmarks", "align", "tvl1", "ground_truth", "write", "other")
STALE_TEMP_SECONDS = 3600.0
_ZIP_TIME = (1980, 1, 1, 0, 0, 0)


def _current_umask() -> int:
    """The process umask (only readable by setting it), so cache files get the mode plain ``open`` would give."""
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


_UMASK = _current_umask()


@dataclass(frozen=True)
class PrepareConfig:
    """Every parameter that changes a cache entry; its digest names the cache folder.

    Bump ``version`` whenever the pipeline's code changes what it writes.
    """

    t: int = 8
    align: AlignConfig = field(default_factory=AlignConfig)
    flow: FlowConfig = field(default_factory=FlowConfig)
    upsamples: tuple[int, ...] = (0, 1)
    version: int = 2  # 2: the exact flow is evaluated at the crop's pixels instead of interpolated from the frame's

    @property
    def size(self) -> int:
        """Side of the square crop in pixels."""
        return self.align.size

    def as_dict(self) -> dict[str, Any]:
        """Plain JSON-able parameters (what the digest hashes and config.json shows)."""
        return json.loads(json.dumps(asdict(self)))

    @property
    def digest(self) -> str:
        """Stable hash of all parameters: any change gives a new folder, never a stale hit."""
        text = json.dumps(self.as_dict(), sort_keys=True, separators=(",", ":"))
        return hashlib.sha256(text.encode()).hexdigest()[:12]

    def folder(self, cache: Path) -> Path:
        """This configuration's folder inside a cache."""
        return Path(cache) / f"prep-v{self.version}-{self.digest}"


class SkipSample(Exception):
    """A clip the pipeline cannot use; ``str`` is the reason a person can act on (naming the file)."""


@dataclass
class PrepareReport:
    """What one ``prepare`` run did, for the console and ``reports/<dataset>.json``."""

    dataset: str
    folder: Path
    config: dict[str, Any]
    workers: int
    total: int = 0
    prepared: int = 0
    reused: int = 0
    interpolated: int = 0
    face_fallback: int = 0
    seconds: float = 0.0
    stage_seconds: dict[str, float] = field(default_factory=dict)
    skipped: list[Skipped] = field(default_factory=list)
    site_skipped: list[Skipped] = field(default_factory=list)

    def to_json(self) -> dict[str, Any]:
        """The report as JSON-able data."""
        return {
            "dataset": self.dataset,
            "folder": str(self.folder),
            "config": self.config,
            "workers": self.workers,
            "total": self.total,
            "prepared": self.prepared,
            "reused": self.reused,
            "interpolated": self.interpolated,
            "face_fallback": self.face_fallback,
            "seconds": round(self.seconds, 3),
            "stage_seconds": {k: round(v, 4) for k, v in self.stage_seconds.items()},
            "skipped": [asdict(s) for s in self.skipped],
            "site_skipped": [asdict(s) for s in self.site_skipped],
        }


# --------------------------------------------------------------------------- entry names and files


def _safe(part: str) -> str:
    """A path component that is safe on every file system (sheet ids can hold ``/``, ``(`` or spaces)."""
    return re.sub(r"[^A-Za-z0-9._-]+", "_", str(part)).strip("._") or "_"


def sample_fingerprint(sample: Sample) -> str:
    """Hash of what the pipeline reads from a sample, so a corrected sheet row gives a new entry."""
    text = json.dumps(
        [
            sample.key,
            [p.name for p in sample.frames],
            list(sample.frame_numbers),
            sample.onset,
            sample.offset,
            sample.precropped,
        ],
        separators=(",", ":"),
    )
    return hashlib.sha256(text.encode()).hexdigest()[:10]


def entry_path(folder: Path, sample: Sample) -> Path:
    """Where a sample's entry lives inside a configuration folder."""
    name = f"{_safe(sample.clip_id)}-{sample_fingerprint(sample)}.npz"
    return Path(folder) / _safe(sample.database) / _safe(sample.subject) / name


def _npz_bytes(arrays: dict[str, np.ndarray]) -> bytes:
    """An ``.npz`` (readable by ``np.load``) with fixed timestamps, so equal arrays give equal bytes."""
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", compression=zipfile.ZIP_DEFLATED) as archive:
        for name in sorted(arrays):
            body = io.BytesIO()
            np.lib.format.write_array(body, np.asarray(arrays[name], order="C"), allow_pickle=False)
            info = zipfile.ZipInfo(f"{name}.npy", date_time=_ZIP_TIME)
            info.compress_type = zipfile.ZIP_DEFLATED
            info.external_attr = 0o644 << 16
            archive.writestr(info, body.getvalue())
    return buffer.getvalue()


def atomic_write(path: Path, data: bytes) -> None:
    """Write via a temp file in the same folder and ``os.replace``: readers see all of it or nothing."""
    path.parent.mkdir(parents=True, exist_ok=True)
    descriptor, temp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        os.fchmod(descriptor, 0o666 & ~_UMASK)  # mkstemp makes 0600; a shared cache wants the usual mode
        with os.fdopen(descriptor, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(temp, path)
    except BaseException:
        Path(temp).unlink(missing_ok=True)
        raise


def write_entry(path: Path, arrays: dict[str, np.ndarray]) -> None:
    """Store one clip's arrays atomically and deterministically."""
    atomic_write(path, _npz_bytes(arrays))


def read_entry(path: Path) -> dict[str, np.ndarray]:
    """Load one entry; a missing or damaged file is a :class:`DataError` that says to run ``prepare``."""
    try:
        with np.load(path, allow_pickle=False) as archive:
            return {name: archive[name] for name in archive.files}
    except FileNotFoundError:
        raise DataError(f"cache entry {path} is missing: run `fedmer prepare` for this site and cache") from None
    except (OSError, ValueError, zipfile.BadZipFile, EOFError) as error:
        raise DataError(f"cache entry {path} is damaged ({error}): delete it and run `fedmer prepare` again") from None


def _remove_stale_temps(folder: Path, older_than: float = STALE_TEMP_SECONDS) -> None:
    """Delete temp files that a crashed run left behind (never a live writer's: those are recent)."""
    if not folder.is_dir():
        return
    now = time.time()
    for temp in folder.rglob(".*.tmp"):
        try:
            if now - temp.stat().st_mtime > older_than:
                temp.unlink()
        except FileNotFoundError:
            pass


# --------------------------------------------------------------------------- per-clip pipeline


def read_gray(path: Path) -> np.ndarray:
    """Decode one frame as 8-bit grayscale, or say which file is missing or unreadable (no OpenCV traceback)."""
    try:
        data = np.fromfile(path, dtype=np.uint8)
    except FileNotFoundError:
        raise SkipSample(f"missing frame {path}: the file does not exist") from None
    except OSError as error:
        raise SkipSample(f"unreadable frame {path}: {error.strerror or error}") from None
    if data.size == 0:
        raise SkipSample(f"unreadable frame {path}: the file is empty")
    try:
        image = cv2.imdecode(data, cv2.IMREAD_GRAYSCALE)
    except cv2.error:
        image = None
    if image is None:
        raise SkipSample(f"unreadable frame {path}: not a decodable image (corrupt or truncated file)")
    if image.dtype != np.uint8:
        image = cv2.convertScaleAbs(image, alpha=255.0 / max(float(image.max()), 1.0))
    return image


def _decode(sample: Sample, plan: SamplingPlan) -> dict[int, np.ndarray]:
    """Decode only the frames the plan needs, checking they share one size."""
    decoded = {index: read_gray(sample.frames[index]) for index in plan.needed}
    first = plan.needed[0]
    for index, image in decoded.items():
        if image.shape != decoded[first].shape:
            raise SkipSample(
                f"frame {sample.frames[index]} is {image.shape[1]}x{image.shape[0]} but "
                f"{sample.frames[first]} is {decoded[first].shape[1]}x{decoded[first].shape[0]}: "
                "a clip's frames must share one size"
            )
    return decoded


def _ground_truth(sample: Sample, plan: SamplingPlan, transform: np.ndarray, size: int) -> dict[str, np.ndarray]:
    """Exact flow and landmarks in crop coordinates for synthetic clips; nothing for real data.

    Interpolated clips get none: their sampled frames were never rendered.
    """
    if plan.interpolated:
        return {}
    try:
        from .synth.ground_truth import load_ground_truth
    except ModuleNotFoundError:
        return {}
    truth = load_ground_truth(sample.frames[0].parent)
    if truth is None:
        return {}
    numbers = [sample.frame_numbers[index] for index in plan.needed]
    points = crop_pixels_in_frame(transform, size)
    try:
        landmarks = np.stack([to_crop(truth.landmarks(n), transform) for n in numbers])
        flow = np.stack(
            [displacements_to_crop(truth.flow_at(points, a, b), transform, size) for a, b in pairwise(numbers)]
        )
    except KeyError:  # ground truth that does not cover these frames: score nothing rather than guess
        return {}
    return {"gt_landmarks": landmarks.astype(np.float32), "gt_flow": flow.astype(np.float16)}


def _tick(timings: dict[str, float], stage: str, start: float) -> float:
    """Add the time since ``start`` to ``stage`` and return now."""
    now = time.perf_counter()
    timings[stage] = timings.get(stage, 0.0) + now - start
    return now


def process_sample(sample: Sample, config: PrepareConfig, timings: dict[str, float] | None = None) -> dict:
    """Run the whole per-clip pipeline and return the entry's arrays; :class:`SkipSample` if it cannot.

    ``timings`` (if given) receives seconds per stage, for the benchmark.
    """
    timings = {} if timings is None else timings
    size = config.size
    clock = time.perf_counter()
    try:
        plan = plan_sampling(sample, config.t)
    except TooFewFrames as error:
        raise SkipSample(str(error)) from None
    frames = assemble(plan, _decode(sample, plan))
    reference_path = sample.frames[plan.lo]
    clock = _tick(timings, "decode", clock)

    models = face_models()
    rect = models.detect(frames[0], config.upsamples)
    fallback = rect is None
    if fallback and not sample.precropped:
        raise SkipSample(
            f"no face found in {reference_path} (first sampled frame; dlib HOG, upsampling "
            f"{' and '.join(map(str, config.upsamples))})"
        )
    rect = rect or whole_frame_rect(frames[0])
    clock = _tick(timings, "detect", clock)

    landmarks_frame = np.stack([models.landmarks(frame, rect) for frame in frames])
    clock = _tick(timings, "landmarks", clock)

    left, right = eye_centres(landmarks_frame[0])
    if np.linalg.norm(right - left) >= 2.0:
        transform = similarity_from_eyes(left, right, config.align)
    else:  # degenerate eyes (only possible on the pre-cropped fallback): keep the whole frame
        transform = resize_transform(frames[0].shape, size)
        fallback = True
    crops = [warp(frame, transform, size) for frame in frames]
    landmarks = np.stack([to_crop(points, transform) for points in landmarks_frame])
    clock = _tick(timings, "align", clock)

    flow = consecutive_flow(crops, config.flow)
    clock = _tick(timings, "tvl1", clock)

    truth = _ground_truth(sample, plan, transform, size)
    _tick(timings, "ground_truth", clock)
    return {
        "frames": np.stack(crops).astype(np.uint8),
        "flow": flow.astype(np.float16),
        "landmarks": landmarks.astype(np.float32),
        "transform": transform.astype(np.float32),
        "frame_numbers": plan.frame_numbers(sample).astype(np.float32),
        "interpolated": np.array(plan.interpolated),
        "whole_clip": np.array(plan.whole_clip),
        "face_fallback": np.array(fallback),
        **truth,
    }


@dataclass
class Outcome:
    """One clip's result as it travels back from a worker (small: no pixels)."""

    key: str
    reason: str | None = None
    interpolated: bool = False
    face_fallback: bool = False
    timings: dict[str, float] = field(default_factory=dict)


def prepare_one(sample: Sample, config: PrepareConfig, path: Path) -> Outcome:
    """Process and store one clip; failures become a reason, never a traceback."""
    timings: dict[str, float] = {}
    start = time.perf_counter()
    try:
        arrays = process_sample(sample, config, timings)
    except SkipSample as error:
        return Outcome(sample.key, reason=str(error), timings=timings)
    except cv2.error as error:
        first = sample.frames[0] if sample.frames else sample.key
        message = str(error).strip().splitlines()[-1] if str(error).strip() else "unknown error"
        return Outcome(sample.key, reason=f"OpenCV could not process the frames of {first}: {message}")
    except Exception as error:  # one odd clip must not end an hour-long run; the report shows it
        first = sample.frames[0] if sample.frames else sample.key
        return Outcome(
            sample.key, reason=f"internal error on {first}: {type(error).__name__}: {error} (please report this)"
        )
    clock = time.perf_counter()
    write_entry(path, arrays)
    clock = _tick(timings, "write", clock)
    timings["other"] = max(0.0, (clock - start) - sum(timings.values()))
    return Outcome(
        sample.key,
        interpolated=bool(arrays["interpolated"]),
        face_fallback=bool(arrays["face_fallback"]),
        timings=timings,
    )


def _init_worker(config: PrepareConfig) -> None:
    """Per worker process: one OpenCV thread (workers are the parallelism; also keeps bytes deterministic),
    and dlib/TV-L1 models loaded once."""
    cv2.setNumThreads(1)
    face_models()
    tvl1(config.flow)


@dataclass(frozen=True)
class SiteSamples:
    """One site's labelled samples, and what its adapter and label layer already skipped."""

    dataset: str
    samples: Sequence[Sample]
    site_skipped: Sequence[Skipped] = ()


@dataclass(frozen=True)
class Job:
    """One clip to prepare: which site (index into the run's sites) and where its entry goes."""

    site: int
    sample: Sample
    path: Path


def _run(jobs: Sequence[Job], config: PrepareConfig, workers: int) -> Iterable[tuple[Job, Outcome]]:
    """Yield each job with its outcome as clips finish: in this process for one worker, else in a spawn pool."""
    if workers <= 1 or len(jobs) <= 1:
        threads = cv2.getNumThreads()
        _init_worker(config)
        try:
            for job in jobs:
                yield job, prepare_one(job.sample, config, job.path)
        finally:
            cv2.setNumThreads(threads)
        return
    context = get_context("spawn")  # fork after OpenCV/torch threads exist can deadlock
    with ProcessPoolExecutor(
        min(workers, len(jobs)), mp_context=context, initializer=_init_worker, initargs=(config,)
    ) as pool:
        futures = {pool.submit(prepare_one, job.sample, config, job.path): job for job in jobs}
        for future in as_completed(futures):
            yield futures[future], future.result()


def _open_folder(cache: Path, config: PrepareConfig) -> Path:
    """The configuration's folder, created with its config.json, and cleared of temps a crashed run left."""
    folder = config.folder(Path(cache))
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise DataError(f"cannot create the cache folder {folder}: {error.strerror or error}") from None
    _remove_stale_temps(folder)
    config_file = folder / "config.json"
    if not config_file.exists():
        atomic_write(config_file, json.dumps(config.as_dict(), indent=2, sort_keys=True).encode())
    return folder


def _count(report: PrepareReport, outcome: Outcome) -> None:
    """Add one clip's outcome to its site's report."""
    for stage, seconds in outcome.timings.items():
        report.stage_seconds[stage] = report.stage_seconds.get(stage, 0.0) + seconds
    if outcome.reason is not None:
        report.skipped.append(Skipped(outcome.key, outcome.reason))
    else:
        report.prepared += 1
        report.interpolated += outcome.interpolated
        report.face_fallback += outcome.face_fallback


def prepare_samples(
    samples: Sequence[Sample],
    cache: Path,
    dataset: str,
    workers: int = 1,
    config: PrepareConfig | None = None,
    site_skipped: Sequence[Skipped] = (),
    progress: bool = True,
    console: Any = None,
) -> PrepareReport:
    """Fill the cache for one site's samples (skipping finished entries) and save the run's report."""
    site = SiteSamples(dataset, samples, site_skipped)
    return prepare_many([site], cache, workers=workers, config=config, progress=progress, console=console)[0]


def prepare_many(
    sites: Sequence[SiteSamples],
    cache: Path,
    workers: int = 1,
    config: PrepareConfig | None = None,
    progress: bool = True,
    console: Any = None,
) -> list[PrepareReport]:
    """Fill the cache for several sites with one pool of workers, and save each site's report.

    One pool for all sites starts (and loads dlib) once, and keeps every worker busy until the last clip
    instead of idling at the end of each site. A report's ``seconds`` run from the start to its site's last clip.
    """
    if workers < 1:
        raise DataError(f"--workers {workers}: use 1 or more worker processes")
    config = config or PrepareConfig()
    folder = _open_folder(cache, config)
    start = time.perf_counter()
    reports = [
        PrepareReport(
            site.dataset,
            folder,
            config.as_dict(),
            workers,
            total=len(site.samples),
            site_skipped=list(site.site_skipped),
            stage_seconds=dict.fromkeys(STAGES, 0.0),
        )
        for site in sites
    ]
    jobs = []
    for index, site in enumerate(sites):
        for sample in site.samples:
            path = entry_path(folder, sample)
            if path.exists():
                reports[index].reused += 1
            else:
                jobs.append(Job(index, sample, path))
    left = [sum(job.site == index for job in jobs) for index in range(len(sites))]
    with DataProgress("prepared", console=console, enabled=progress) as shown:
        handles = {index: shown.add(sites[index].dataset, count) for index, count in enumerate(left) if count}
        for job, outcome in _run(jobs, config, workers):
            _count(reports[job.site], outcome)
            shown.advance(handles[job.site])
            left[job.site] -= 1
            if not left[job.site]:
                reports[job.site].seconds = time.perf_counter() - start
    for report in reports:
        report.skipped.sort(key=lambda s: s.entry)
        report.seconds = report.seconds or time.perf_counter() - start
        save_report(report)
    return reports


def report_path(folder: Path, dataset: str) -> Path:
    """Where a site's last report is kept inside a configuration folder."""
    return Path(folder) / "reports" / f"{_safe(dataset)}.json"


def save_report(report: PrepareReport) -> Path:
    """Write the report as JSON beside the entries (atomically, like everything in the cache)."""
    path = report_path(report.folder, report.dataset)
    atomic_write(path, json.dumps(report.to_json(), indent=2).encode())
    return path


def _load_site(dataset: str, root: Path, labels: str, subset: Path | None) -> SiteSamples:
    """The site's labelled samples, via the label layer (imported here so the cache works without it)."""
    from .labels import load_site

    site = load_site(dataset, root, labels=labels, subset=subset)
    return SiteSamples(dataset, site.samples, site.skipped)


def prepare_site(
    dataset: str,
    root: Path,
    cache: Path,
    workers: int = 1,
    labels: str = "native",
    subset: Path | None = None,
    config: PrepareConfig | None = None,
) -> PrepareReport:
    """Read a site (adapter + labels) and prepare every labelled sample into the cache."""
    site = _load_site(dataset, Path(root), labels, subset)
    return prepare_many([site], Path(cache), workers=workers, config=config)[0]


def prepare_sites(
    roots: dict[str, Path],
    cache: Path,
    workers: int = 1,
    labels: str = "native",
    config: PrepareConfig | None = None,
    progress: bool = True,
) -> list[PrepareReport]:
    """Read several sites (``{dataset: root}``) and prepare them all with one pool of workers."""
    sites = [_load_site(dataset, Path(root), labels, None) for dataset, root in roots.items()]
    return prepare_many(sites, Path(cache), workers=workers, config=config, progress=progress)


def render_report(report: PrepareReport, console: Any) -> None:
    """Print the run's summary and every skipped sample with its reason."""
    from rich.table import Table

    console.print(
        f"[bold]{report.dataset}[/]: {report.total} samples -> {report.prepared} prepared, "
        f"{report.reused} already cached, {len(report.skipped)} skipped "
        f"({report.interpolated} interpolated, {report.face_fallback} whole-frame fallback) "
        f"in {report.seconds:.1f}s with {report.workers} worker(s)",
        highlight=False,
        soft_wrap=True,
    )
    console.print(f"cache: {report.folder}", highlight=False, soft_wrap=True)
    for title, rows in (
        ("skipped while preparing", report.skipped),
        ("skipped by the adapter/labels", report.site_skipped),
    ):
        if not rows:
            continue
        table = Table(title=f"{len(rows)} {title}", show_lines=False)
        table.add_column("sample")
        table.add_column("reason", overflow="fold")
        for row in rows:
            table.add_row(row.entry, row.reason)
        console.print(table)
    console.print(f"report: {report_path(report.folder, report.dataset)}", highlight=False, soft_wrap=True)
