"""Frozen ViT backbones built with timm from official self-supervised checkpoints.

`load_backbone` reads a checkpoint file as its authors publish it (DINO, DINOv2 with or
without registers, iBOT, MSN, MAE, MoCo v3, Unicom), tells the family from the container
and the keys, reads width, depth, patch size, MLP width, registers and layer scale from the
tensor shapes, builds the matching timm `VisionTransformer` and loads the weights with
`strict=True`. The returned module is frozen and maps normalised images to the patch
tokens of the last block after the final norm:

    img[B, 3, H, W] -> tokens[B, (H/p) * (W/p), D]   (row-major over the h x w grid)

Each family keeps its official position-embedding interpolation, so features at any input
size divisible by `p` equal those of the authors' code.
"""
import functools
import math
import os
import pickle
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Dict, Optional, Tuple

import timm
import torch
import torch.nn as nn
import torch.nn.functional as F
from timm.models.vision_transformer import VisionTransformer

from utils.errors import InputNotFoundError, InvalidInputError

__all__ = [
    "FAMILIES",
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "CLIP_MEAN",
    "CLIP_STD",
    "DEFAULT_ARCH",
    "UnknownCheckpointError",
    "RandomBackboneWarning",
    "FrozenViT",
    "load_backbone",
    "checkpoint_stem",
    "default_num_heads",
    "read_checkpoint",
    "detect_family",
    "sincos_2d_position_embedding",
    "interpolate_position_embedding",
]

FAMILIES = ("dino", "dinov2", "ibot", "msn", "mae", "mocov3", "unicom")
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
DEFAULT_ARCH = "vit_tiny_patch16_224"
RANDOM_SEED = 0


class UnknownCheckpointError(InvalidInputError):
    """The checkpoint file cannot be read or matches no supported backbone family."""


class RandomBackboneWarning(UserWarning):
    """The backbone has random weights: its features carry no semantics."""


# Position embeddings. Every rule maps the patch part of the table, [1, M*M, D] for the
# checkpoint's M x M grid, to the target h x w grid, [1, h*w, D], row-major.

def _table_to_grid(table: torch.Tensor) -> torch.Tensor:
    """table: [1, M*M, D] -> grid: [1, D, M, M]."""
    side = math.isqrt(table.shape[1])
    return table.reshape(1, side, side, table.shape[2]).permute(0, 3, 1, 2)


def _grid_to_table(grid: torch.Tensor) -> torch.Tensor:
    """grid: [1, D, h, w] -> table: [1, h*w, D]."""
    return grid.permute(0, 2, 3, 1).reshape(1, grid.shape[2] * grid.shape[3], grid.shape[1])


def interpolate_offset(table: torch.Tensor, h: int, w: int) -> torch.Tensor:
    """DINO, iBOT, MAE (as CAUSE uses it), DINOv2 without registers.

    Bicubic, no antialias, scale factors ((h + 0.1) / M, (w + 0.1) / M): the 0.1 offset
    moves the sampling positions, so `size=(h, w)` would not give the same table.
    table: [1, M*M, D] -> [1, h*w, D]
    """
    side = math.isqrt(table.shape[1])
    grid = F.interpolate(
        _table_to_grid(table),
        scale_factor=((h + 0.1) / side, (w + 0.1) / side),
        mode="bicubic",
    )
    return _grid_to_table(grid)


def interpolate_msn(table: torch.Tensor, h: int, w: int) -> torch.Tensor:
    """MSN: bicubic, no offset, one factor sqrt(h*w / M^2) for square grids.

    Non-square grids (which the official code does not support) use h/M and w/M per axis.
    The output size is forced to (h, w): for some sizes (e.g. M = 14, h = w = 29) the
    official factor floors to h - 1 and its code fails; the sampling positions stay those
    of the official factor, which equal those of `size=(h, w)` up to the rounding of the
    factor.
    table: [1, M*M, D] -> [1, h*w, D]
    """
    side = math.isqrt(table.shape[1])
    if h == w:
        scale_h = scale_w = math.sqrt(h * w / side ** 2)
    else:
        scale_h, scale_w = h / side, w / side
    grid = torch.ops.aten.upsample_bicubic2d.default(
        _table_to_grid(table), [h, w], False, scale_h, scale_w
    )
    return _grid_to_table(grid)


def interpolate_antialias(table: torch.Tensor, h: int, w: int) -> torch.Tensor:
    """DINOv2 with registers: bicubic to size (h, w) with antialias.

    table: [1, M*M, D] -> [1, h*w, D]
    """
    grid = F.interpolate(_table_to_grid(table), size=(h, w), mode="bicubic", antialias=True)
    return _grid_to_table(grid)


