"""DINOv3 backbones (Meta, 2025): the sizes the tensors imply, and the timm model that computes Meta's features.

Meta publishes plain state dicts (`dinov3_vits16_pretrain_lvd1689m-08c60483.pth`, ...): `cls_token`,
`storage_tokens` (4 registers), `mask_token`, `patch_embed.proj.*`, `rope_embed.periods`, per block
`norm1`, `attn.qkv.{weight,bias,bias_mask}` (the mask zeroes the key bias), `attn.proj`, `ls1.gamma`,
`norm2`, `mlp.fc1/fc2` or the SwiGLU `mlp.w1/w2/w3`, `ls2.gamma`, then `norm`. Hugging Face publishes
the same weights for transformers' `DINOv3ViTModel` (`model.safetensors` + `config.json`), renamed
to Meta's layout by `models.checkpoints`. timm's `Eva` with `rope_type="dinov3"` computes Meta's forward: RoPE on
the patch tokens only (base 100, coordinates normalised per axis), no absolute position table, so any
input size that is a multiple of the patch works; LayerNorm eps 1e-5.
"""

import functools
from dataclasses import dataclass

import torch
from timm.layers import LayerNorm
from timm.models.eva import Eva
from timm.models.eva import checkpoint_filter_fn as eva_checkpoint_filter_fn

from models.checkpoints import shape_error, state_dict_mismatch
from models.files import UnknownCheckpointError
from utils.errors import InvalidInputError

# Not used for the patch tokens: the masked-modelling token, the norms of the CLS token and registers
# that some checkpoints keep apart (ViT-L SAT-493M and ViT-7B: `local_cls_norm`).
_UNUSED = ("mask_token", "cls_norm.", "local_cls_norm.")


@dataclass(frozen=True)
class DINOv3Shape:
    """What the tensors of a DINOv3 checkpoint tell about the architecture."""

    embed_dim: int
    depth: int
    patch_size: int
    num_registers: int
    mlp_hidden: int
    swiglu: bool  # SwiGLU FFN (w1, w2, w3) of the "plus" and 7B models, else a GELU MLP (fc1, fc2)
    qkv_bias: bool
    layer_scale: bool
    head_dim: int | None  # 4x the RoPE frequencies Meta's file stores; None where none are stored


def infer_dinov3_shape(state_dict: dict[str, torch.Tensor], path: str) -> DINOv3Shape:
    """Architecture of a Meta-layout DINOv3 state dict from its tensor shapes."""
    proj = state_dict["patch_embed.proj.weight"]
    if proj.ndim != 4 or proj.shape[2] != proj.shape[3]:
        raise shape_error(path, "patch_embed.proj.weight", proj, "[D, 3, p, p]")
    registers = state_dict["storage_tokens"]
    if registers.ndim != 3:
        raise shape_error(path, "storage_tokens", registers, "[1, registers, D]")
    swiglu = "blocks.0.mlp.w1.weight" in state_dict
    mlp_in = "blocks.0.mlp.w1.weight" if swiglu else "blocks.0.mlp.fc1.weight"
    if mlp_in not in state_dict:
        blocks0 = sorted(key for key in state_dict if key.startswith("blocks.0."))
        raise UnknownCheckpointError(
            f"{path}: unsupported DINOv3 block layout (neither mlp.fc1 nor mlp.w1); block 0 holds {blocks0}"
        )
    periods = state_dict.get("rope_embed.periods")
    if periods is not None and periods.ndim != 1:
        raise shape_error(path, "rope_embed.periods", periods, "[D_head / 4]")
    return DINOv3Shape(
        embed_dim=proj.shape[0],
        depth=len({key.split(".")[1] for key in state_dict if key.startswith("blocks.")}),
        patch_size=proj.shape[3],
        num_registers=registers.shape[1],
        mlp_hidden=state_dict[mlp_in].shape[0],
        swiglu=swiglu,
        qkv_bias="blocks.0.attn.qkv.bias" in state_dict,
        layer_scale="blocks.0.ls1.gamma" in state_dict,
        head_dim=None if periods is None else 4 * periods.shape[0],
    )


