"""``fedmer synth``: write synthetic ME databases in their native layouts.

Every random draw comes from a seed derived from (seed, site, subject, clip),
so the same arguments give byte-identical files whatever the worker count.
A site is written into a hidden temporary folder and renamed into place only
when complete, so an interrupted run never leaves a half-written database.
"""

from __future__ import annotations

import json
import multiprocessing
import os
import shutil
from dataclasses import asdict
from functools import lru_cache
from pathlib import Path

import cv2
import numpy as np

from ..errors import DataError
from ..progress import DataProgress
from .clips import build_motion, neutral_image, plan_clip, render_frames
from .databases import SPECS, SynthSpec
from .face import Identity, landmarks_unit, place_landmarks, random_identity, render_face
from .ground_truth import ground_truth_name, save_ground_truth
from .layouts import LAYOUTS, ClipRecord

SYNTH_VERSION = 4
SITE_ORDER = ("casme2", "samm", "smic", "casme3")  # fixed: a site's seed must not depend on which others are asked
MANIFEST = "synth.json"
MAX_IDENTITY_DRAWS = 50
JPEG_QUALITY = 95


def _rng(*keys: int) -> np.random.Generator:
    return np.random.default_rng(np.random.SeedSequence(list(keys)))


@lru_cache(maxsize=1)
def _detector():
    import dlib

    return dlib.get_frontal_face_detector()


def detectable(identity: Identity, spec: SynthSpec, width: float) -> bool:
    """Whether dlib's HOG detector finds the identity's neutral face at its own width, as the real pipeline must."""
    height, frame_width = spec.frame_size
    landmarks = place_landmarks(landmarks_unit(identity), width, (frame_width / 2, height / 2))
    grey = cv2.cvtColor(render_face(identity, landmarks, spec.frame_size), cv2.COLOR_BGR2GRAY)
    return len(_detector()(grey, 0)) > 0


def subject_identity(seed: int, site: int, subject: int, spec: SynthSpec) -> tuple[Identity, float]:
    """The subject's identity and face width: redrawn until the detector finds it (real databases only
    publish clips whose faces can be processed), about 1 in 8 draws here."""
    rng = _rng(seed, site, subject)
    for _ in range(MAX_IDENTITY_DRAWS):
        identity = random_identity(rng)
        width = rng.uniform(*spec.face_width)
        if detectable(identity, spec, width):
            return identity, width
    raise RuntimeError(f"no detectable identity in {MAX_IDENTITY_DRAWS} draws; the face renderer is broken")


MAX_CLIP_DRAWS = 10


def _clip_rng(seed: int, site: int, subject: int, clip: int, attempt: int) -> np.random.Generator:
    keys = (seed, site, subject, clip + 1) + ((attempt,) if attempt else ())
    return _rng(*keys)


def faces_found(frames: list[np.ndarray], rows: set[int], params: list[int], extension: str) -> bool:
    """Whether dlib finds a face (no upsampling, stricter than prepare) in each given frame as it will be stored:
    prepare detects on the first sampled frame, the onset, or the first frame where onsets are not annotated."""
    for row in rows:
        stored = cv2.imdecode(cv2.imencode(extension, frames[row], params)[1], cv2.IMREAD_GRAYSCALE)
        if not len(_detector()(stored, 0)):
            return False
    return True


def write_clip(task: tuple[str, Path, int, int, int, int, Identity, float]) -> ClipRecord:
    """Render one clip into its native folder with its ground truth; returns its sheet record.

    A clip whose stored onset or first frame dlib cannot find a face in is redrawn (about 1 in 30): real databases
    only publish clips their own face pipeline could process.
    """
    site_name, root, seed, site, subject, clip, identity, face_width = task
    spec, layout = SPECS[site_name], LAYOUTS[site_name]
    params = [cv2.IMWRITE_JPEG_QUALITY, JPEG_QUALITY] if layout.extension == ".jpg" else []
    for attempt in range(MAX_CLIP_DRAWS):
        rng = _clip_rng(seed, site, subject, clip, attempt)
        plan = plan_clip(spec, rng, face_width, layout.first_frame(rng, clip))
        neutral, landmarks = neutral_image(spec, identity, plan)
        motion = build_motion(plan, landmarks, spec.frame_size)
        frames = list(render_frames(spec, neutral, motion, plan))
        tl = plan.timeline
        if faces_found(frames, {0, tl.onset - tl.first}, params, layout.extension):
            break
    else:
        raise RuntimeError(f"{site_name} subject {subject} clip {clip}: no detectable face in {MAX_CLIP_DRAWS} draws")
    record = ClipRecord(
        subject=subject,
        clip=clip,
        emotion=plan.emotion,
        action_units=plan.action_units,
        first=tl.first,
        onset=tl.onset,
        apex=tl.apex,
        offset=tl.offset,
        last=tl.last,
        quirk=float(rng.random()),
    )
    folder = layout.clip_dir(root, record)
    folder.mkdir(parents=True, exist_ok=True)
    for number, frame in zip(tl.frame_numbers, frames, strict=True):
        cv2.imwrite(str(folder / layout.frame_name(record, int(number))), frame, params)
    save_ground_truth(folder / ground_truth_name(layout.ground_truth_onset(record)), motion)
    return record


