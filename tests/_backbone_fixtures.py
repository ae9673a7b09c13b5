"""Tiny checkpoint files in the official container and key layout of each backbone family.

`make_fake_checkpoint` writes what the authors' code would save for a (tiny) ViT, with
random tensors scaled so that every part of the network (position table, CLS, registers,
layer scale) visibly changes the output tokens.
"""
import argparse
import math
from pathlib import Path
from typing import Dict

import torch

FAMILIES = ("dino", "dinov2", "ibot", "msn", "mae", "mocov3", "unicom")


def official_sincos_table(h: int, w: int, dim: int, temperature: float = 10000.0) -> torch.Tensor:
    """MoCo v3's `build_2d_sincos_position_embedding` for an h x w grid -> [1, h*w, dim]."""
    grid_w = torch.arange(w, dtype=torch.float32)
    grid_h = torch.arange(h, dtype=torch.float32)
    grid_w, grid_h = torch.meshgrid(grid_w, grid_h, indexing="ij")
    pos_dim = dim // 4
    omega = torch.arange(pos_dim, dtype=torch.float32) / pos_dim
    omega = 1.0 / (temperature ** omega)
    out_w = torch.einsum("m,d->md", [grid_w.flatten(), omega])
    out_h = torch.einsum("m,d->md", [grid_h.flatten(), omega])
    return torch.cat(
        [torch.sin(out_w), torch.cos(out_w), torch.sin(out_h), torch.cos(out_h)], dim=1
    )[None, :, :]


def _linear(gen, prefix, fan_out, fan_in, bias=True):
    tensors = {f"{prefix}.weight": torch.randn(fan_out, fan_in, generator=gen) / math.sqrt(fan_in)}
    if bias:
        tensors[f"{prefix}.bias"] = 0.1 * torch.randn(fan_out, generator=gen)
    return tensors


def _layer_norm(gen, prefix, dim):
    return {
        f"{prefix}.weight": 1.0 + 0.1 * torch.randn(dim, generator=gen),
        f"{prefix}.bias": 0.1 * torch.randn(dim, generator=gen),
    }


def _batch_norm(gen, prefix, dim):
    return {
        f"{prefix}.weight": 1.0 + 0.1 * torch.randn(dim, generator=gen),
        f"{prefix}.bias": 0.1 * torch.randn(dim, generator=gen),
        f"{prefix}.running_mean": 0.1 * torch.randn(dim, generator=gen),
        f"{prefix}.running_var": 1.0 + 0.1 * torch.rand(dim, generator=gen),
        f"{prefix}.num_batches_tracked": torch.tensor(100),
    }


def vit_tensors(
    gen: torch.Generator,
    embed_dim: int,
    depth: int,
    patch_size: int,
    grid: int,
    class_token: bool = True,
    qkv_bias: bool = True,
    layer_scale: bool = False,
) -> Dict[str, torch.Tensor]:
    """Backbone tensors under the DINO/timm key names (no container, no prefix)."""
    d = embed_dim
    tensors = {}
    if class_token:
        tensors["cls_token"] = 0.5 * torch.randn(1, 1, d, generator=gen)
    tensors["pos_embed"] = 0.5 * torch.randn(1, grid * grid + int(class_token), d, generator=gen)
    fan_in = 3 * patch_size * patch_size
    tensors["patch_embed.proj.weight"] = (
        torch.randn(d, 3, patch_size, patch_size, generator=gen) / math.sqrt(fan_in)
    )
    tensors["patch_embed.proj.bias"] = 0.1 * torch.randn(d, generator=gen)
    for i in range(depth):
        block = f"blocks.{i}"
        tensors.update(_layer_norm(gen, f"{block}.norm1", d))
        tensors.update(_linear(gen, f"{block}.attn.qkv", 3 * d, d, bias=qkv_bias))
        tensors.update(_linear(gen, f"{block}.attn.proj", d, d))
        tensors.update(_layer_norm(gen, f"{block}.norm2", d))
        tensors.update(_linear(gen, f"{block}.mlp.fc1", 4 * d, d))
        tensors.update(_linear(gen, f"{block}.mlp.fc2", d, 4 * d))
        if layer_scale:
            tensors[f"{block}.ls1.gamma"] = 0.5 + 0.2 * torch.randn(d, generator=gen)
            tensors[f"{block}.ls2.gamma"] = 0.5 + 0.2 * torch.randn(d, generator=gen)
    tensors.update(_layer_norm(gen, "norm", d))
    return tensors