def dinov3_num_heads(embed_dim: int) -> int:
    """Heads of Meta's DINOv3 ViTs: 64 channels per head (S, S+, B, L, H+), 128 from width 4096 (7B: 32)."""
    return embed_dim // 128 if embed_dim >= 4096 else max(1, embed_dim // 64)


def _num_heads(shape: DINOv3Shape, num_heads: int | None, config: dict, path: str) -> int:
    """Meta's file fixes the head width through its RoPE periods; otherwise the argument, the
    transformers config, or Meta's rule, in that order."""
    width = shape.embed_dim
    if shape.head_dim is not None:
        if not shape.head_dim or width % shape.head_dim:
            raise UnknownCheckpointError(
                f"{path}: rope_embed.periods implies heads of {shape.head_dim} channels, "
                f"which do not divide width {width}"
            )
        heads = width // shape.head_dim
        if num_heads is not None and num_heads != heads:
            raise InvalidInputError(
                f"{path}: its RoPE periods fix {heads} heads of {shape.head_dim} channels; {num_heads} heads do not fit"
            )
        return heads
    heads = int(config.get("num_attention_heads") or dinov3_num_heads(width)) if num_heads is None else num_heads
    if heads < 1 or width % heads or (width // heads) % 4:
        raise InvalidInputError(
            f"{path}: width {width} is not divisible into {heads} heads of a multiple of 4 channels (RoPE)"
        )
    return heads


def expected_shapes(shape: DINOv3Shape) -> dict[str, tuple[int, ...]]:
    """Every backbone tensor of a Meta-layout file (except the unused ones) and its shape."""
    d, h = shape.embed_dim, shape.mlp_hidden
    shapes = {"cls_token": (1, 1, d), "storage_tokens": (1, shape.num_registers, d)}
    shapes["patch_embed.proj.weight"] = (d, 3, shape.patch_size, shape.patch_size)
    shapes.update(dict.fromkeys(["patch_embed.proj.bias", "norm.weight", "norm.bias"], (d,)))
    if shape.head_dim is not None:
        shapes["rope_embed.periods"] = (shape.head_dim // 4,)
    block = dict.fromkeys(["norm1.weight", "norm1.bias"], (d,))
    block.update({"attn.qkv.weight": (3 * d, d), "attn.proj.weight": (d, d), "attn.proj.bias": (d,)})
    block.update(dict.fromkeys(["norm2.weight", "norm2.bias"], (d,)))
    if shape.qkv_bias:
        block["attn.qkv.bias"] = (3 * d,)
    if shape.layer_scale:
        block.update({"ls1.gamma": (d,), "ls2.gamma": (d,)})
    mlp = {"w1": (h, d), "w2": (h, d), "w3": (d, h)} if shape.swiglu else {"fc1": (h, d), "fc2": (d, h)}
    for name, size in mlp.items():
        block.update({f"mlp.{name}.weight": size, f"mlp.{name}.bias": size[:1]})
    for i in range(shape.depth):
        shapes.update({f"blocks.{i}.{key}": size for key, size in block.items()})
    return shapes


def _check_tensors(state_dict: dict[str, torch.Tensor], shape: DINOv3Shape, path: str) -> None:
    used = {key: value for key, value in state_dict.items() if not key.startswith(_UNUSED)}
    expected = expected_shapes(shape)
    expected.update({key: (3 * shape.embed_dim,) for key in used if key.endswith(".attn.qkv.bias_mask")})
    mismatch = state_dict_mismatch(used, expected)
    if mismatch:
        raise UnknownCheckpointError(
            f"{path}: weights do not fit the DINOv3 ViT built from their shapes ({mismatch}; Meta's key names)"
        )


def _mlp_ratio(hidden: int, width: int) -> float:
    """A ratio that timm's `int(width * ratio)` turns back into `hidden` exactly."""
    ratio = hidden / width
    return ratio if int(width * ratio) == hidden else (hidden + 0.5) / width


def build_dinov3(shape: DINOv3Shape, num_heads: int, eps: float = 1e-5, rope_base: float = 100.0) -> Eva:
    """timm's DINOv3 (`Eva`, rope_type "dinov3") laid out like the checkpoint, on the meta device."""
    with torch.device("meta"):
        return Eva(
            img_size=224,
            patch_size=shape.patch_size,
            num_classes=0,
            global_pool="",
            embed_dim=shape.embed_dim,
            depth=shape.depth,
            num_heads=num_heads,
            qkv_bias=shape.qkv_bias,
            mlp_ratio=_mlp_ratio(shape.mlp_hidden, shape.embed_dim),
            swiglu_mlp=shape.swiglu,
            swiglu_align_to=1 if shape.swiglu else 0,  # 1: separate gate and value weights, no rounding
            init_values=1e-5 if shape.layer_scale else None,
            rope_type="dinov3",
            rope_temperature=rope_base,
            rope_rotate_half=True,
            use_rot_pos_emb=True,
            use_abs_pos_emb=False,
            num_reg_tokens=shape.num_registers,
            use_fc_norm=False,
            dynamic_img_size=True,
            norm_layer=functools.partial(LayerNorm, eps=eps),
        )


def _materialise_buffers(vit: Eva) -> None:
    """Allocate on the CPU and fill the non-persistent buffers a meta-device build left empty."""
    for module in vit.modules():
        for name, buffer in list(module.named_buffers(recurse=False)):
            if buffer.is_meta:
                module.register_buffer(name, torch.zeros(buffer.shape, dtype=buffer.dtype), persistent=False)
        if hasattr(module, "init_non_persistent_buffers"):
            module.init_non_persistent_buffers()


def load_dinov3(
    state_dict: dict[str, torch.Tensor], path: str, num_heads: int | None = None, config: dict | None = None
) -> Eva:
    """timm DINOv3 holding the weights of a Meta-layout state dict, eval mode, fp32.

    config: transformers' config.json of a Hugging Face checkpoint (heads, RoPE base, LayerNorm eps).
    The RoPE periods Meta's file stores are used as stored (Meta's code loads them as well); the
    effective key bias (bias x bias_mask, zero in Meta's models) is kept exactly.
    """
    config = config if (config or {}).get("model_type") == "dinov3_vit" else {}
    shape = infer_dinov3_shape(state_dict, path)
    heads = _num_heads(shape, num_heads, config, path)
    _check_tensors(state_dict, shape, path)
    activation = config.get("hidden_act", "silu" if shape.swiglu else "gelu")
    if activation not in (("silu", "swish") if shape.swiglu else ("gelu",)):
        raise UnknownCheckpointError(
            f"{path}: config.json asks for the activation {activation!r}, which DINOv3 "
            f"{'SwiGLU' if shape.swiglu else 'MLP'} blocks do not use"
        )
    eps, rope_base = float(config.get("layer_norm_eps", 1e-5)), float(config.get("rope_theta", 100.0))
    vit = build_dinov3(shape, heads, eps, rope_base)
    prepared, key_biases = {}, {}
    for key, value in state_dict.items():
        if key.startswith(_UNUSED) or key.endswith(".bias_mask"):
            continue
        value = value.float() if value.is_floating_point() else value
        if key.endswith(".attn.qkv.bias"):
            mask = state_dict.get(key + "_mask")
            value = value if mask is None else value * mask.float()
            key_biases[int(key.split(".")[1])] = value.chunk(3)[1]
        prepared[key] = value
    vit.load_state_dict(eva_checkpoint_filter_fn(prepared, vit), strict=True, assign=True)
    _materialise_buffers(vit)
    periods = state_dict.get("rope_embed.periods")
    with torch.no_grad():
        if periods is not None:
            vit.rope.periods.copy_(periods.float())
        for index, key_bias in key_biases.items():
            if key_bias.any():
                vit.blocks[index].attn.k_bias.copy_(key_bias)
    return vit.eval()