def interpolate_size(table: torch.Tensor, h: int, w: int) -> torch.Tensor:
    """Unicom (our rule; its forward has no resize): bicubic to size (h, w), no antialias.

    table: [1, M*M, D] -> [1, h*w, D]
    """
    grid = F.interpolate(
        _table_to_grid(table), size=(h, w), mode="bicubic", align_corners=False
    )
    return _grid_to_table(grid)


def sincos_2d_position_embedding(
    h: int, w: int, dim: int, temperature: float = 10000.0
) -> torch.Tensor:
    """MoCo v3's fixed 2-D sin-cos table for an h x w grid, without the CLS slot.

    Keeps the official `meshgrid(grid_w, grid_h)` ("ij") order: flat token m gets the pair
    (m // h, m % h), and the channels are [sin(w), cos(w), sin(h), cos(h)], D/4 each (with
    row-major tokens of a square grid, the "w" quarter therefore encodes the row).
    -> [1, h*w, dim]
    """
    if dim % 4:
        raise ValueError(f"2-D sin-cos position embedding needs a width divisible by 4, got {dim}")
    grid_w, grid_h = torch.meshgrid(
        torch.arange(w, dtype=torch.float32),
        torch.arange(h, dtype=torch.float32),
        indexing="ij",
    )
    pos_dim = dim // 4
    omega = 1.0 / temperature ** (torch.arange(pos_dim, dtype=torch.float32) / pos_dim)
    out_w = torch.einsum("m,d->md", grid_w.flatten(), omega)
    out_h = torch.einsum("m,d->md", grid_h.flatten(), omega)
    table = torch.cat([out_w.sin(), out_w.cos(), out_h.sin(), out_h.cos()], dim=1)
    return table[None]


def interpolate_sincos(table: torch.Tensor, h: int, w: int) -> torch.Tensor:
    """MoCo v3: the table is not resampled but regenerated for the h x w grid.

    table: [1, M*M, D] -> [1, h*w, D]
    """
    return sincos_2d_position_embedding(h, w, table.shape[2]).to(table)


_POSITION_RULES: Dict[str, Callable[[torch.Tensor, int, int], torch.Tensor]] = {
    "offset": interpolate_offset,
    "msn": interpolate_msn,
    "antialias": interpolate_antialias,
    "size": interpolate_size,
    "sincos": interpolate_sincos,
}


def position_rule(family: str, num_registers: int) -> str:
    """Name of the family's position-embedding rule (a key of `_POSITION_RULES`)."""
    if family == "dinov2":
        return "antialias" if num_registers else "offset"
    return {"msn": "msn", "mocov3": "sincos", "unicom": "size"}.get(family, "offset")


def interpolate_position_embedding(
    table: torch.Tensor, h: int, w: int, rule: str
) -> torch.Tensor:
    """Patch position table of the native M x M grid for an h x w grid by `rule`.

    No interpolation at the native grid. table: [1, M*M, D] -> [1, h*w, D]
    """
    side = math.isqrt(table.shape[1])
    if (h, w) == (side, side):
        return table
    return _POSITION_RULES[rule](table, h, w)


# Checkpoint files.

@dataclass(frozen=True)
class _Layout:
    """Where a family keeps its backbone weights inside the file."""

    container: Optional[str]  # top-level key holding the state dict; None: the file is it
    prefix: str  # key prefix of the backbone inside the container
    drop: Tuple[str, ...]  # inner key prefixes that are not the backbone
    description: str


