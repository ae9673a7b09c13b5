"""Checkpoint layouts of the backbone families: where each keeps its weights, telling the family from the
container and the keys (DINOv3's Hugging Face layout renamed to Meta's), and the ViT architecture that the tensor
shapes imply. Reading files lives in `models.files`, DINOv3's architecture in `models.dinov3`.
"""

import math
import re
from dataclasses import dataclass

import torch

from models.files import UnknownCheckpointError

FAMILIES = ("dino", "dinov2", "ibot", "msn", "mae", "mocov3", "unicom", "dinov3")


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
    "msn": _Layout("target_encoder", "module.", ("fc.",), 'a dict with "module.*" under "target_encoder"'),
    "mocov3": _Layout(
        "state_dict", "module.base_encoder.", ("head.",), 'a dict with "module.base_encoder.*" under "state_dict"'
    ),
}

VIT_KEYS = ("patch_embed.proj.weight", "pos_embed", "blocks.0.attn.qkv.weight", "norm.weight")


# DINOv3: Meta's plain state dict, or transformers' DINOv3ViTModel renamed to Meta's keys.

META_KEYS = (
    "cls_token",
    "storage_tokens",
    "patch_embed.proj.weight",
    "rope_embed.periods",
    "blocks.0.attn.qkv.weight",
    "norm.weight",
)
_HF_PATCH, _HF_QUERY = "embeddings.patch_embeddings.weight", "layer.0.attention.q_proj.weight"
HF_KEYS = ("embeddings.cls_token", "embeddings.register_tokens", _HF_PATCH, _HF_QUERY, "norm.weight")
_HF_TOP = {
    "embeddings.cls_token": "cls_token",
    "embeddings.mask_token": "mask_token",
    "embeddings.register_tokens": "storage_tokens",
    "embeddings.patch_embeddings.weight": "patch_embed.proj.weight",
    "embeddings.patch_embeddings.bias": "patch_embed.proj.bias",
    "rope_embeddings.periods": "rope_embed.periods",
}
_HF_COMMON = {"norm1": "norm1", "norm2": "norm2", "attention.o_proj": "attn.proj"}
_HF_BLOCK = dict(_HF_COMMON, **{"mlp.up_proj": "mlp.fc1", "mlp.down_proj": "mlp.fc2"})
_HF_GATED_BLOCK = dict(_HF_COMMON, **{"mlp.gate_proj": "mlp.w1", "mlp.up_proj": "mlp.w2", "mlp.down_proj": "mlp.w3"})
_HF_LAYER_SCALE = {"layer_scale1": "ls1.gamma", "layer_scale2": "ls2.gamma"}


