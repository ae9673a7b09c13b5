"""Frozen ViT backbones built with timm from official self-supervised checkpoints.

`load_backbone` reads a checkpoint as its authors publish it (DINO, DINOv2 with or without registers, iBOT, MSN,
MAE, MoCo v3, Unicom, DINOv3 in Meta's or Hugging Face's layout; `.pth` or `.safetensors`), tells the family and
the architecture from the keys and tensor shapes (`models.checkpoints`) and loads the weights strictly into the
matching timm model; a timm state dict of any ViT loads by its timm name (`arch`). The frozen module returns the
final-norm patch tokens of normalised images:

    img[B, 3, H, W] -> tokens[B, (H/p) * (W/p), D]   (row-major over the h x w grid)

Each family keeps its official position handling (`models.positions`; RoPE in `models.dinov3`), so features at any
input size divisible by `p` equal those of the authors' code.
"""

import functools
import math
import os
import warnings
from pathlib import Path

import timm
import torch
import torch.nn as nn
from timm.models.eva import Eva
from timm.models.vision_transformer import VisionTransformer

from models.checkpoints import (
    FAMILIES,
    LAYOUTS,
    META_KEYS,
    VIT_KEYS,
    ViTShape,
    describe_keys,
    detect_family,
    dinov3_missing_keys,
    extract_backbone,
    infer_shape,
    state_dict_mismatch,
    timm_state_dict,
)
from models.dinov3 import dinov3_num_heads, load_dinov3
from models.files import HF_WEIGHTS, UnknownCheckpointError, read_checkpoint, read_hf_config
from models.normalisation import (
    CLIP_MEAN,
    CLIP_STD,
    IMAGENET_MEAN,
    IMAGENET_STD,
    NormalisationHintWarning,
    Triple,
    normalisation_hint,
    resolve_normalisation,
)
from models.positions import interpolate_position_embedding, position_rule
from utils.errors import InvalidInputError

DEFAULT_ARCH = "vit_tiny_patch16_224"
RANDOM_SEED = 0
# Position rules whose forward is timm's own: RoPE (DINOv3) and a timm architecture loaded by name.
TIMM_FORWARD_RULES = ("rope", "timm")


class RandomBackboneWarning(UserWarning):
    """The backbone has random weights: its features carry no semantics."""


def default_num_heads(family: str, embed_dim: int) -> int:
    """Heads of the official model, which the weights do not show: 64 channels per head (DINOv3 7B: 128);
    MoCo v3 and Unicom: 12 below width 1024 (their ViT-S and ViT-B alike), 16 from 1024."""
    if family == "dinov3":
        return dinov3_num_heads(embed_dim)
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
    # The checkpoints give the CLS token a position but not the registers (DINOv2), or have no CLS slot (Unicom);
    # timm's table would have one slot per prefix token, so the table takes the checkpoint's shape.
    num_positions = shape.grid_size**2 + int(shape.class_token)
    vit.pos_embed = nn.Parameter(torch.zeros(1, num_positions, shape.embed_dim))
    return vit


