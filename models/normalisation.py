"""Input normalisation of the backbones: a property of the weights, not a constant.

The ViT families trained on web images (DINO, DINOv2, iBOT, MSN, MAE, MoCo v3, DINOv3 LVD-1689M)
expect ImageNet mean/std, Unicom expects CLIP's, and the DINOv3 models pretrained on satellite
imagery (SAT-493M) expect their own statistics (DINOv3 README, "Image transforms").
"""

import math
import os
from collections.abc import Sequence
from pathlib import Path

from utils.errors import InvalidInputError

Triple = tuple[float, float, float]

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
SAT_MEAN = (0.430, 0.411, 0.296)
SAT_STD = (0.213, 0.156, 0.143)

NORMALISATIONS: dict[str, tuple[Triple, Triple]] = {
    "imagenet": (IMAGENET_MEAN, IMAGENET_STD),
    "sat": (SAT_MEAN, SAT_STD),
    "clip": (CLIP_MEAN, CLIP_STD),
}

# Meta's satellite checkpoints carry the dataset in their names: dinov3_vitl16_pretrain_sat493m-eadcf0ff.pth,
# and the Hugging Face folders facebook/dinov3-vitl16-pretrain-sat493m.
_SATELLITE_MARK = "sat493m"


class NormalisationHintWarning(UserWarning):
    """The checkpoint's name suggests an input normalisation other than the one in use."""


def resolve_normalisation(norm, default: tuple[Triple, Triple]) -> tuple[Triple, Triple]:
    """(mean, std) for `norm`.

    norm: None (the weights' default, `default`), a name of NORMALISATIONS ("imagenet", "sat",
      "clip"), or six numbers, mean then std: a sequence, a (mean, std) pair, or a string such as
      "0.43,0.411,0.296,0.213,0.156,0.143".
    """
    if norm is None:
        return default
    if isinstance(norm, str):
        name = norm.strip().lower()
        if name in NORMALISATIONS:
            return NORMALISATIONS[name]
        numbers = name.replace(",", " ").split()
    elif isinstance(norm, Sequence):
        pair = len(norm) == 2 and all(isinstance(part, Sequence) and not isinstance(part, str) for part in norm)
        numbers = [*norm[0], *norm[1]] if pair else list(norm)
    else:
        raise InvalidInputError(f"normalisation {norm!r}: expected a name or six numbers")
    try:
        values = [float(value) for value in numbers]
    except (TypeError, ValueError):
        raise InvalidInputError(
            f"unknown normalisation {norm!r}; expected one of {', '.join(NORMALISATIONS)} "
            "or six numbers (mean R G B, std R G B)"
        ) from None
    if len(values) != 6 or not all(math.isfinite(v) for v in values) or min(values[3:]) <= 0:
        raise InvalidInputError(
            f"normalisation {norm!r}: expected six finite numbers (mean R G B, std R G B), the std positive"
        )
    return tuple(values[:3]), tuple(values[3:])


def normalisation_hint(ckpt, norm, mean: Triple) -> str | None:
    """A one-line hint when `ckpt` is named like an official satellite (SAT-493M) checkpoint but
    is loaded with the default normalisation (`norm` None) and that default is not the satellite one.

    ckpt: the weights file or its folder; `mean`: the mean the backbone uses.
    """
    if ckpt is None or norm is not None or tuple(mean) == SAT_MEAN:
        return None
    path = Path(os.fspath(ckpt))
    names = (path.name, path.parent.name) if path.name.endswith(".safetensors") else (path.name,)
    if not any(_SATELLITE_MARK in name.lower() for name in names):
        return None
    return (
        f"{path} is named like a DINOv3 satellite (SAT-493M) checkpoint, whose inputs are normalised with "
        f"mean {SAT_MEAN} and std {SAT_STD}, but the default (mean {tuple(mean)}) is in use: pass the "
        'normalisation "sat" to use them'
    )
