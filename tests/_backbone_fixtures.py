"""Tiny checkpoint files in the official container and key layout of each backbone family.

`make_fake_checkpoint` writes what the authors' code would save for a (tiny) ViT, with
random tensors scaled so that every part of the network (position table, CLS, registers,
layer scale) visibly changes the output tokens. The DINOv3 helpers build tiny models with
timm's own DINOv3 definitions and write them in Meta's and in Hugging Face's layout.
"""

import argparse
import json
import math
import re
from pathlib import Path

import torch

FAMILIES = ("dino", "dinov2", "ibot", "msn", "mae", "mocov3", "unicom")


def official_sincos_table(h: int, w: int, dim: int, temperature: float = 10000.0) -> torch.Tensor:
    """MoCo v3's `build_2d_sincos_position_embedding` for an h x w grid -> [1, h*w, dim]."""
    grid_w = torch.arange(w, dtype=torch.float32)
    grid_h = torch.arange(h, dtype=torch.float32)
    grid_w, grid_h = torch.meshgrid(grid_w, grid_h, indexing="ij")
    pos_dim = dim // 4
    omega = torch.arange(pos_dim, dtype=torch.float32) / pos_dim
    omega = 1.0 / (temperature**omega)
    out_w = torch.einsum("m,d->md", [grid_w.flatten(), omega])
    out_h = torch.einsum("m,d->md", [grid_h.flatten(), omega])
    return torch.cat([torch.sin(out_w), torch.cos(out_w), torch.sin(out_h), torch.cos(out_h)], dim=1)[None, :, :]


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
) -> dict[str, torch.Tensor]:
    """Backbone tensors under the DINO/timm key names (no container, no prefix)."""
    d = embed_dim
    tensors = {}
    if class_token:
        tensors["cls_token"] = 0.5 * torch.randn(1, 1, d, generator=gen)
    tensors["pos_embed"] = 0.5 * torch.randn(1, grid * grid + int(class_token), d, generator=gen)
    fan_in = 3 * patch_size * patch_size
    tensors["patch_embed.proj.weight"] = torch.randn(d, 3, patch_size, patch_size, generator=gen) / math.sqrt(fan_in)
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