_LAYOUTS = {
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

_VIT_KEYS = ("patch_embed.proj.weight", "pos_embed", "blocks.0.attn.qkv.weight", "norm.weight")


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


def _is_vit(state_dict: Dict[str, torch.Tensor]) -> bool:
    return all(key in state_dict for key in _VIT_KEYS)


def _extract(raw: object, family: str) -> Optional[Dict[str, torch.Tensor]]:
    """The family's backbone state dict from a loaded file, or None if it does not fit."""
    layout = _LAYOUTS[family]
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


def _plain_family(state_dict: Dict[str, torch.Tensor]) -> str:
    """dino, dinov2 or unicom for a plain state dict (they share no container)."""
    if "cls_token" not in state_dict:
        return "unicom"
    if "mask_token" in state_dict or "register_tokens" in state_dict:
        return "dinov2"
    if "blocks.0.ls1.gamma" in state_dict:
        return "dinov2"
    return "dino"


def detect_family(raw: object) -> Optional[str]:
    """Family of a loaded checkpoint from its container and keys, or None."""
    if not isinstance(raw, dict):
        return None
    if _extract(raw, "msn") is not None:
        return "msn"
    if _extract(raw, "mocov3") is not None:
        return "mocov3"
    if _extract(raw, "ibot") is not None:
        return "ibot"
    if _extract(raw, "mae") is not None:
        return "mae"
    plain = _extract(raw, "dino")
    return None if plain is None else _plain_family(plain)


def _describe_keys(raw: object, limit: int = 8) -> str:
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


def infer_shape(state_dict: Dict[str, torch.Tensor], path: str) -> ViTShape:
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


def default_num_heads(family: str, embed_dim: int) -> int:
    """Heads of the official model (the weights do not show them).

    DINO, DINOv2, iBOT, MSN, MAE: 64 channels per head. MoCo v3 and Unicom: 12 below width
    1024 (their ViT-S and ViT-B alike), 16 from 1024.
    """
    if family in ("mocov3", "unicom"):
        return 12 if embed_dim < 1024 else 16
    return max(1, embed_dim // 64)


def build_vit(shape: ViTShape, family: str, num_heads: int) -> VisionTransformer:
    """An uninitialised timm ViT laid out like the family's checkpoint."""
    unicom = family == "unicom"
    vit = VisionTransformer(
        img_size=shape.grid_size * shape.patch_size,
        patch_size=shape.patch_size,
        num_classes=0,
        global_pool="",
        embed_dim=shape.embed_dim,
        depth=shape.depth,
        num_heads=num_heads,
        mlp_ratio=shape.mlp_ratio,
        qkv_bias=shape.qkv_bias,
        init_values=1.0 if shape.layer_scale else None,
        class_token=shape.class_token,
        reg_tokens=shape.num_registers,
        dynamic_img_size=True,
        norm_layer=functools.partial(nn.LayerNorm, eps=1e-5 if unicom else 1e-6),
        act_layer=nn.ReLU6 if unicom else nn.GELU,
        weight_init="skip",
    )
    # The checkpoints give position embeddings to the CLS token but not to registers
    # (DINOv2) and have no CLS slot at all (Unicom); timm's table would have one slot per
    # prefix token, so the table takes the checkpoint's shape.
    num_positions = shape.grid_size ** 2 + int(shape.class_token)
    vit.pos_embed = nn.Parameter(torch.zeros(1, num_positions, shape.embed_dim))
    return vit


def to_timm_state_dict(state_dict: Dict[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
    """Backbone keys to timm names (only DINOv2's registers differ), tensors in fp32."""
    renamed = {}
    for key, value in state_dict.items():
        key = "reg_token" if key == "register_tokens" else key
        renamed[key] = value.float() if value.is_floating_point() else value
    return renamed


# The module.

class FrozenViT(nn.Module):
    """A frozen timm ViT that returns the final-norm patch tokens of normalised images.

    Attributes: `patch_size`, `embed_dim`, `num_heads`, `num_registers`, `grid_size` (native
    patch grid side), `family`, `mean` / `std` (the input normalisation it expects).
    """

    def __init__(
        self,
        vit: VisionTransformer,
        family: str,
        position_rule: str,
        mean: Tuple[float, float, float],
        std: Tuple[float, float, float],
    ):
        super().__init__()
        self.vit = vit
        self.family = family
        self.position_rule = position_rule
        self.mean = tuple(mean)
        self.std = tuple(std)
        self.patch_size = int(vit.patch_embed.patch_size[0])
        self.embed_dim = int(vit.embed_dim)
        self.num_heads = int(vit.blocks[0].attn.num_heads)
        self.num_registers = int(vit.num_reg_tokens)
        self.has_class_token = bool(vit.has_class_token)
        self.num_prefix_tokens = int(self.has_class_token) + self.num_registers
        self.grid_size = math.isqrt(vit.pos_embed.shape[1] - int(self.has_class_token))
        for param in self.parameters():
            param.requires_grad_(False)
        super().train(False)

    def train(self, mode: bool = True) -> "FrozenViT":
        """Always eval mode: a parent's `.train()` must not enable dropout here."""
        return super().train(False)

    def patch_position_embedding(self, h: int, w: int) -> torch.Tensor:
        """-> [1, h*w, D], the patch part of the position table for an h x w grid."""
        table = self.vit.pos_embed[:, int(self.has_class_token):]
        return interpolate_position_embedding(table, h, w, self.position_rule)

    def forward(self, img: torch.Tensor) -> torch.Tensor:
        """img: [B, 3, H, W] normalised -> tokens: [B, (H/p)*(W/p), D], row-major."""
        batch, _, height, width = img.shape
        p = self.patch_size
        if height % p or width % p:
            raise ValueError(
                f"input size {height}x{width} is not a multiple of the patch size {p} "
                f"of this {self.family} backbone"
            )
        h, w = height // p, width // p
        x = self.vit.patch_embed(img).reshape(batch, h * w, self.embed_dim)
        x = x + self.patch_position_embedding(h, w)
        prefix = []
        if self.has_class_token:
            cls = self.vit.cls_token + self.vit.pos_embed[:, :1]
            prefix.append(cls.expand(batch, -1, -1))
        if self.num_registers:
            prefix.append(self.vit.reg_token.expand(batch, -1, -1))
        x = torch.cat(prefix + [x], dim=1)
        x = self.vit.norm(self.vit.blocks(x))
        return x[:, self.num_prefix_tokens:]


def _random_backbone(arch: str, num_heads: Optional[int], seed: int) -> FrozenViT:
    """A timm ViT with seeded random weights; the global RNG is left untouched."""
    overrides = {} if num_heads is None else {"num_heads": num_heads}
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        try:
            vit = timm.create_model(
                arch,
                pretrained=False,
                num_classes=0,
                global_pool="",
                dynamic_img_size=True,
                **overrides,
            )
        except RuntimeError as exc:
            raise InvalidInputError(f"unknown timm architecture {arch!r} ({exc})") from exc
    if (
        not isinstance(vit, VisionTransformer)
        or not vit.has_class_token
        or vit.num_reg_tokens
        or vit.no_embed_class
    ):
        raise InvalidInputError(
            f"{arch!r} is not a plain timm VisionTransformer with a CLS token "
            "(e.g. vit_tiny_patch16_224, vit_small_patch16_224)"
        )
    warnings.warn(
        f"no backbone checkpoint given: {arch} has random weights (seed {seed}), "
        "its features are meaningless beyond smoke tests",
        RandomBackboneWarning,
        stacklevel=3,
    )
    return FrozenViT(vit, "random", "offset", IMAGENET_MEAN, IMAGENET_STD)


def load_backbone(
    ckpt,
    family: Optional[str] = None,
    arch: Optional[str] = None,
    num_heads: Optional[int] = None,
    *,
    seed: int = RANDOM_SEED,
) -> FrozenViT:
    """Frozen, eval-mode ViT from an official checkpoint file.

    ckpt: path of the file, or None for random weights of the timm architecture `arch`
      (default `vit_tiny_patch16_224`, seeded by `seed`; warns with RandomBackboneWarning).
    family: one of FAMILIES, or None to detect it from the container and the keys.
    num_heads: overrides the family's head count (SPEC section 0: the reference ran DINO
      ViT-S with 12 heads).
    Returns a FrozenViT: forward(img[B, 3, H, W]) -> tokens[B, (H/p)*(W/p), D].
    """
    if ckpt is None:
        return _random_backbone(arch or DEFAULT_ARCH, num_heads, seed)
    if family is not None and family not in FAMILIES:
        raise InvalidInputError(
            f"unknown backbone family {family!r}; expected one of {', '.join(FAMILIES)}"
        )
    path = os.fspath(ckpt)
    raw = read_checkpoint(path)
    if family is None:
        family = detect_family(raw)
        if family is None:
            raise UnknownCheckpointError(
                f"{path}: matches no backbone family ({', '.join(FAMILIES)}); "
                f"found {_describe_keys(raw)}"
            )
    state_dict = _extract(raw, family)
    if state_dict is None:
        raise UnknownCheckpointError(
            f"{path}: not a {family} checkpoint (expected {_LAYOUTS[family].description} "
            f"holding {', '.join(_VIT_KEYS)}); found {_describe_keys(raw)}"
        )
    shape = infer_shape(state_dict, path)
    heads = default_num_heads(family, shape.embed_dim) if num_heads is None else num_heads
    if heads < 1 or shape.embed_dim % heads:
        raise InvalidInputError(f"{path}: width {shape.embed_dim} is not divisible by {heads} heads")
    vit = build_vit(shape, family, heads)
    weights = to_timm_state_dict(state_dict)
    expected = set(vit.state_dict())
    missing, unexpected = sorted(expected - set(weights)), sorted(set(weights) - expected)
    if missing or unexpected:
        raise UnknownCheckpointError(
            f"{path}: weights do not fit the {family} ViT built from their shapes "
            f"(missing {missing[:8]}, unexpected {unexpected[:8]})"
        )
    vit.load_state_dict(weights, strict=True)
    mean, std = (CLIP_MEAN, CLIP_STD) if family == "unicom" else (IMAGENET_MEAN, IMAGENET_STD)
    return FrozenViT(vit, family, position_rule(family, shape.num_registers), mean, std)


def checkpoint_stem(ckpt, arch: Optional[str] = None) -> str:
    """Name of a backbone for artifact folders: the file name without its extension
    (".pth.tar" counts as one), or "random_<arch>" without a checkpoint."""
    if ckpt is None:
        return f"random_{arch or DEFAULT_ARCH}"
    name = Path(os.fspath(ckpt)).name
    if name.endswith(".tar"):
        name = name[: -len(".tar")]
    return Path(name).stem