def _prefixed(prefix: str, tensors: Dict[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
    return {prefix + key: value for key, value in tensors.items()}


def make_checkpoint_object(
    family: str,
    embed_dim: int = 48,
    depth: int = 2,
    patch_size: int = 8,
    img_size: int = 32,
    num_registers: int = 0,
    seed: int = 0,
) -> object:
    """The object the family's official code saves, for a tiny ViT.

    dino: plain dict. dinov2: plain dict with mask_token, layer scale and register_tokens
    (if num_registers). ibot: {"state_dict": ...}. mae: like MAE's main_pretrain output,
    {"model": encoder + decoder + mask_token, "epoch", "args" (an argparse Namespace, so
    the weights-only unpickler refuses it)}. msn: {"encoder" (online copy), "target_encoder"
    ("module." prefix, projector "module.fc.*"), "prototypes", ...}. mocov3: {"state_dict":
    "module.base_encoder.*" (with the "head.*" projector), "module.momentum_encoder.*",
    "module.predictor.*", ...} with MoCo v3's fixed sin-cos position table. unicom: plain
    dict of fp16 tensors, no CLS, no qkv bias, "feature.*" head with BatchNorm buffers.
    """
    if family not in FAMILIES:
        raise ValueError(f"unknown family {family!r}")
    gen = torch.Generator().manual_seed(seed)
    grid = img_size // patch_size
    d = embed_dim

    def backbone(**kwargs):
        return vit_tensors(gen, d, depth, patch_size, grid, **kwargs)

    if family == "dino":
        return backbone()
    if family == "dinov2":
        tensors = backbone(layer_scale=True)
        tensors["mask_token"] = torch.zeros(1, d)
        if num_registers:
            tensors["register_tokens"] = torch.randn(1, num_registers, d, generator=gen)
        return tensors
    if family == "ibot":
        return {"state_dict": backbone()}
    if family == "mae":
        model = backbone()
        model["mask_token"] = 0.02 * torch.randn(1, 1, d, generator=gen)
        model.update(_linear(gen, "decoder_embed", 32, d))
        model["decoder_pos_embed"] = torch.randn(1, grid * grid + 1, 32, generator=gen)
        model.update(_layer_norm(gen, "decoder_norm", 32))
        model.update(_linear(gen, "decoder_pred", patch_size * patch_size * 3, 32))
        return {"model": model, "epoch": 799, "args": argparse.Namespace(model="mae_vit_tiny")}
    if family == "msn":
        def encoder():
            tensors = backbone()
            tensors.update(_linear(gen, "fc.fc1", 64, d))
            tensors.update(_batch_norm(gen, "fc.bn1", 64))
            tensors.update(_linear(gen, "fc.fc2", 32, 64))
            return _prefixed("module.", tensors)

        return {
            "encoder": encoder(),
            "target_encoder": encoder(),
            "prototypes": torch.randn(10, 32, generator=gen),
            "epoch": 300,
            "loss": 1.5,
            "batch_size": 8,
            "world_size": 1,
            "lr": 0.001,
        }
    if family == "mocov3":
        def encoder():
            tensors = backbone()
            tensors["pos_embed"] = torch.cat(
                [torch.zeros(1, 1, d), official_sincos_table(grid, grid, d)], dim=1
            )
            tensors.update(_linear(gen, "head.0", 64, d, bias=False))
            tensors.update(_batch_norm(gen, "head.1", 64))
            tensors.update(_linear(gen, "head.3", 32, 64, bias=False))
            return tensors

        state_dict = _prefixed("module.base_encoder.", encoder())
        state_dict.update(_prefixed("module.momentum_encoder.", encoder()))
        state_dict.update(_linear(gen, "module.predictor.0", 64, 32, bias=False))
        return {
            "epoch": 300,
            "arch": "vit_small",
            "state_dict": state_dict,
            "optimizer": {"state": {}, "param_groups": [{"lr": 0.001, "params": [0]}]},
            "scaler": {"scale": 65536.0},
        }
    tensors = backbone(class_token=False, qkv_bias=False)
    tensors.update(_linear(gen, "feature.0", d, d * grid * grid, bias=False))
    tensors.update(_batch_norm(gen, "feature.1", d))
    tensors.update(_linear(gen, "feature.2", d, d, bias=False))
    tensors.update(_batch_norm(gen, "feature.3", d))
    return {
        key: value.half() if value.is_floating_point() else value
        for key, value in tensors.items()
    }


def make_fake_checkpoint(path, family: str, **sizes) -> Path:
    """Write a tiny checkpoint of `family` in its official layout to `path`; returns it.

    sizes: keyword arguments of `make_checkpoint_object` (embed_dim, depth, ...).
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(make_checkpoint_object(family, **sizes), path)
    return path
