"""Plain configuration of the F5C multitask network: one dataclass per part, two presets.

``mol`` keeps the sizes of MOL's public release (Shao et al., TPAMI 2025; github.com/CYF-cuber/MOL):
stem 1-8-32-64-128, FCC halves of 64 channels, CCC over 16x16 positions, FlowNetC correlation head
(21x21 displacements at dilation 2, encoder up to 1024 channels), landmark MLP 6272-512-136 and the
3-D convolution head 128-32 (kernel 5x2x2) with a 256-unit classifier.

``lite`` is the federation default (at most 8M parameters, every layer one that Opacus computes
per-sample gradients for natively, except FCC's positional embeddings): the same backbone, a shallow
correlation flow head that stops at 1/8 resolution and upsamples bilinearly, and smaller MLPs.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, replace
from typing import Literal

CCCGraph = Literal["positions", "channels"]
Norm = Literal["group", "batch"]


@dataclass(frozen=True)
class FlowHeadConfig:
    """FlowNetC-style head: a shared encoder on the clip's raw frames, a correlation layer per frame pair at
    1/8 resolution, the pair's F5C features concatenated, then a coarse-to-fine decoder to full resolution."""

    encoder: tuple[int, int, int] = (16, 32, 64)  # channels at 1/2, 1/4, 1/8
    redirect: int = 16  # 1x1 projection of frame A's 1/8 features, as FlowNetC's conv_redir
    patch: int = 9  # displacements per axis in the correlation (patch x patch channels)
    dilation: int = 1  # pixels at 1/8 resolution between displacements
    fuse: int = 96  # channels after fusing correlation, redirect and F5C features
    deep: tuple[int, ...] = ()  # extra stride-2 stages below 1/8 (FlowNetC: 512, 512, 1024)
    decoder: tuple[int, ...] = (48,)  # channels of each upsampling stage, down to ``output_stride``
    transposed: bool = False  # transposed-conv upsampling (FlowNetC) instead of bilinear + conv
    # Resolution of the last predicted flow: 1 (full), 2, 4 or 8. A coarser flow is upsampled bilinearly to full
    # resolution, as FlowNetC does from 1/4: the decoder's full-resolution stages were most of a training step.
    output_stride: int = 4
    # The decoder's skips (1/4, and 1/2 and full resolution where it goes that far) carry frame B's maps (and
    # frame B) next to frame A's. Otherwise frame B reaches the head only through the 1/8 correlation, where a
    # 1-pixel micro-expression motion is 1/8 pixel; FlowNetC (and the mol preset) skip frame A only.
    skip_both_frames: bool = True

    def __post_init__(self) -> None:
        if self.output_stride not in (1, 2, 4, 8):
            raise ValueError(f"flow output_stride={self.output_stride}: choose 1, 2, 4 or 8")
        if len(self.decoder) != len(self.deep) + self.fine_stages:
            raise ValueError(
                f"flow decoder has {len(self.decoder)} stages; it needs one per deep stage plus {self.fine_stages} "
                f"(1/8 to 1/{self.output_stride})"
            )

    @property
    def fine_stages(self) -> int:
        """Decoder stages from 1/8 up to the output resolution: 3 for full resolution, 0 for 1/8."""
        return (8 // self.output_stride).bit_length() - 1


@dataclass(frozen=True)
class LandmarkHeadConfig:
    """Conv then MLP from one frame's F5C features to 68 normalised points."""

    channels: int = 32
    stride: int = 2
    hidden: int = 256


@dataclass(frozen=True)
class RecognitionHeadConfig:
    """3-D convolution over the 2(T-1) stacked pair features, pooling, then the classifier."""

    channels: int = 32
    kernel: tuple[int, int, int] = (5, 2, 2)  # time, height, width
    hidden: int = 128
    dropout: float = 0.2
    relative: bool = True  # express the stack against the onset's features: motion since onset, not appearance
    normalise_motion: bool = True  # scale each clip's relative stack to unit variance (only with ``relative``)


@dataclass(frozen=True)
class AUGraphConfig:
    """FED-PsyAU's hierarchical AU graph attention (Li et al., ICCV 2025)."""

    node_dim: int = 64
    beta: float = 0.3  # weight of the co-occurrence prior at r = 1
    region_sigma: float = 0.15  # Gaussian pooling window, in inter-ocular distances


@dataclass(frozen=True)
class ModelConfig:
    """Everything needed to build the network; ``build_model(ModelConfig(...))`` or ``preset("mol", ...)``."""

    preset: str = "lite"
    num_classes: int = 3
    frames: int = 8
    image_size: int = 128  # square crops; any multiple of 8
    channels: int = 128  # stem output, split in two halves by FCC
    stem_widths: tuple[int, int, int] = (8, 32, 64)
    stem_activation: bool = True  # MOL's release stacks its stem convolutions with no activation between
    ccc_graph: CCCGraph = "positions"
    k: int = 4
    norm: Norm = "group"  # BatchNorm is the release's choice; it breaks Opacus and mixes non-IID sites
    norm_groups: int = 8
    flow_head: bool = True
    landmark_head: bool = True
    au_head: bool = True
    flow: FlowHeadConfig = field(default_factory=FlowHeadConfig)
    landmarks: LandmarkHeadConfig = field(default_factory=LandmarkHeadConfig)
    recognition: RecognitionHeadConfig = field(default_factory=RecognitionHeadConfig)
    au_graph: AUGraphConfig = field(default_factory=AUGraphConfig)

    def __post_init__(self) -> None:
        if self.image_size % 8 or self.image_size < 16:
            raise ValueError(f"image_size={self.image_size}: must be a multiple of 8 and at least 16")
        if self.frames < 2:
            raise ValueError(f"frames={self.frames}: the network needs at least one frame pair")
        if self.ccc_graph not in ("positions", "channels"):
            raise ValueError(f"ccc_graph={self.ccc_graph!r}: choose 'positions' or 'channels'")
        if self.channels % 2 or self.channels % self.norm_groups:
            raise ValueError(f"channels={self.channels}: must be even and divisible by norm_groups")

    @property
    def feature_size(self) -> int:
        """Side of the F5C feature map (the stem divides by 8)."""
        return self.image_size // 8

    def to_dict(self) -> dict:
        return asdict(self)


MOL_PRESET = dict(
    stem_activation=False,
    flow=FlowHeadConfig(
        encoder=(64, 128, 256),
        redirect=32,
        patch=21,
        dilation=2,
        fuse=256,
        deep=(512, 512, 1024),
        decoder=(512, 256, 128, 128, 64, 32),
        output_stride=1,
        transposed=True,
        skip_both_frames=False,
    ),
    landmarks=LandmarkHeadConfig(channels=32, stride=1, hidden=512),
    recognition=RecognitionHeadConfig(channels=32, kernel=(5, 2, 2), hidden=256, dropout=0.5, relative=False),
)

PRESETS: dict[str, dict] = {"lite": {}, "mol": MOL_PRESET}


def preset(name: str = "lite", **overrides) -> ModelConfig:
    """The named preset with any field overridden, e.g. ``preset("mol", num_classes=5, ccc_graph="channels")``."""
    if name not in PRESETS:
        raise ValueError(f"unknown preset {name!r}; choose from {', '.join(PRESETS)}")
    return replace(ModelConfig(preset=name, **PRESETS[name]), **overrides)