def _settings(seed: int, subjects: int, clips_per_subject: int) -> dict:
    return {"version": SYNTH_VERSION, "seed": seed, "subjects": subjects, "clips_per_subject": clips_per_subject}


def synthesise(
    out: Path,
    seed: int = 0,
    sites: list[str] | tuple[str, ...] = ("casme2", "samm", "smic"),
    subjects: int = 8,
    clips_per_subject: int = 6,
    workers: int | None = None,
    progress: bool = True,
) -> dict[str, Path]:
    """Write each requested site under ``out/<site>``; a site already written with the same settings is reused."""
    unknown = [s for s in sites if s not in SPECS]
    if unknown:
        raise DataError(f"--sites: unknown database {', '.join(unknown)}; choose from {', '.join(SITE_ORDER)}")
    if subjects < 1 or clips_per_subject < 1:
        raise DataError("--subjects and --clips-per-subject must be at least 1")
    settings = _settings(seed, subjects, clips_per_subject)
    written = {name: Path(out) / name for name in sites}
    missing = [name for name in sites if not _reusable(written[name], settings)]
    if missing:
        _write_sites(missing, Path(out), settings, workers or os.cpu_count() or 1, progress)
    return written


def _reusable(target: Path, settings: dict) -> bool:
    """True when ``target`` already holds this exact synthetic site; an error when it holds something else."""
    if not target.exists():
        return False
    manifest = target / MANIFEST
    if manifest.is_file() and json.loads(manifest.read_text())["settings"] == settings:
        return True
    raise DataError(
        f"{target} already exists and was not written by fedmer synth with these settings "
        f"({manifest.name} differs or is missing); remove it or pass another --out"
    )


def _identity(task: tuple[str, int, int]) -> tuple[Identity, float]:
    """Pool task: one subject's identity and face width."""
    name, seed, subject = task
    return subject_identity(seed, SITE_ORDER.index(name), subject, SPECS[name])


def _write_sites(names: list[str], out: Path, settings: dict, workers: int, progress: bool) -> None:
    """Write the sites with one pool of workers over all their subjects, then all their clips.

    One pool keeps both cores busy across site boundaries, and draws the subjects' identities (each a few dlib
    detections) in parallel too. Each site is renamed into place as soon as its last clip is written.
    """
    seed, count, clips = settings["seed"], settings["subjects"], settings["clips_per_subject"]
    partials = {name: out / f".{name}.partial" for name in names}
    for partial in partials.values():
        shutil.rmtree(partial, ignore_errors=True)
        partial.mkdir(parents=True)
    _detector()  # loaded before the fork: every worker shares it
    subjects = [(name, seed, s) for name in names for s in range(count)]
    tasks = len(names) * count * clips
    with (
        multiprocessing.get_context("fork").Pool(min(workers, tasks)) as pool,
        DataProgress("synthesised", enabled=progress) as shown,
    ):
        identities = dict(zip(subjects, pool.map(_identity, subjects), strict=True))
        clip_tasks = [
            (name, partials[name], seed, SITE_ORDER.index(name), s, c, *identities[name, seed, s])
            for name in names
            for s in range(count)
            for c in range(clips)
        ]
        handles = {name: shown.add(name, count * clips) for name in names}
        records: dict[str, list[ClipRecord]] = {name: [] for name in names}
        for task, record in zip(clip_tasks, pool.imap(write_clip, clip_tasks), strict=True):
            name = task[0]
            records[name].append(record)
            shown.advance(handles[name])
            if len(records[name]) == count * clips:
                _finish_site(name, partials[name], out / name, settings, records[name])


def _finish_site(name: str, partial: Path, target: Path, settings: dict, records: list[ClipRecord]) -> None:
    """Write the site's sheet and manifest, then rename the complete site into place."""
    LAYOUTS[name].write_sheet(partial, records)
    manifest = {
        "settings": settings,
        "database": name,
        "fps": SPECS[name].fps,
        "clips": [asdict(r) | {"action_units": [list(a) for a in r.action_units]} for r in records],
    }
    (partial / MANIFEST).write_text(json.dumps(manifest, indent=1))
    os.replace(partial, target)
