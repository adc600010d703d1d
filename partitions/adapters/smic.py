"""SMIC readers: SMIC-HS (``smic``), SMIC-VIS (``smic-vis``) and SMIC-NIR (``smic-nir``).

Facts from ``/work/shared/reference/datasets.md`` ("SMIC"): HS is 100 fps, VIS
and NIR 25 fps; there is no sheet, labels are folder names
``HS/s1/micro/negative/s1_ne_01/image000123.bmp`` with classes negative,
positive and surprise; non-micro clips live under ``non_micro/`` and are not
read; cropped releases name frames ``reg_image000123.bmp`` or
``reg_00001.bmp``; some copies zero-pad subjects (``s01``). No onset, apex,
offset or action units.

Choices: subjects are written ``s1`` whatever the folder's padding; when the
root holds several ``HS/`` folders (raw and cropped releases side by side) the
one outside a ``*crop*`` folder is read; frames whose names start with ``reg_``
mark the sample ``precropped``.
"""

from __future__ import annotations

from pathlib import Path

from ..errors import DataError
from ..records import SiteIndex
from ..sheets import child_dir, find_dirs, subdirs, tree_summary
from .base import Adapter, SiteBuilder, check_emotion, entry_name, list_frames, make_sample, numbered_dirs

SUBJECT_DIR = r"s\d+"
EMOTIONS = ("negative", "positive", "surprise")


def variant_dir(root: Path, variant: str) -> Path | None:
    """The ``HS``/``VIS``/``NIR`` folder (the root itself or up to two levels down) that holds subjects."""
    candidates = [d for d in find_dirs(root, (variant,), max_depth=2) if numbered_dirs(d, SUBJECT_DIR)]
    candidates.sort(key=lambda d: ("crop" in str(d.relative_to(root)).lower(), str(d)))
    return candidates[0] if candidates else None


def read_variant(root: Path, adapter: Adapter, variant: str) -> SiteIndex:
    """Walk ``<variant>/s*/micro/<emotion>/<clip>/`` and make one sample per clip folder."""
    folder = variant_dir(root, variant)
    if folder is None:
        raise DataError(
            f"{root}: no {variant}/ folder with subject folders (s1, s01, ...) in it or two levels below; "
            f"{tree_summary(root)}. Point --root at the SMIC top folder ({adapter.layout})."
        )
    builder = SiteBuilder(adapter, root)
    for number, subject_dir in numbered_dirs(folder, SUBJECT_DIR).items():
        micro = child_dir(subject_dir, "micro")
        for emotion_dir in subdirs(micro) if micro else []:
            emotion = check_emotion(emotion_dir.name, adapter, f"{emotion_dir} (folder name)")
            for clip_dir in subdirs(emotion_dir):
                read_clip(builder, clip_dir, f"s{number}", emotion)
    return builder.finish()


def read_clip(builder: SiteBuilder, clip_dir: Path, subject: str, emotion: str) -> None:
    """One clip folder as a sample, or a skipped entry when it holds no frames."""
    builder.entries += 1
    source = str(clip_dir.relative_to(builder.root))
    frames = list_frames(clip_dir)
    if not frames:
        builder.skip(entry_name(subject, clip_dir.name, source), f"the frame folder {clip_dir} holds no frames")
        return
    precropped = any(path.name.lower().startswith("reg_") for _number, path in frames)
    builder.add(
        make_sample(builder.adapter, subject, clip_dir.name, frames, emotion, source=source, precropped=precropped)
    )


def sniff_variant(root: Path, variant: str) -> str | None:
    """Evidence that ``root`` holds this SMIC recording: a ``<variant>/s*/micro/`` folder."""
    folder = variant_dir(root, variant)
    if folder is None:
        return None
    if not any(child_dir(s, "micro") for s in numbered_dirs(folder, SUBJECT_DIR).values()):
        return None
    where = folder.relative_to(root)
    return f"it holds {where}/ with s*/micro/ folders" if str(where) != "." else "it holds s*/micro/ folders"


def _adapter(name: str, title: str, variant: str, fps: float) -> Adapter:
    """One SMIC recording's adapter; the three differ only in folder name and frame rate."""
    return Adapter(
        name=name,
        title=title,
        fps=fps,
        emotions=EMOTIONS,
        layout=f"{variant}/s1/micro/negative/s1_ne_01/image000123.bmp",
        read=lambda root: read_variant(root, ADAPTERS[name], variant),
        sniff=lambda root: sniff_variant(root, variant),
    )


ADAPTERS = {
    "smic": _adapter("smic", "SMIC-HS", "HS", 100.0),
    "smic-vis": _adapter("smic-vis", "SMIC-VIS", "VIS", 25.0),
    "smic-nir": _adapter("smic-nir", "SMIC-NIR", "NIR", 25.0),
}
