import math
import pickle
import warnings

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from models.backbone import RandomBackboneWarning, checkpoint_stem, default_num_heads, load_backbone
from models.files import UnknownCheckpointError
from models.normalisation import CLIP_MEAN, CLIP_STD, IMAGENET_MEAN, IMAGENET_STD
from models.positions import interpolate_position_embedding, sincos_2d_position_embedding
from tests._backbone_fixtures import make_fake_checkpoint, official_sincos_table

ATOL = 1e-4


def official_tensors(path, family):
    """The backbone tensors of a saved file, read the way each family's own code reads them."""
    raw = torch.load(path, map_location="cpu", weights_only=False)
    if family in ("dino", "dinov2"):
        tensors = dict(raw)
    elif family == "ibot":
        tensors = dict(raw["state_dict"])
    elif family == "mae":
        tensors = dict(raw["model"])
    elif family == "msn":
        tensors = {k[len("module.") :]: v for k, v in raw["target_encoder"].items()}
    elif family == "mocov3":
        prefix = "module.base_encoder."
        tensors = {k[len(prefix) :]: v for k, v in raw["state_dict"].items() if k.startswith(prefix)}
    else:
        tensors = dict(raw)
    return {k: v.float() if v.is_floating_point() else v for k, v in tensors.items()}


def reference_patch_positions(patch_pos, h, w, family, num_registers):
    """[1, M*M, D] -> [1, h*w, D] by the family's official rule (README, Backbones)."""
    d = patch_pos.shape[-1]
    m = int(math.sqrt(patch_pos.shape[1]))
    if (h, w) == (m, m):
        return patch_pos
    if family == "mocov3":
        return official_sincos_table(h, w, d)
    grid = patch_pos.reshape(1, m, m, d).permute(0, 3, 1, 2)
    if family == "msn" and h == w:
        grid = F.interpolate(grid, scale_factor=math.sqrt(h * w / m**2), mode="bicubic")
    elif family == "msn":
        grid = F.interpolate(grid, scale_factor=(h / m, w / m), mode="bicubic")
    elif family == "dinov2" and num_registers:
        grid = F.interpolate(grid, size=(h, w), mode="bicubic", antialias=True)
    elif family == "unicom":
        grid = F.interpolate(grid, size=(h, w), mode="bicubic", align_corners=False)
    else:
        grid = F.interpolate(grid, scale_factor=((h + 0.1) / m, (w + 0.1) / m), mode="bicubic")
    assert grid.shape[-2:] == (h, w)
    return grid.permute(0, 2, 3, 1).reshape(1, h * w, d)