def _prefixed(prefix: str, tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
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
            tensors["pos_embed"] = torch.cat([torch.zeros(1, 1, d), official_sincos_table(grid, grid, d)], dim=1)
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
    return {key: value.half() if value.is_floating_point() else value for key, value in tensors.items()}


def make_fake_checkpoint(path, family: str, **sizes) -> Path:
    """Write a tiny checkpoint of `family` in its official layout to `path`; returns it.

    sizes: keyword arguments of `make_checkpoint_object` (embed_dim, depth, ...).
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(make_checkpoint_object(family, **sizes), path)
    return path


# DINOv3: tiny models built with timm's own DINOv3 definitions, written in Meta's and Hugging Face's layouts.


def make_dinov3_timm(
    arch: str = "vit_small_patch16_dinov3",
    embed_dim: int = 128,
    num_heads: int = 2,
    depth: int = 2,
    seed: int = 0,
    **overrides,
):
    """A tiny timm DINOv3 (Eva, 4 registers) from one of timm's DINOv3 definitions (e.g.
    vit_small_plus_patch16_dinov3 for SwiGLU), with random weights that all visibly matter."""
    import timm

    with torch.random.fork_rng(devices=[]):
        model = timm.create_model(
            arch,
            pretrained=False,
            num_classes=0,
            global_pool="",
            embed_dim=embed_dim,
            num_heads=num_heads,
            depth=depth,
            **overrides,
        )
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            noise = torch.randn(param.shape, generator=gen)
            if name.endswith(("gamma_1", "gamma_2")):
                param.copy_(0.5 + 0.2 * noise)
            elif "norm" in name and name.endswith("weight"):
                param.copy_(1.0 + 0.1 * noise)
            elif name.endswith("weight"):
                param.copy_(noise / math.sqrt(param[0].numel()))
            else:
                param.copy_((0.5 if "token" in name else 0.1) * noise)
    return model.eval()


def timm_dinov3_to_meta(model, masked_key_bias: bool = True, seed: int = 1) -> dict[str, torch.Tensor]:
    """Meta's key layout of a timm DINOv3: storage_tokens, rope_embed.periods, attn.qkv.bias with a
    random key part that bias_mask zeroes (as Meta's LinearKMaskedBias does), mask_token, w1/w2/w3."""
    gen = torch.Generator().manual_seed(seed)
    d = model.embed_dim
    swiglu = hasattr(model.blocks[0].mlp, "fc1_g")
    out = {"mask_token": torch.zeros(1, d), "rope_embed.periods": model.rope.periods.clone()}
    for key, value in model.state_dict().items():
        match = re.match(r"blocks\.(\d+)\.attn\.([qv])_bias$", key)
        if match:
            if match.group(2) == "q":
                key_bias = torch.randn(d, generator=gen)
                block = f"blocks.{match.group(1)}.attn.qkv"
                v_bias = model.state_dict()[f"blocks.{match.group(1)}.attn.v_bias"]
                out[f"{block}.bias"] = torch.cat([value, key_bias, v_bias])
                if masked_key_bias:
                    out[f"{block}.bias_mask"] = torch.cat([torch.ones(d), torch.zeros(d), torch.ones(d)])
            continue
        key = key.replace("reg_token", "storage_tokens").replace("gamma_1", "ls1.gamma")
        key = key.replace("gamma_2", "ls2.gamma").replace("mlp.fc1_g.", "mlp.w1.").replace("mlp.fc1_x.", "mlp.w2.")
        if swiglu:
            key = key.replace("mlp.fc2.", "mlp.w3.")
        out[key] = value.clone()
    return out


def meta_dinov3_to_hf(meta: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """transformers' DINOv3ViTModel layout of Meta's tensors (q, k, v split; no key bias)."""
    d = meta["cls_token"].shape[-1]
    out = {
        "embeddings.cls_token": meta["cls_token"],
        "embeddings.mask_token": meta["mask_token"].reshape(1, 1, d),
        "embeddings.register_tokens": meta["storage_tokens"],
        "embeddings.patch_embeddings.weight": meta["patch_embed.proj.weight"],
        "embeddings.patch_embeddings.bias": meta["patch_embed.proj.bias"],
        "norm.weight": meta["norm.weight"],
        "norm.bias": meta["norm.bias"],
    }
    gated = "blocks.0.mlp.w1.weight" in meta
    mlp = {"w1": "gate_proj", "w2": "up_proj", "w3": "down_proj"} if gated else {"fc1": "up_proj", "fc2": "down_proj"}
    depth = len({key.split(".")[1] for key in meta if key.startswith("blocks.")})
    for i in range(depth):
        src, dst = f"blocks.{i}.", f"layer.{i}."
        for part in ("norm1", "norm2"):
            out[f"{dst}{part}.weight"], out[f"{dst}{part}.bias"] = (
                meta[f"{src}{part}.weight"],
                meta[f"{src}{part}.bias"],
            )
        for j, name in enumerate("qkv"):
            out[f"{dst}attention.{name}_proj.weight"] = meta[f"{src}attn.qkv.weight"][j * d : (j + 1) * d]
        if f"{src}attn.qkv.bias" in meta:
            out[f"{dst}attention.q_proj.bias"] = meta[f"{src}attn.qkv.bias"][:d]
            out[f"{dst}attention.v_proj.bias"] = meta[f"{src}attn.qkv.bias"][2 * d :]
        out[f"{dst}attention.o_proj.weight"] = meta[f"{src}attn.proj.weight"]
        out[f"{dst}attention.o_proj.bias"] = meta[f"{src}attn.proj.bias"]
        out[f"{dst}layer_scale1.lambda1"] = meta[f"{src}ls1.gamma"]
        out[f"{dst}layer_scale2.lambda1"] = meta[f"{src}ls2.gamma"]
        for ours, theirs in mlp.items():
            out[f"{dst}mlp.{theirs}.weight"] = meta[f"{src}mlp.{ours}.weight"]
            out[f"{dst}mlp.{theirs}.bias"] = meta[f"{src}mlp.{ours}.bias"]
    return {key: value.contiguous() for key, value in out.items()}


def hf_dinov3_config(meta: dict[str, torch.Tensor], num_heads: int) -> dict:
    """The config.json transformers writes beside the weights (the fields DINOv3ViTModel reads)."""
    gated = "blocks.0.mlp.w1.weight" in meta
    hidden = meta["blocks.0.mlp.w1.weight" if gated else "blocks.0.mlp.fc1.weight"].shape[0]
    qkv_bias = "blocks.0.attn.qkv.bias" in meta
    return {
        "architectures": ["DINOv3ViTModel"],
        "model_type": "dinov3_vit",
        "hidden_size": meta["cls_token"].shape[-1],
        "num_attention_heads": num_heads,
        "num_hidden_layers": len({key.split(".")[1] for key in meta if key.startswith("blocks.")}),
        "intermediate_size": hidden,
        "use_gated_mlp": gated,
        "hidden_act": "silu" if gated else "gelu",
        "layer_norm_eps": 1e-5,
        "rope_theta": 100.0,
        "num_register_tokens": meta["storage_tokens"].shape[1],
        "patch_size": meta["patch_embed.proj.weight"].shape[-1],
        "image_size": 224,
        "num_channels": 3,
        "query_bias": qkv_bias,
        "key_bias": False,
        "value_bias": qkv_bias,
        "proj_bias": True,
        "mlp_bias": True,
        "layerscale_value": 1.0,
        "pos_embed_rescale": 2.0,
    }


def save_hf_dinov3(folder, meta: dict[str, torch.Tensor], num_heads: int, config: bool = True) -> Path:
    """A Hugging Face model folder: model.safetensors (+ config.json); returns the folder."""
    from safetensors.torch import save_file

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    save_file(meta_dinov3_to_hf(meta), str(folder / "model.safetensors"))
    if config:
        (folder / "config.json").write_text(json.dumps(hf_dinov3_config(meta, num_heads), indent=2))
    return folder