def hf_to_meta(hf: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """transformers' DINOv3ViTModel names to Meta's; q, k, v are fused into `attn.qkv` (a missing bias
    is zero, as transformers' key projection has none). Keys it does not know keep their names."""
    meta, attention = {}, {}
    gated = {match.group(1) for key in hf if (match := re.match(r"layer\.(\d+)\.mlp\.gate_proj\.", key))}
    for key, value in hf.items():
        match = re.fullmatch(r"layer\.(\d+)\.(.+)\.(weight|bias|lambda1)", key)
        index, name, kind = match.groups() if match else (None, None, None)
        block = _HF_GATED_BLOCK if index in gated else _HF_BLOCK
        if key in _HF_TOP:
            meta[_HF_TOP[key]] = value
        elif match and kind == "lambda1" and name in _HF_LAYER_SCALE:
            meta[f"blocks.{index}.{_HF_LAYER_SCALE[name]}"] = value
        elif match and kind != "lambda1" and name in block:
            meta[f"blocks.{index}.{block[name]}.{kind}"] = value
        elif match and kind != "lambda1" and re.fullmatch(r"attention\.[qkv]_proj", name):
            attention.setdefault((index, kind), {})[name[len("attention.")]] = value
        else:
            meta[key] = value
    for (index, kind), parts in attention.items():
        if (kind == "weight" and len(parts) < 3) or len({tuple(v.shape) for v in parts.values()}) > 1:
            meta.update({f"layer.{index}.attention.{p}_proj.{kind}": v for p, v in parts.items()})
            continue
        like = next(iter(parts.values()))
        meta[f"blocks.{index}.attn.qkv.{kind}"] = torch.cat([parts.get(p, torch.zeros_like(like)) for p in "qkv"])
    return meta


def dinov3_state_dict(raw: object) -> dict[str, torch.Tensor] | None:
    """Meta-layout tensors of a DINOv3 checkpoint in Meta's or Hugging Face's layout, or None."""
    if not isinstance(raw, dict) or not all(isinstance(key, str) for key in raw):
        return None
    if all(key in raw for key in META_KEYS) and "pos_embed" not in raw:
        state_dict = dict(raw)
    else:
        # the key prefix of a transformers DINOv3ViTModel state dict: "" or e.g. "dinov3_vit."
        prefixes = (key[: -len(_HF_PATCH)] for key in raw if key.endswith(_HF_PATCH))
        prefix = next((prefix for prefix in prefixes if all(prefix + name in raw for name in HF_KEYS)), None)
        if prefix is None:
            return None
        state_dict = hf_to_meta({key[len(prefix) :]: v for key, v in raw.items() if key.startswith(prefix)})
    return state_dict if all(torch.is_tensor(v) for v in state_dict.values()) else None


def dinov3_missing_keys(raw: object) -> list[str]:
    """The keys a DINOv3 checkpoint needs that `raw` lacks, where `raw` holds keys only DINOv3 has
    (`storage_tokens`, `rope_embed.periods`, transformers' `layer.0.attention.q_proj.weight`); else []."""
    if not isinstance(raw, dict):
        return []
    if any(key in raw for key in ("storage_tokens", "rope_embed.periods")):
        return [key for key in META_KEYS if key not in raw]
    prefix = next((key[: -len(_HF_QUERY)] for key in raw if isinstance(key, str) and key.endswith(_HF_QUERY)), None)
    return [] if prefix is None else [prefix + name for name in HF_KEYS if prefix + name not in raw]


def extract_backbone(raw: object, family: str) -> dict[str, torch.Tensor] | None:
    """The family's backbone state dict from a loaded file, or None if it does not fit (DINOv3 in Meta's names)."""
    if family == "dinov3":
        return dinov3_state_dict(raw)
    layout = LAYOUTS[family]
    inner = raw.get(layout.container) if layout.container is not None and isinstance(raw, dict) else raw
    if not isinstance(inner, dict):
        return None
    start = len(layout.prefix)
    state_dict = {
        key[start:]: value
        for key, value in inner.items()
        if isinstance(key, str) and key.startswith(layout.prefix) and not key[start:].startswith(layout.drop)
    }
    if not all(key in state_dict for key in VIT_KEYS) or not all(torch.is_tensor(v) for v in state_dict.values()):
        return None
    return state_dict


def detect_family(raw: object) -> str | None:
    """Family of a loaded checkpoint from its container and keys, or None."""
    if not isinstance(raw, dict):
        return None
    if dinov3_state_dict(raw) is not None:
        return "dinov3"
    for family in ("msn", "mocov3", "ibot", "mae"):
        if extract_backbone(raw, family) is not None:
            return family
    plain = extract_backbone(raw, "dino")  # DINO, DINOv2 and Unicom share the plain container
    if plain is None:
        return None
    if "cls_token" not in plain:
        return "unicom"
    dinov2 = any(key in plain for key in ("mask_token", "register_tokens", "blocks.0.ls1.gamma"))
    return "dinov2" if dinov2 else "dino"


def describe_keys(raw: object, limit: int = 8) -> str:
    """A short list of the top-level keys and those of the first nested dict."""
    if not isinstance(raw, dict):
        return f"a {type(raw).__name__}, not a dict"

    def head(keys):
        keys = [str(key) for key in keys]
        more = f", ... ({len(keys)} keys)" if len(keys) > limit else ""
        return "[" + ", ".join(keys[:limit]) + more + "]"

    nested = next(((key, value) for key, value in raw.items() if isinstance(value, dict)), None)
    under = "" if nested is None else f"; keys under {nested[0]!r}: {head(nested[1].keys())}"
    return f"top-level keys {head(raw.keys())}{under}"


def timm_state_dict(raw: object) -> dict[str, torch.Tensor] | None:
    """A timm state dict: the file itself or its "state_dict" / "model", without a "module." prefix
    or the classifier ("head.*"); None if the file holds no dict of tensors there."""
    if not isinstance(raw, dict):
        return None
    dicts = (inner for inner in (raw, raw.get("state_dict"), raw.get("model")) if isinstance(inner, dict) and inner)
    for inner in dicts:
        if all(isinstance(k, str) and torch.is_tensor(v) for k, v in inner.items()):
            if all(key.startswith("module.") for key in inner):
                inner = {key[len("module.") :]: value for key, value in inner.items()}
            return {key: value for key, value in inner.items() if not key.startswith("head.")}
    return None


def _key_order(key: str) -> tuple:
    """Top-level keys first, then blocks in numerical order."""
    parts = tuple((0, int(part), "") if part.isdigit() else (1, 0, part) for part in key.split("."))
    return key.startswith("blocks."), parts


def state_dict_mismatch(given: dict[str, torch.Tensor], expected: dict[str, tuple[int, ...]]) -> str:
    """What keeps `given` from loading strictly into tensors of the `expected` shapes; "" if nothing."""
    missing = sorted(set(expected) - set(given), key=_key_order)
    unexpected = sorted(set(given) - set(expected), key=_key_order)
    if missing or unexpected:
        return f"missing {missing[:8]}, unexpected {unexpected[:8]}"
    for key, size in expected.items():
        if tuple(given[key].shape) != tuple(size):
            return f"{key} has shape {list(given[key].shape)}, expected {list(size)}"
    return ""


def shape_error(path: str, key: str, tensor: torch.Tensor, expected: str) -> UnknownCheckpointError:
    """The error for a tensor `key` of the checkpoint whose shape is not the `expected` one."""
    return UnknownCheckpointError(f"{path}: {key} has shape {list(tensor.shape)}, expected {expected}")


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
        raise shape_error(path, "patch_embed.proj.weight", proj, "[D, 3, p, p]")
    embed_dim, patch_size = proj.shape[0], proj.shape[3]
    depth = len({key.split(".")[1] for key in state_dict if key.startswith("blocks.")})
    if "blocks.0.mlp.fc1.weight" not in state_dict:
        blocks0 = sorted(key for key in state_dict if key.startswith("blocks.0."))
        raise UnknownCheckpointError(f"{path}: unsupported block layout (no mlp.fc1); block 0 holds {blocks0}")
    class_token = "cls_token" in state_dict
    num_patches = state_dict["pos_embed"].shape[1] - int(class_token)
    grid_size = math.isqrt(num_patches)
    if grid_size * grid_size != num_patches:
        raise UnknownCheckpointError(f"{path}: pos_embed holds {num_patches} patch positions, not a square grid")
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
