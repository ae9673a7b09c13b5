"""Checkpoint files of the ViT families: reading them, their container layouts, telling the family
from the keys, and the architecture that the tensor shapes imply.
"""
import math
import os
import pickle
from dataclasses import dataclass

import torch

from utils.errors import InputNotFoundError, InvalidInputError

__all__ = [
    "FAMILIES",
    "UnknownCheckpointError",
    "LAYOUTS",
    "VIT_KEYS",
    "ViTShape",
    "read_checkpoint",
    "extract_backbone",
    "detect_family",
    "describe_keys",
    "infer_shape",
]

FAMILIES = ("dino", "dinov2", "ibot", "msn", "mae", "mocov3", "unicom")


class UnknownCheckpointError(InvalidInputError):
    """The checkpoint file cannot be read or matches no supported backbone family."""


@dataclass(frozen=True)
class _Layout:
    """Where a family keeps its backbone weights inside the file."""

    container: str | None  # top-level key holding the state dict; None: the file is it
    prefix: str  # key prefix of the backbone inside the container
    drop: tuple[str, ...]  # inner key prefixes that are not the backbone
    description: str


LAYOUTS = {
    "dino": _Layout(None, "", (), "a plain state dict with cls_token"),
    "dinov2": _Layout(None, "", ("mask_token",), "a plain state dict (layer scale, mask_token)"),
    "unicom": _Layout(None, "", ("feature.",), "a plain fp16 state dict without cls_token"),
    "mae": _Layout("model", "", ("mask_token", "decoder_"), 'a dict with the ViT under "model"'),
    "ibot": _Layout("state_dict", "", ("masked_embed",), 'a dict with the ViT under "state_dict"'),
    "msn": _Layout(
        "target_encoder", "module.", ("fc.",), 'a dict with "module.*" under "target_encoder"'
    ),
    "mocov3": _Layout(
        "state_dict",
        "module.base_encoder.",
        ("head.",),
        'a dict with "module.base_encoder.*" under "state_dict"',
    ),
}

VIT_KEYS = ("patch_embed.proj.weight", "pos_embed", "blocks.0.attn.qkv.weight", "norm.weight")


def read_checkpoint(path) -> object:
    """Load a checkpoint file on the CPU."""
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise InputNotFoundError(f"checkpoint not found: {path}")
    if os.path.getsize(path) == 0:
        raise UnknownCheckpointError(f"{path}: not a readable PyTorch checkpoint (the file is empty)")
    with open(path, "rb") as f:
        head = f.read(8)
    if not head.startswith((b"PK", b"\x80")):
        raise UnknownCheckpointError(f"{path}: not a readable PyTorch checkpoint (neither a zip archive nor a pickle; it "
                                     f"begins with {head!r})")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError:
        pass
    except Exception as exc:  # truncated archives, text files: any failure to read the user's file is bad input
        raise UnknownCheckpointError(f"{path}: not a readable PyTorch checkpoint, truncated or not a weights file "
                                     f"({_first_line(exc)})") from None
    # Training outputs of the official repositories also pickle non-tensor objects (an
    # argparse Namespace, numpy scalars) that the weights-only unpickler refuses. The file is
    # one the user chose to load as a backbone, so it is unpickled in full.
    try:
        return torch.load(path, map_location="cpu", weights_only=False)
    except Exception as exc:
        raise UnknownCheckpointError(f"{path}: not a readable PyTorch checkpoint, truncated or not a weights file "
                                     f"({_first_line(exc)})") from None


def _first_line(exc: Exception) -> str:
    lines = str(exc).strip().splitlines()
    return (lines[0] if lines else type(exc).__name__)[:160]


def _is_vit(state_dict: dict[str, torch.Tensor]) -> bool:
    return all(key in state_dict for key in VIT_KEYS)


