"""Frozen ViT backbones built with timm from official self-supervised checkpoints.

`load_backbone` reads a checkpoint file as its authors publish it (DINO, DINOv2 with or
without registers, iBOT, MSN, MAE, MoCo v3, Unicom), tells the family from the container
and the keys, reads width, depth, patch size, MLP width, registers and layer scale from the
tensor shapes, builds the matching timm `VisionTransformer` and loads the weights with
`strict=True`. The returned module is frozen and maps normalised images to the patch
tokens of the last block after the final norm:

    img[B, 3, H, W] -> tokens[B, (H/p) * (W/p), D]   (row-major over the h x w grid)

Each family keeps its official position-embedding interpolation (`models.positions`), so
features at any input size divisible by `p` equal those of the authors' code. Reading the
files and telling the families apart lives in `models.checkpoints`.
"""
import functools
import math
import os
import warnings
from pathlib import Path

import timm
import torch
import torch.nn as nn
from timm.models.vision_transformer import VisionTransformer

from models.checkpoints import (
    FAMILIES,
    LAYOUTS,
    VIT_KEYS,
    UnknownCheckpointError,
    ViTShape,
    describe_keys,
    detect_family,
    extract_backbone,
    infer_shape,
    read_checkpoint,
)
from models.positions import (
    interpolate_position_embedding,
    position_rule,
    sincos_2d_position_embedding,
)
from utils.errors import InvalidInputError

__all__ = [
    "FAMILIES",
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "CLIP_MEAN",
    "CLIP_STD",
    "DEFAULT_ARCH",
    "RANDOM_SEED",
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

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
DEFAULT_ARCH = "vit_tiny_patch16_224"
RANDOM_SEED = 0


class RandomBackboneWarning(UserWarning):
    """The backbone has random weights: its features carry no semantics."""


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


def to_timm_state_dict(state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
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
        mean: tuple[float, float, float],
        std: tuple[float, float, float],
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


def _random_backbone(arch: str, num_heads: int | None, seed: int) -> FrozenViT:
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
    family: str | None = None,
    arch: str | None = None,
    num_heads: int | None = None,
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
                f"found {describe_keys(raw)}"
            )
    state_dict = extract_backbone(raw, family)
    if state_dict is None:
        raise UnknownCheckpointError(
            f"{path}: not a {family} checkpoint (expected {LAYOUTS[family].description} "
            f"holding {', '.join(VIT_KEYS)}); found {describe_keys(raw)}"
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


def checkpoint_stem(ckpt, arch: str | None = None) -> str:
    """Name of a backbone for artifact folders: the file name without its extension
    (".pth.tar" counts as one), or "random_<arch>" without a checkpoint."""
    if ckpt is None:
        return f"random_{arch or DEFAULT_ARCH}"
    name = Path(os.fspath(ckpt)).name
    if name.endswith(".tar"):
        name = name[: -len(".tar")]
    return Path(name).stem
