"""What distinguishes the synthetic CASME II, SAMM, SMIC and CAS(ME)^3 sites from each other.

Frame rates, colour, frame format, emotion vocabularies and their imbalance
follow the real databases (``shared/reference/datasets.md``); emotions are
produced by FACS/EMFACS-style AU combinations (Ekman & Friesen), with rules
that differ a little per database, as their coders did, so that the sites are
non-IID the way the real ones are. Durations follow ME literature: onset to
apex 40-150 ms, whole ME under 500 ms.
"""

from __future__ import annotations

from dataclasses import dataclass

# An AU combination as coded in a sheet: (AU number, side or None) pairs.
AUCombo = tuple[tuple[int, str | None], ...]


def combo(code: str) -> AUCombo:
    """Parse the few AU strings this module writes (``4+L10``, ``R12``): the readers have the full parser."""
    parts = []
    for token in code.split("+"):
        side = token[0] if token[0] in "LR" else None
        parts.append((int(token[1:] if side else token), side))
    return tuple(parts)


@dataclass(frozen=True)
class SynthSpec:
    """One synthetic database: its acquisition and its coders' habits."""

    name: str
    fps: float
    frame_size: tuple[int, int]  # (height, width)
    colour: bool
    extension: str
    emotion_prior: dict[str, float]
    rules: dict[str, tuple[tuple[float, str], ...]]
    intensity: tuple[float, float]  # peak AU intensity range (1.0 = the AU's nominal displacement)
    noise_sigma: tuple[float, float]  # sensor noise, grey levels
    illumination_drift: float  # peak relative gain drift over a clip
    blink_probability: float
    face_width: tuple[float, float]  # pixels

    def frames_for(self, milliseconds: float) -> int:
        """Number of frames a duration spans at this database's frame rate."""
        return max(1, round(milliseconds * self.fps / 1000.0))


_SURPRISE = ((0.55, "1+2"), (0.45, "1+2+5"))
_HAPPY = ((0.5, "6+12"), (0.35, "12"), (0.15, "R12"))

CASME2 = SynthSpec(
    name="casme2",
    fps=200.0,
    frame_size=(240, 240),
    colour=True,
    extension=".jpg",
    # Counts of the 2019 coding sheet: others 99, disgust 63, happiness 32, surprise 28, repression 27, ...
    emotion_prior={
        "others": 99,
        "disgust": 63,
        "happiness": 32,
        "surprise": 28,
        "repression": 27,
        "sadness": 4,
        "fear": 2,
    },
    rules={
        "happiness": _HAPPY,
        "disgust": ((0.4, "4+9"), (0.35, "10"), (0.25, "4+L10")),
        "surprise": _SURPRISE,
        "repression": ((0.4, "14"), (0.3, "15"), (0.3, "15+17")),
        "sadness": ((1.0, "1+4+15"),),
        "fear": ((1.0, "1+2+4+5"),),
        "others": ((0.35, "4"), (0.3, "7"), (0.2, "L14"), (0.15, "17")),
    },
    intensity=(0.8, 1.15),
    noise_sigma=(1.0, 2.5),
    illumination_drift=0.02,
    blink_probability=0.3,
    face_width=(122.0, 134.0),
)

SAMM = SynthSpec(
    name="samm",
    fps=200.0,
    frame_size=(224, 224),
    colour=False,
    extension=".jpg",
    # Capitalised as in the SAMM sheet: Anger 57, Other 26, Happiness 26, Surprise 15, Contempt 12, ...
    emotion_prior={
        "Anger": 57,
        "Other": 26,
        "Happiness": 26,
        "Surprise": 15,
        "Contempt": 12,
        "Disgust": 9,
        "Fear": 8,
        "Sadness": 6,
    },
    rules={
        "Anger": ((0.5, "4+7"), (0.3, "4"), (0.2, "4+7+17")),
        "Other": ((0.4, "7"), (0.3, "17"), (0.3, "5")),
        "Happiness": ((0.6, "6+12"), (0.4, "12")),
        "Surprise": ((0.5, "1+2"), (0.5, "1+2+5")),
        "Contempt": ((0.5, "R14"), (0.5, "L14")),
        "Disgust": ((0.5, "9+10"), (0.5, "10")),
        "Fear": ((1.0, "1+2+4+5"),),
        "Sadness": ((1.0, "1+4+15"),),
    },
    intensity=(0.75, 1.1),
    noise_sigma=(1.5, 3.0),
    illumination_drift=0.01,
    blink_probability=0.2,
    face_width=(124.0, 134.0),
)

SMIC = SynthSpec(
    name="smic",
    fps=100.0,
    frame_size=(192, 192),
    colour=True,
    extension=".bmp",
    # SMIC-HS: 70 negative, 51 positive, 43 surprise.
    emotion_prior={"negative": 70, "positive": 51, "surprise": 43},
    rules={
        "negative": ((0.3, "4+7"), (0.3, "4+9"), (0.2, "15+17"), (0.2, "10")),
        "positive": ((0.7, "12"), (0.3, "6+12")),
        "surprise": ((0.7, "1+2"), (0.3, "1+2+5")),
    },
    intensity=(0.7, 1.05),
    noise_sigma=(2.0, 3.5),
    illumination_drift=0.03,
    blink_probability=0.35,
    face_width=(112.0, 122.0),
)

CASME3 = SynthSpec(
    name="casme3",
    fps=30.0,
    frame_size=(240, 240),
    colour=True,
    extension=".jpg",
    emotion_prior={"disgust": 250, "surprise": 201, "others": 170, "fear": 86, "anger": 64, "sad": 57, "happy": 55},
    rules={
        "disgust": ((0.5, "4+9"), (0.5, "10")),
        "surprise": _SURPRISE,
        "others": ((0.4, "7"), (0.3, "14"), (0.3, "4")),
        "fear": ((0.6, "1+2+4"), (0.4, "4+5")),
        "anger": ((0.6, "4+7"), (0.4, "4+17")),
        "sad": ((0.6, "1+4+15"), (0.4, "4+15")),
        "happy": ((0.6, "12"), (0.4, "6+12")),
    },
    intensity=(0.8, 1.15),
    noise_sigma=(1.0, 2.0),
    illumination_drift=0.02,
    blink_probability=0.3,
    face_width=(124.0, 134.0),
)

SPECS: dict[str, SynthSpec] = {spec.name: spec for spec in (CASME2, SAMM, SMIC, CASME3)}