def extract_backbone(raw: object, family: str) -> dict[str, torch.Tensor] | None:
    """The family's backbone state dict from a loaded file, or None if it does not fit."""
    layout = LAYOUTS[family]
    if not isinstance(raw, dict):
        return None
    inner = raw if layout.container is None else raw.get(layout.container)
    if not isinstance(inner, dict):
        return None
    if layout.prefix:
        inner = {
            key[len(layout.prefix):]: value
            for key, value in inner.items()
            if isinstance(key, str) and key.startswith(layout.prefix)
        }
    state_dict = {
        key: value
        for key, value in inner.items()
        if isinstance(key, str) and not key.startswith(layout.drop)
    }
    if not _is_vit(state_dict) or not all(torch.is_tensor(v) for v in state_dict.values()):
        return None
    return state_dict


def _plain_family(state_dict: dict[str, torch.Tensor]) -> str:
    """dino, dinov2 or unicom for a plain state dict (they share no container)."""
    if "cls_token" not in state_dict:
        return "unicom"
    if "mask_token" in state_dict or "register_tokens" in state_dict:
        return "dinov2"
    if "blocks.0.ls1.gamma" in state_dict:
        return "dinov2"
    return "dino"


def detect_family(raw: object) -> str | None:
    """Family of a loaded checkpoint from its container and keys, or None."""
    if not isinstance(raw, dict):
        return None
    if extract_backbone(raw, "msn") is not None:
        return "msn"
    if extract_backbone(raw, "mocov3") is not None:
        return "mocov3"
    if extract_backbone(raw, "ibot") is not None:
        return "ibot"
    if extract_backbone(raw, "mae") is not None:
        return "mae"
    plain = extract_backbone(raw, "dino")
    return None if plain is None else _plain_family(plain)


def describe_keys(raw: object, limit: int = 8) -> str:
    """A short list of the top-level keys and those of the first nested dict."""
    if not isinstance(raw, dict):
        return f"a {type(raw).__name__}, not a dict"

    def head(keys):
        keys = [str(key) for key in keys]
        more = f", ... ({len(keys)} keys)" if len(keys) > limit else ""
        return "[" + ", ".join(keys[:limit]) + more + "]"

    text = f"top-level keys {head(raw.keys())}"
    for key, value in raw.items():
        if isinstance(value, dict):
            text += f"; keys under {key!r}: {head(value.keys())}"
            break
    return text


# Architecture.

@dataclass(frozen=True)
class ViTShape:
    """What the weights tell about the architecture."""

    embed_dim: int
    depth: int
    patch_size: int
    grid_size: int  # side M of the checkpoint's patch grid
    mlp_ratio: float
    num_registers: int
    class_token: bool
    qkv_bias: bool
    layer_scale: bool


def infer_shape(state_dict: dict[str, torch.Tensor], path: str) -> ViTShape:
    """Architecture of a ViT state dict from its tensor shapes."""
    proj = state_dict["patch_embed.proj.weight"]
    if proj.ndim != 4 or proj.shape[2] != proj.shape[3]:
        raise UnknownCheckpointError(
            f"{path}: patch_embed.proj.weight has shape {tuple(proj.shape)}, expected [D, 3, p, p]"
        )
    embed_dim, patch_size = proj.shape[0], proj.shape[3]
    depth = len({key.split(".")[1] for key in state_dict if key.startswith("blocks.")})
    if "blocks.0.mlp.fc1.weight" not in state_dict:
        blocks0 = sorted(key for key in state_dict if key.startswith("blocks.0."))
        raise UnknownCheckpointError(
            f"{path}: unsupported block layout (no mlp.fc1); block 0 holds {blocks0}"
        )
    class_token = "cls_token" in state_dict
    num_patches = state_dict["pos_embed"].shape[1] - int(class_token)
    grid_size = math.isqrt(num_patches)
    if grid_size * grid_size != num_patches:
        raise UnknownCheckpointError(
            f"{path}: pos_embed holds {num_patches} patch positions, not a square grid"
        )
    registers = state_dict.get("register_tokens")
    return ViTShape(
        embed_dim=embed_dim,
        depth=depth,
        patch_size=patch_size,
        grid_size=grid_size,
        mlp_ratio=state_dict["blocks.0.mlp.fc1.weight"].shape[0] / embed_dim,
        num_registers=0 if registers is None else registers.shape[1],
        class_token=class_token,
        qkv_bias="blocks.0.attn.qkv.bias" in state_dict,
        layer_scale="blocks.0.ls1.gamma" in state_dict,
    )