def to_timm_state_dict(state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Backbone keys to timm names (only DINOv2's registers differ), tensors in fp32."""
    renamed = {("reg_token" if key == "register_tokens" else key): value for key, value in state_dict.items()}
    return {key: value.float() if value.is_floating_point() else value for key, value in renamed.items()}


class FrozenViT(nn.Module):
    """A frozen timm ViT that returns the final-norm patch tokens of normalised images.

    Attributes: `patch_size`, `embed_dim`, `num_heads`, `num_registers`, `grid_size` (side of the position
    table's patch grid; None with RoPE), `family`, `position_rule`, `arch` (the timm name of a model loaded
    by name), `mean` / `std` (the input normalisation it expects).
    """

    def __init__(
        self, vit: nn.Module, family: str, position_rule: str, mean: Triple, std: Triple, arch: str | None = None
    ):
        super().__init__()
        self.vit, self.family, self.position_rule, self.arch = vit, family, position_rule, arch
        self.mean, self.std = tuple(mean), tuple(std)
        self.patch_size = int(vit.patch_embed.patch_size[0])
        self.embed_dim = int(vit.embed_dim)
        self.num_heads = int(vit.blocks[0].attn.num_heads)
        self.has_class_token = getattr(vit, "cls_token", None) is not None
        self.num_prefix_tokens = int(vit.num_prefix_tokens)
        self.num_registers = self.num_prefix_tokens - int(self.has_class_token)
        if position_rule not in TIMM_FORWARD_RULES:
            self.grid_size = math.isqrt(vit.pos_embed.shape[1] - int(self.has_class_token))
        else:
            self.grid_size = None if vit.pos_embed is None else int(vit.patch_embed.grid_size[0])
        for param in self.parameters():
            param.requires_grad_(False)
        super().train(False)

    def train(self, mode: bool = True) -> "FrozenViT":
        """Always eval mode: a parent's `.train()` must not enable dropout here."""
        return super().train(False)

    def forward(self, img: torch.Tensor) -> torch.Tensor:
        """img: [B, 3, H, W] normalised -> tokens: [B, (H/p)*(W/p), D], row-major."""
        batch, _, height, width = img.shape
        p = self.patch_size
        if height % p or width % p:
            raise ValueError(
                f"input size {height}x{width} is not a multiple of the patch size {p} of this {self.family} backbone"
            )
        if self.position_rule in TIMM_FORWARD_RULES:
            return self.vit.forward_features(img)[:, self.num_prefix_tokens :]
        h, w = height // p, width // p
        x = self.vit.patch_embed(img).reshape(batch, h * w, self.embed_dim)
        table = self.vit.pos_embed[:, int(self.has_class_token) :]  # the patch part: [1, M*M, D]
        x = x + interpolate_position_embedding(table, h, w, self.position_rule)
        prefix = [self.vit.cls_token + self.vit.pos_embed[:, :1]] if self.has_class_token else []
        prefix += [self.vit.reg_token] if self.num_registers else []
        x = torch.cat([token.expand(batch, -1, -1) for token in prefix] + [x], dim=1)
        x = self.vit.norm(self.vit.blocks(x))
        return x[:, self.num_prefix_tokens :]


def _create_timm(arch: str, num_heads: int | None, seed: int | None = None) -> nn.Module:
    """timm.create_model without pretrained weights or classifier, for any input size, initialised from
    `seed` if given; the global RNG is left untouched."""
    overrides = {} if num_heads is None else {"num_heads": num_heads}
    with torch.random.fork_rng(devices=[]):
        if seed is not None:
            torch.manual_seed(seed)
        try:
            return timm.create_model(
                arch, pretrained=False, num_classes=0, global_pool="", dynamic_img_size=True, **overrides
            )
        except RuntimeError as exc:
            raise InvalidInputError(f"unknown timm architecture {arch!r} ({exc})") from exc
        except TypeError as exc:  # models without the ViT arguments (dynamic_img_size, num_heads)
            raise InvalidInputError(f"{arch!r} is not a timm ViT ({exc})") from exc


def _random_backbone(arch: str, num_heads: int | None, seed: int) -> FrozenViT:
    """A timm ViT with seeded random weights."""
    vit = _create_timm(arch, num_heads, seed)
    plain = (
        isinstance(vit, VisionTransformer) and vit.has_class_token and not vit.num_reg_tokens and not vit.no_embed_class
    )
    if not plain and not isinstance(vit, Eva):
        raise InvalidInputError(
            f"{arch!r} is neither a plain timm VisionTransformer with a CLS token "
            "(e.g. vit_tiny_patch16_224, vit_small_patch16_224) nor an Eva (e.g. vit_small_patch16_dinov3)"
        )
    warnings.warn(
        f"no backbone checkpoint given: {arch} has random weights (seed {seed}), "
        "its features are meaningless beyond smoke tests",
        RandomBackboneWarning,
        stacklevel=3,
    )
    return FrozenViT(vit, "random", "offset" if plain else "timm", IMAGENET_MEAN, IMAGENET_STD, arch=arch)


def _fit_timm(raw: object, arch: str, num_heads: int | None) -> tuple[FrozenViT | None, str]:
    """The timm model `arch` holding the file's weights (strictly), or None and why it does not fit."""
    state_dict = timm_state_dict(raw)
    if state_dict is None:
        return None, "not a state dict of tensors"
    vit = _create_timm(arch, num_heads)
    if not isinstance(vit, (VisionTransformer, Eva)):
        raise InvalidInputError(f"{arch!r} is not a timm ViT (VisionTransformer or Eva)")
    mismatch = state_dict_mismatch(state_dict, {key: value.shape for key, value in vit.state_dict().items()})
    if mismatch:
        return None, mismatch
    vit.load_state_dict(to_timm_state_dict(state_dict), strict=True)
    config = getattr(vit, "pretrained_cfg", None) or {}
    mean, std = tuple(config.get("mean", IMAGENET_MEAN)), tuple(config.get("std", IMAGENET_STD))
    return FrozenViT(vit.eval(), "timm", "timm", mean, std, arch=arch), ""


def _family_backbone(raw: object, path: str, family: str, num_heads: int | None) -> FrozenViT:
    """The `family` backbone of a loaded file, or UnknownCheckpointError if it does not fit."""
    state_dict = extract_backbone(raw, family)
    if state_dict is None:
        meta = f"Meta's plain state dict holding {', '.join(META_KEYS)}, or a transformers DINOv3ViTModel state dict"
        expected = meta if family == "dinov3" else f"{LAYOUTS[family].description} holding {', '.join(VIT_KEYS)}"
        raise UnknownCheckpointError(
            f"{path}: not a {family} checkpoint (expected {expected}); found {describe_keys(raw)}"
        )
    if family == "dinov3":
        vit = load_dinov3(state_dict, path, num_heads, read_hf_config(path))
        return FrozenViT(vit, family, "rope", IMAGENET_MEAN, IMAGENET_STD)
    shape = infer_shape(state_dict, path)
    heads = default_num_heads(family, shape.embed_dim) if num_heads is None else num_heads
    if heads < 1 or shape.embed_dim % heads:
        raise InvalidInputError(f"{path}: width {shape.embed_dim} is not divisible by {heads} heads")
    vit = build_vit(shape, family, heads)
    weights = to_timm_state_dict(state_dict)
    mismatch = state_dict_mismatch(weights, {key: value.shape for key, value in vit.state_dict().items()})
    if mismatch:
        raise UnknownCheckpointError(
            f"{path}: weights do not fit the {family} ViT built from their shapes ({mismatch})"
        )
    vit.load_state_dict(weights, strict=True)
    mean, std = (CLIP_MEAN, CLIP_STD) if family == "unicom" else (IMAGENET_MEAN, IMAGENET_STD)
    return FrozenViT(vit, family, position_rule(family, shape.num_registers), mean, std)


def _checkpoint_backbone(path: str, family: str | None, arch: str | None, num_heads: int | None) -> FrozenViT:
    """The official family first (given, or told by the keys), then the timm architecture `arch`."""
    families = ", ".join(FAMILIES)
    if family is not None and family not in FAMILIES + ("timm",):
        raise InvalidInputError(f"unknown backbone family {family!r}; expected one of {families} (or timm, with arch)")
    if family == "timm" and arch is None:
        raise InvalidInputError("family timm loads a timm state dict by its architecture name: give arch")
    raw = read_checkpoint(path)
    detected = family or detect_family(raw)
    if detected in (None, "timm"):
        missing, found = dinov3_missing_keys(raw), describe_keys(raw)
        if missing and family is None:
            raise UnknownCheckpointError(f"{path}: a DINOv3 checkpoint, but it lacks {missing}; found {found}")
        if arch is None:
            raise UnknownCheckpointError(f"{path}: matches no backbone family ({families}); found {found}")
        backbone, reason = _fit_timm(raw, arch, num_heads)
        if backbone is None:
            what = f"fits neither the timm architecture {arch!r} ({reason}) nor any backbone family ({families})"
            if family:
                what = f"not a state dict of the timm architecture {arch!r} ({reason})"
            raise UnknownCheckpointError(f"{path}: {what}; found {found}")
        return backbone
    try:
        return _family_backbone(raw, path, detected, num_heads)
    except UnknownCheckpointError:
        if family is not None or arch is None:
            raise
        backbone, _ = _fit_timm(raw, arch, num_heads)
        if backbone is None:
            raise
        return backbone


def load_backbone(
    ckpt,
    family: str | None = None,
    arch: str | None = None,
    num_heads: int | None = None,
    *,
    norm=None,
    seed: int = RANDOM_SEED,
) -> FrozenViT:
    """Frozen, eval-mode ViT from an official checkpoint file or a timm state dict.

    ckpt: a weights file (`.pth`, `.safetensors`, ...) or Hugging Face model folder, or None for random weights
      of the timm architecture `arch` (default `vit_tiny_patch16_224`, seeded by `seed`; RandomBackboneWarning).
    family: one of FAMILIES, None to detect it, or "timm" to load a state dict of the timm model `arch`.
    arch: a timm model name; with a checkpoint, used when the file matches no family.
    num_heads: overrides the family's head count (SPEC section 0: the reference ran DINO ViT-S with 12 heads).
    norm: None for the weights' own normalisation (ImageNet; CLIP for Unicom; timm's for a model by name),
      "imagenet", "sat", "clip" or six numbers (mean, std); a satellite-named (SAT-493M) checkpoint without
      `norm` warns with NormalisationHintWarning.
    Returns a FrozenViT: forward(img[B, 3, H, W]) -> tokens[B, (H/p)*(W/p), D].
    """
    if ckpt is None:
        backbone = _random_backbone(arch or DEFAULT_ARCH, num_heads, seed)
    else:
        backbone = _checkpoint_backbone(os.fspath(ckpt), family, arch, num_heads)
    backbone.mean, backbone.std = resolve_normalisation(norm, (backbone.mean, backbone.std))
    hint = normalisation_hint(ckpt, norm, backbone.mean)
    if hint is not None:
        warnings.warn(hint, NormalisationHintWarning, stacklevel=2)
    return backbone


def checkpoint_stem(ckpt, arch: str | None = None) -> str:
    """Name of a backbone for artifact folders: the file name without its extension (".pth.tar" counts as
    one), the folder's name for a Hugging Face folder or its model.safetensors, or "random_<arch>"."""
    if ckpt is None:
        return f"random_{arch or DEFAULT_ARCH}"
    path = Path(os.path.abspath(os.fspath(ckpt)))
    if os.path.isdir(path):
        return path.name
    return path.parent.name if path.name == HF_WEIGHTS else Path(path.name.removesuffix(".tar")).stem