def reference_attention(x, t, prefix, num_heads):
    b, n, d = x.shape
    qkv = F.linear(x, t[f"{prefix}.qkv.weight"], t.get(f"{prefix}.qkv.bias"))
    q, k, v = qkv.reshape(b, n, 3, num_heads, d // num_heads).permute(2, 0, 3, 1, 4)
    attn = torch.softmax(q @ k.transpose(-2, -1) * (d // num_heads) ** -0.5, dim=-1)
    out = (attn @ v).transpose(1, 2).reshape(b, n, d)
    return F.linear(out, t[f"{prefix}.proj.weight"], t[f"{prefix}.proj.bias"])


def reference_tokens(t, family, img, num_heads, num_registers=0):
    """Plain-torch forward of the official model: final-norm patch tokens [B, h*w, D]."""
    p = t["patch_embed.proj.weight"].shape[-1]
    x = F.conv2d(img, t["patch_embed.proj.weight"], t["patch_embed.proj.bias"], stride=p)
    b, d, h, w = x.shape
    x = x.flatten(2).transpose(1, 2)
    has_cls = "cls_token" in t
    pos = t["pos_embed"]
    x = x + reference_patch_positions(pos[:, int(has_cls) :], h, w, family, num_registers)
    prefix = []
    if has_cls:
        prefix.append((t["cls_token"] + pos[:, :1]).expand(b, -1, -1))
    if num_registers:
        prefix.append(t["register_tokens"].expand(b, -1, -1))
    x = torch.cat(prefix + [x], dim=1)
    eps = 1e-5 if family == "unicom" else 1e-6
    act = F.relu6 if family == "unicom" else F.gelu
    depth = len({k.split(".")[1] for k in t if k.startswith("blocks.")})
    for i in range(depth):
        blk = f"blocks.{i}"
        y = F.layer_norm(x, (d,), t[f"{blk}.norm1.weight"], t[f"{blk}.norm1.bias"], eps)
        y = reference_attention(y, t, f"{blk}.attn", num_heads)
        x = x + y * t.get(f"{blk}.ls1.gamma", torch.ones(d))
        y = F.layer_norm(x, (d,), t[f"{blk}.norm2.weight"], t[f"{blk}.norm2.bias"], eps)
        y = F.linear(
            act(F.linear(y, t[f"{blk}.mlp.fc1.weight"], t[f"{blk}.mlp.fc1.bias"])),
            t[f"{blk}.mlp.fc2.weight"],
            t[f"{blk}.mlp.fc2.bias"],
        )
        x = x + y * t.get(f"{blk}.ls2.gamma", torch.ones(d))
    x = F.layer_norm(x, (d,), t["norm.weight"], t["norm.bias"], eps)
    return x[:, int(has_cls) + num_registers :]


# (family, fixture kwargs, expected heads, non-native input size (H, W))
CASES = [
    ("dino", dict(embed_dim=48), 1, (24, 48)),
    ("dinov2", dict(embed_dim=64), 1, (24, 48)),
    ("dinov2", dict(embed_dim=64, num_registers=4), 1, (24, 48)),
    ("ibot", dict(embed_dim=64, patch_size=16, img_size=64), 1, (48, 80)),
    ("msn", dict(embed_dim=48), 1, (24, 48)),
    ("mae", dict(embed_dim=48), 1, (24, 48)),
    ("mocov3", dict(embed_dim=48), 12, (24, 48)),
    ("unicom", dict(embed_dim=48), 12, (24, 48)),
]


@pytest.mark.parametrize(
    "family,kwargs,heads,size", CASES, ids=[f"{c[0]}-reg{c[1].get('num_registers', 0)}" for c in CASES]
)
def test_official_layout_loads_and_matches_reference(tmp_path, family, kwargs, heads, size):
    path = make_fake_checkpoint(tmp_path / f"{family}.pth", family, **kwargs)
    model = load_backbone(path)
    registers = kwargs.get("num_registers", 0)
    patch = kwargs.get("patch_size", 8)
    assert model.family == family
    assert (model.embed_dim, model.patch_size) == (kwargs["embed_dim"], patch)
    assert (model.num_heads, model.num_registers) == (heads, registers)
    if family == "unicom":
        assert (model.mean, model.std) == (CLIP_MEAN, CLIP_STD)
    else:
        assert (model.mean, model.std) == (IMAGENET_MEAN, IMAGENET_STD)
    assert len(model.vit.blocks) == 2
    tensors = official_tensors(path, family)
    gen = torch.Generator().manual_seed(1)
    native = kwargs.get("img_size", 32)
    for height, width in [(native, native), size]:
        img = torch.randn(2, 3, height, width, generator=gen)
        tokens = model(img)
        assert tokens.shape == (2, (height // patch) * (width // patch), kwargs["embed_dim"])
        expected = reference_tokens(tensors, family, img, heads, registers)
        torch.testing.assert_close(tokens, expected, atol=ATOL, rtol=ATOL)


def test_msn_square_non_native_uses_single_sqrt_factor(tmp_path):
    path = make_fake_checkpoint(tmp_path / "msn.pth.tar", "msn")
    model = load_backbone(path)
    img = torch.randn(1, 3, 48, 48, generator=torch.Generator().manual_seed(2))
    expected = reference_tokens(official_tensors(path, "msn"), "msn", img, 1)
    torch.testing.assert_close(model(img), expected, atol=ATOL, rtol=ATOL)


def test_msn_official_factor_flooring_short_still_gives_full_grid():
    # M = 14, h = w = 29: the official factor sqrt(29^2 / 14^2) makes F.interpolate return 28x28.
    table = torch.randn(1, 14 * 14, 4, generator=torch.Generator().manual_seed(3))
    factor = math.sqrt(29 * 29 / 14**2)
    grid = table.reshape(1, 14, 14, 4).permute(0, 3, 1, 2)
    assert F.interpolate(grid, scale_factor=factor, mode="bicubic").shape[-1] == 28
    out = interpolate_position_embedding(table, 29, 29, "msn")
    assert out.shape == (1, 29 * 29, 4)
    # Same sampling positions as the official factor: agrees with it where both are defined.
    short = F.interpolate(grid, scale_factor=factor, mode="bicubic").permute(0, 2, 3, 1)
    torch.testing.assert_close(out.reshape(1, 29, 29, 4)[:, :28, :28], short)


def test_position_rules_are_distinguishable():
    table = torch.randn(1, 16, 8, generator=torch.Generator().manual_seed(4))
    outs = {
        rule: interpolate_position_embedding(table, 3, 6, rule)
        for rule in ("offset", "msn", "antialias", "size", "sincos")
    }
    # MSN's factor h/M reproduces size=(h, w) sampling up to the rounding of the factor.
    torch.testing.assert_close(outs.pop("msn"), outs["size"])
    rules = list(outs)
    for i, a in enumerate(rules):
        for b in rules[i + 1 :]:
            assert (outs[a] - outs[b]).abs().max() > 1e-3, (a, b)
    assert interpolate_position_embedding(table, 4, 4, "offset") is table


def test_mocov3_table_regenerated_equals_stored_at_native_grid(tmp_path):
    path = make_fake_checkpoint(tmp_path / "mocov3.pth.tar", "mocov3")
    model = load_backbone(path)
    stored = official_tensors(path, "mocov3")["pos_embed"]
    assert torch.equal(model.vit.pos_embed, stored)
    assert torch.equal(stored[:, :1], torch.zeros(1, 1, 48))
    assert torch.equal(sincos_2d_position_embedding(4, 4, 48), stored[:, 1:])


def test_sincos_token_order_follows_official_meshgrid():
    # dim 4: one frequency (omega = 1); token m of an h x w grid gets (m // h, m % h).
    h, w = 2, 3
    table = sincos_2d_position_embedding(h, w, 4)[0]
    for m in range(h * w):
        a, b = float(m // h), float(m % h)
        expected = torch.tensor([math.sin(a), math.cos(a), math.sin(b), math.cos(b)])
        torch.testing.assert_close(table[m], expected)
    torch.testing.assert_close(sincos_2d_position_embedding(5, 7, 16), official_sincos_table(5, 7, 16))


def test_unicom_fp16_weights_become_fp32_and_head_is_dropped(tmp_path):
    path = make_fake_checkpoint(tmp_path / "FP16-ViT-B-16.pt", "unicom")
    raw = torch.load(path, weights_only=True)
    assert raw["pos_embed"].dtype == torch.float16 and "cls_token" not in raw
    model = load_backbone(path)
    assert all(p.dtype == torch.float32 for p in model.parameters())
    assert torch.equal(model.vit.blocks[0].mlp.fc1.weight, raw["blocks.0.mlp.fc1.weight"].float())
    assert model.vit.blocks[0].attn.qkv.bias is None
    assert model.vit.blocks[0].attn.proj.bias is not None
    assert isinstance(model.vit.blocks[0].mlp.act, nn.ReLU6)
    assert model.vit.norm.eps == 1e-5
    assert not any(k.startswith("feature") for k in model.vit.state_dict())


def test_eps_and_activation_of_other_families(tmp_path):
    model = load_backbone(make_fake_checkpoint(tmp_path / "dino.pth", "dino"))
    assert model.vit.norm.eps == 1e-6 and model.vit.blocks[1].norm2.eps == 1e-6
    act = model.vit.blocks[0].mlp.act
    assert isinstance(act, nn.GELU) and act.approximate == "none"


@pytest.mark.parametrize(
    "family,width,heads",
    [
        ("dino", 384, 6),
        ("dino", 768, 12),
        ("ibot", 1024, 16),
        ("msn", 384, 6),
        ("mae", 1024, 16),
        ("dinov2", 1536, 24),
        ("dino", 48, 1),
        ("mocov3", 384, 12),
        ("mocov3", 768, 12),
        ("mocov3", 1024, 16),
        ("unicom", 768, 12),
        ("unicom", 1024, 16),
    ],
)
def test_default_num_heads(family, width, heads):
    assert default_num_heads(family, width) == heads


def test_num_heads_override_changes_features(tmp_path):
    path = make_fake_checkpoint(tmp_path / "dino_deitsmall8_pretrain.pth", "dino", embed_dim=64)
    default = load_backbone(path)
    override = load_backbone(path, num_heads=4)
    assert (default.num_heads, override.num_heads) == (1, 4)
    img = torch.randn(1, 3, 32, 40, generator=torch.Generator().manual_seed(5))
    assert (default(img) - override(img)).abs().max() > 1e-2
    expected = reference_tokens(official_tensors(path, "dino"), "dino", img, 4)
    torch.testing.assert_close(override(img), expected, atol=ATOL, rtol=ATOL)
    with pytest.raises(ValueError, match="not divisible by 5 heads"):
        load_backbone(path, num_heads=5)


def test_explicit_family_and_mismatch(tmp_path):
    path = make_fake_checkpoint(tmp_path / "dino.pth", "dino")
    assert load_backbone(path, family="dino").family == "dino"
    with pytest.raises(UnknownCheckpointError, match=r"not a mae checkpoint.*\"model\".*cls_token"):
        load_backbone(path, family="mae")
    with pytest.raises(ValueError, match="unknown backbone family 'vit'"):
        load_backbone(path, family="vit")


def test_mae_training_output_needs_the_full_unpickler(tmp_path):
    path = make_fake_checkpoint(tmp_path / "checkpoint-799.pth", "mae")
    with pytest.raises(pickle.UnpicklingError):
        torch.load(path, weights_only=True)
    assert load_backbone(path).family == "mae"


def test_unknown_checkpoint_lists_keys(tmp_path):
    path = tmp_path / "resnet50.pth"
    resnet = {"conv1.weight": torch.zeros(1), "fc.bias": torch.zeros(1)}
    torch.save({"epoch": 3, "state_dict": resnet}, path)
    with pytest.raises(UnknownCheckpointError) as info:
        load_backbone(path)
    message = str(info.value)
    assert str(path) in message and "matches no backbone family" in message
    assert "epoch" in message and "conv1.weight" in message
    assert "\n" not in message


def test_unreadable_and_missing_files(tmp_path):
    text = tmp_path / "notes.pth"
    # Each first byte sends the pickle reader down another path (and another exception type).
    for content in ("not a checkpoint", "garbage\n", "\x80\x05junk"):
        text.write_text(content)
        with pytest.raises(UnknownCheckpointError, match="not a readable PyTorch checkpoint"):
            load_backbone(text)
    missing = tmp_path / "nowhere" / "dino.pth"
    with pytest.raises(FileNotFoundError, match=str(missing)):
        load_backbone(missing)


def test_unexpected_weights_are_not_ignored(tmp_path):
    path = tmp_path / "dino.pth"
    make_fake_checkpoint(path, "dino")
    state_dict = torch.load(path, weights_only=True)
    state_dict["blocks.0.attn.q_bias"] = torch.zeros(48)
    torch.save(state_dict, path)
    with pytest.raises(UnknownCheckpointError, match=r"unexpected \['blocks.0.attn.q_bias'\]"):
        load_backbone(path)


def test_input_size_must_be_a_multiple_of_the_patch(tmp_path):
    model = load_backbone(make_fake_checkpoint(tmp_path / "dino.pth", "dino"))
    with pytest.raises(ValueError, match="30x32 is not a multiple of the patch size 8"):
        model(torch.zeros(1, 3, 30, 32))


def test_frozen_and_stays_in_eval_mode(tmp_path):
    backbone = load_backbone(make_fake_checkpoint(tmp_path / "dinov2.pth", "dinov2", embed_dim=64))
    assert not any(p.requires_grad for p in backbone.parameters())
    parent = nn.Sequential(backbone, nn.Dropout(0.5))
    parent.train()
    assert parent[1].training
    assert not any(m.training for m in backbone.modules())
    out = backbone(torch.randn(1, 3, 32, 32))
    assert out.grad_fn is None


def test_random_backbone_is_seeded_and_warns():
    torch.manual_seed(123)
    untouched = torch.rand(3)
    torch.manual_seed(123)
    with pytest.warns(RandomBackboneWarning, match="random weights") as record:
        first = load_backbone(None)
    assert len([w for w in record if issubclass(w.category, RandomBackboneWarning)]) == 1
    assert torch.equal(torch.rand(3), untouched)  # the global RNG was neither used nor reseeded
    torch.manual_seed(999)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RandomBackboneWarning)
        second = load_backbone(None, arch="vit_tiny_patch16_224")
    for (name, a), (_, b) in zip(first.state_dict().items(), second.state_dict().items()):
        assert torch.equal(a, b), name
    assert first.family == "random"
    assert (first.patch_size, first.embed_dim, first.num_heads) == (16, 192, 3)
    assert (first.mean, first.std) == (IMAGENET_MEAN, IMAGENET_STD)
    assert first(torch.randn(1, 3, 32, 48)).shape == (1, 6, 192)
    with pytest.raises(ValueError, match="unknown timm architecture 'no_such_vit'"):
        load_backbone(None, arch="no_such_vit")


def test_checkpoint_stem():
    assert checkpoint_stem("/ckpt/dino_vitbase8_pretrain.pth") == "dino_vitbase8_pretrain"
    assert checkpoint_stem("vits16_800ep.pth.tar") == "vits16_800ep"
    assert checkpoint_stem("FP16-ViT-B-16.pt") == "FP16-ViT-B-16"
    assert checkpoint_stem(None) == "random_vit_tiny_patch16_224"
    assert checkpoint_stem(None, arch="vit_small_patch16_224") == "random_vit_small_patch16_224"
