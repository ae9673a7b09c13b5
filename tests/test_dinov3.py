"""DINOv3 (Meta's and Hugging Face's layouts), safetensors files, timm state dicts by name, normalisation."""

import json
import math
import re
import warnings

import pytest
import timm
import torch
import torch.nn.functional as F
from safetensors.torch import save_file

from models.backbone import checkpoint_stem, default_num_heads, load_backbone
from models.checkpoints import detect_family
from models.files import UnknownCheckpointError, checkpoint_files, read_checkpoint
from models.normalisation import (
    CLIP_MEAN,
    CLIP_STD,
    IMAGENET_MEAN,
    IMAGENET_STD,
    SAT_MEAN,
    SAT_STD,
    NormalisationHintWarning,
    normalisation_hint,
)
from tests._backbone_fixtures import (
    make_dinov3_timm,
    make_fake_checkpoint,
    meta_dinov3_to_hf,
    save_hf_dinov3,
    timm_dinov3_to_meta,
)

ATOL = 1e-4
SIZES = [(224, 224), (64, 112)]  # Meta's native size, and a non-square one


def reference_dinov3_tokens(t, img, num_heads, eps=1e-5):
    """Plain-torch forward of Meta's DINOv3 from its state dict: final-norm patch tokens [B, h*w, D].

    RoPE on the patch tokens only: patch centres normalised per axis to [-1, 1], angle 2*pi*c/period
    for each stored period and axis (height first), the angles repeated over both halves of a head,
    rotation of the halves. The key bias is the stored one times bias_mask where a mask is stored.
    """
    p = t["patch_embed.proj.weight"].shape[-1]
    x = F.conv2d(img, t["patch_embed.proj.weight"], t["patch_embed.proj.bias"], stride=p)
    b, d, h, w = x.shape
    prefix = 1 + t["storage_tokens"].shape[1]
    x = torch.cat(
        [t["cls_token"].expand(b, -1, -1), t["storage_tokens"].expand(b, -1, -1), x.flatten(2).transpose(1, 2)], dim=1
    )
    head = d // num_heads
    ys, xs = [(torch.arange(n, dtype=torch.float32) + 0.5) / n * 2 - 1 for n in (h, w)]
    coords = torch.stack(torch.meshgrid(ys, xs, indexing="ij"), dim=-1).reshape(h * w, 2)
    angles = (2 * math.pi * coords[:, :, None] / t["rope_embed.periods"].float()).reshape(h * w, head // 2)
    cos, sin = angles.repeat(1, 2).cos(), angles.repeat(1, 2).sin()

    def rope(u):
        u1, u2 = u[..., prefix:, :].chunk(2, dim=-1)
        rotated = u[..., prefix:, :] * cos + torch.cat([-u2, u1], dim=-1) * sin
        return torch.cat([u[..., :prefix, :], rotated], dim=-2)

    depth = len({k.split(".")[1] for k in t if k.startswith("blocks.")})
    for i in range(depth):
        blk = f"blocks.{i}"
        y = F.layer_norm(x, (d,), t[f"{blk}.norm1.weight"], t[f"{blk}.norm1.bias"], eps)
        bias = t.get(f"{blk}.attn.qkv.bias")
        if bias is not None and f"{blk}.attn.qkv.bias_mask" in t:
            bias = bias * t[f"{blk}.attn.qkv.bias_mask"]
        qkv = F.linear(y, t[f"{blk}.attn.qkv.weight"], bias).reshape(b, -1, 3, num_heads, head)
        q, k, v = qkv.permute(2, 0, 3, 1, 4)
        attn = torch.softmax(rope(q) @ rope(k).transpose(-2, -1) * head**-0.5, dim=-1)
        y = F.linear(
            (attn @ v).transpose(1, 2).reshape(b, -1, d), t[f"{blk}.attn.proj.weight"], t[f"{blk}.attn.proj.bias"]
        )
        x = x + y * t[f"{blk}.ls1.gamma"]
        y = F.layer_norm(x, (d,), t[f"{blk}.norm2.weight"], t[f"{blk}.norm2.bias"], eps)
        if f"{blk}.mlp.w1.weight" in t:
            gate = F.silu(F.linear(y, t[f"{blk}.mlp.w1.weight"], t[f"{blk}.mlp.w1.bias"]))
            y = F.linear(
                gate * F.linear(y, t[f"{blk}.mlp.w2.weight"], t[f"{blk}.mlp.w2.bias"]),
                t[f"{blk}.mlp.w3.weight"],
                t[f"{blk}.mlp.w3.bias"],
            )
        else:
            y = F.linear(
                F.gelu(F.linear(y, t[f"{blk}.mlp.fc1.weight"], t[f"{blk}.mlp.fc1.bias"])),
                t[f"{blk}.mlp.fc2.weight"],
                t[f"{blk}.mlp.fc2.bias"],
            )
        x = x + y * t[f"{blk}.ls2.gamma"]
    return F.layer_norm(x, (d,), t["norm.weight"], t["norm.bias"], eps)[:, prefix:]


# name: (timm DINOv3 definition, overrides, width, heads, FFN hidden width)
VARIANTS = {
    "mlp": ("vit_small_patch16_dinov3", dict(qkv_bias=True), 128, 2, 512),
    "swiglu": ("vit_small_plus_patch16_dinov3", dict(qkv_bias=True, mlp_ratio=2.7), 128, 2, 352),
    "7b-like": ("vit_7b_patch16_dinov3", dict(embed_dim=256, mlp_ratio=2), 256, 2, 512),  # 128 per head, no qkv bias
}


@pytest.fixture(scope="module", params=list(VARIANTS))
def dinov3(request, tmp_path_factory):
    """A tiny timm DINOv3 and its checkpoints: Meta's .pth, a Hugging Face folder, its model.safetensors."""
    arch, overrides, width, heads, hidden = VARIANTS[request.param]
    model = make_dinov3_timm(arch, **overrides)
    meta = timm_dinov3_to_meta(model)
    root = tmp_path_factory.mktemp(request.param)
    torch.save(meta, root / "dinov3_vits16_pretrain_lvd1689m-08c60483.pth")
    folder = save_hf_dinov3(root / "dinov3-vits16-pretrain-lvd1689m", meta, num_heads=heads)
    return {
        "model": model,
        "meta": meta,
        "swiglu": "w1" in str(list(meta)),
        "width": width,
        "heads": heads,
        "hidden": hidden,
        "meta_path": root / "dinov3_vits16_pretrain_lvd1689m-08c60483.pth",
        "hf_folder": folder,
        "hf_file": folder / "model.safetensors",
    }


def images(height, width, seed=0):
    return torch.randn(2, 3, height, width, generator=torch.Generator().manual_seed(seed + height * width))


def one_line_error(error_type, call):
    with pytest.raises(error_type) as info:
        call()
    message = str(info.value)
    assert "\n" not in message
    return message


def test_meta_layout_is_detected_and_sized_from_its_tensors(dinov3):
    assert detect_family(read_checkpoint(dinov3["meta_path"])) == "dinov3"
    backbone = load_backbone(dinov3["meta_path"])
    assert (backbone.family, backbone.position_rule, backbone.grid_size) == ("dinov3", "rope", None)
    sizes = (backbone.embed_dim, backbone.patch_size, backbone.num_heads, backbone.num_registers)
    assert sizes == (dinov3["width"], 16, dinov3["heads"], 4)
    assert len(backbone.vit.blocks) == 2
    mlp = backbone.vit.blocks[0].mlp
    assert (mlp.fc1_g if dinov3["swiglu"] else mlp.fc1).out_features == dinov3["hidden"]
    assert (backbone.vit.blocks[0].attn.q_bias is not None) == ("blocks.0.attn.qkv.bias" in dinov3["meta"])
    assert backbone.vit.norm.eps == 1e-5 and backbone.vit.blocks[1].norm2.eps == 1e-5
    assert (backbone.mean, backbone.std) == (IMAGENET_MEAN, IMAGENET_STD)
    assert not any(p.requires_grad for p in backbone.parameters())


@pytest.mark.parametrize("size", SIZES, ids=["native", "non-square"])
def test_both_layouts_give_timms_and_the_reference_tokens(dinov3, size):
    img = images(*size)
    with torch.no_grad():
        expected = dinov3["model"].forward_features(img)[:, 5:]
    reference = reference_dinov3_tokens(dinov3["meta"], img, num_heads=dinov3["heads"])
    torch.testing.assert_close(reference, expected, atol=ATOL, rtol=ATOL)
    for ckpt in (dinov3["meta_path"], dinov3["hf_folder"], dinov3["hf_file"]):
        tokens = load_backbone(ckpt)(img)
        assert tokens.shape == (2, (size[0] // 16) * (size[1] // 16), dinov3["width"])
        torch.testing.assert_close(tokens, expected, atol=ATOL, rtol=ATOL)


def test_hugging_face_layout_is_detected_with_or_without_config_and_prefix(dinov3, tmp_path):
    assert detect_family(read_checkpoint(dinov3["hf_file"])) == "dinov3"
    img = images(48, 80)
    expected = load_backbone(dinov3["meta_path"])(img)
    prefixed = tmp_path / "prefixed" / "dinov3_vit.safetensors"  # saved from a model that holds the ViT
    prefixed.parent.mkdir()
    save_file({"dinov3_vit." + k: v for k, v in meta_dinov3_to_hf(dinov3["meta"]).items()}, str(prefixed))
    (prefixed.parent / "config.json").write_bytes((dinov3["hf_folder"] / "config.json").read_bytes())
    backbone = load_backbone(prefixed)
    assert (backbone.family, backbone.num_heads) == ("dinov3", dinov3["heads"])
    torch.testing.assert_close(backbone(img), expected, atol=ATOL, rtol=ATOL)
    # Without config.json the heads follow Meta's rule (64 channels per head below width 4096).
    bare = load_backbone(save_hf_dinov3(tmp_path / "bare", dinov3["meta"], dinov3["heads"], config=False))
    assert bare.num_heads == default_num_heads("dinov3", dinov3["width"])
    if bare.num_heads == dinov3["heads"]:
        torch.testing.assert_close(bare(img), expected, atol=ATOL, rtol=ATOL)


def test_config_heads_are_used_and_meta_periods_fix_the_heads(dinov3, tmp_path):
    folder = save_hf_dinov3(tmp_path / "hf", dinov3["meta"], num_heads=4)
    assert load_backbone(folder).num_heads == 4
    message = one_line_error(ValueError, lambda: load_backbone(dinov3["meta_path"], num_heads=4))
    heads, width = dinov3["heads"], dinov3["width"]
    assert f"RoPE periods fix {heads} heads of {width // heads} channels" in message


def test_stored_periods_and_masked_key_bias_are_used_as_meta_uses_them(dinov3, tmp_path):
    meta = dict(dinov3["meta"])
    meta["rope_embed.periods"] = meta["rope_embed.periods"].bfloat16()  # rounded, as a bf16-trained file holds them
    rounded = tmp_path / "rounded.pth"
    torch.save(meta, rounded)
    unmasked = {k: v for k, v in dinov3["meta"].items() if not k.endswith("bias_mask")}
    unmasked_path = tmp_path / "unmasked.pth"
    torch.save(unmasked, unmasked_path)
    img = images(64, 96)
    default = load_backbone(dinov3["meta_path"])(img)
    cases = [(rounded, meta)] + [(unmasked_path, unmasked)] * ("blocks.0.attn.qkv.bias" in meta)
    for path, tensors in cases:
        tokens = load_backbone(path)(img)
        assert (tokens - default).abs().max() > 1e-3
        expected = reference_dinov3_tokens(tensors, img, dinov3["heads"])
        torch.testing.assert_close(tokens, expected, atol=ATOL, rtol=ATOL)


def test_sharded_hugging_face_folder(dinov3, tmp_path):
    tensors = meta_dinov3_to_hf(dinov3["meta"])
    names = sorted(tensors)
    shards = {"model-00001-of-00002.safetensors": names[::2], "model-00002-of-00002.safetensors": names[1::2]}
    for shard, keys in shards.items():
        save_file({k: tensors[k] for k in keys}, str(tmp_path / shard))
    index = {"metadata": {}, "weight_map": {k: shard for shard, keys in shards.items() for k in keys}}
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps(index))
    (tmp_path / "config.json").write_bytes((dinov3["hf_folder"] / "config.json").read_bytes())
    assert checkpoint_files(tmp_path) == [str(tmp_path / shard) for shard in sorted(shards)]
    img = images(32, 48)
    torch.testing.assert_close(load_backbone(tmp_path)(img), load_backbone(dinov3["meta_path"])(img))


def test_near_miss_and_junk_files_are_refused_in_one_line(dinov3, tmp_path):
    meta, d = dinov3["meta"], dinov3["width"]
    cases = {
        "no_storage.pth": ({k: v for k, v in meta.items() if k != "storage_tokens"}, r"lacks \['storage_tokens'\]"),
        "wide_storage.pth": (
            dict(meta, storage_tokens=torch.zeros(1, 4, d + 1)),
            rf"storage_tokens has shape \[1, 4, {d + 1}\], expected \[1, 4, {d}\]",
        ),
        "bad_fc.pth": (
            dict(
                meta, **{k: torch.zeros(7, 7) for k in meta if k.startswith("blocks.1.mlp.") and k.endswith("2.weight")}
            ),
            r"blocks\.1\.mlp\.\w+\.weight has shape \[7, 7\]",
        ),
        "extra.pth": (
            dict(meta, **{"blocks.0.attn.q_norm.weight": torch.ones(64)}),
            r"unexpected \['blocks.0.attn.q_norm.weight'\]",
        ),
    }
    for name, (tensors, pattern) in cases.items():
        torch.save(tensors, tmp_path / name)
        message = one_line_error(UnknownCheckpointError, lambda: load_backbone(tmp_path / name))
        assert str(tmp_path / name) in message
        assert re.search(pattern, message), message
    hf = {k: v for k, v in meta_dinov3_to_hf(meta).items() if k != "layer.1.attention.k_proj.weight"}
    save_file(hf, str(tmp_path / "no_key.safetensors"))
    message = one_line_error(UnknownCheckpointError, lambda: load_backbone(tmp_path / "no_key.safetensors"))
    assert "missing ['blocks.1.attn.qkv.weight']" in message and "layer.1.attention.q_proj.weight" in message
    junk = {
        "text.safetensors": b"this is not a weights file\n",
        "empty.safetensors": b"",
        "truncated.safetensors": dinov3["hf_file"].read_bytes()[:3000],
    }
    for name, content in junk.items():
        (tmp_path / name).write_bytes(content)
        message = one_line_error(UnknownCheckpointError, lambda: load_backbone(tmp_path / name))
        assert message.startswith(f"{tmp_path / name}: not a readable safetensors file")
    empty_folder = tmp_path / "empty_folder"
    empty_folder.mkdir()
    assert "holds neither model.safetensors" in one_line_error(FileNotFoundError, lambda: load_backbone(empty_folder))
    message = one_line_error(UnknownCheckpointError, lambda: load_backbone(dinov3["meta_path"], family="dino"))
    assert "not a dino checkpoint" in message
    make_fake_checkpoint(tmp_path / "dino.pth", "dino")
    message = one_line_error(UnknownCheckpointError, lambda: load_backbone(tmp_path / "dino.pth", family="dinov3"))
    assert "not a dinov3 checkpoint (expected Meta's plain state dict holding cls_token, storage_tokens" in message


@pytest.mark.parametrize(
    "family,kwargs", [("dino", {}), ("dinov2", dict(embed_dim=64, num_registers=4)), ("unicom", {})]
)
def test_safetensors_load_wherever_a_pth_does(tmp_path, family, kwargs):
    pth = make_fake_checkpoint(tmp_path / f"{family}.pth", family, **kwargs)
    tensors = {k: v.contiguous() for k, v in torch.load(pth, weights_only=True).items()}
    save_file(tensors, str(tmp_path / f"{family}.safetensors"))
    odd_name = tmp_path / f"{family}.bin"  # recognised by its header, not its name
    odd_name.write_bytes((tmp_path / f"{family}.safetensors").read_bytes())
    img = images(24, 40)
    expected = load_backbone(pth)(img)
    for path in (tmp_path / f"{family}.safetensors", odd_name):
        backbone = load_backbone(path)
        assert backbone.family == family
        torch.testing.assert_close(backbone(img), expected)


def test_timm_state_dict_loads_by_architecture_name(tmp_path):
    arch = "vit_tiny_patch16_dinov3_qkvb"
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(3)
        model = timm.create_model(arch, pretrained=False, num_classes=0, global_pool="").eval()
    path = tmp_path / "timm_dinov3.safetensors"
    save_file(model.state_dict(), str(path))
    backbone = load_backbone(path, arch=arch)
    assert (backbone.family, backbone.arch, backbone.position_rule) == ("timm", arch, "timm")
    assert (backbone.embed_dim, backbone.num_registers, backbone.mean) == (192, 4, IMAGENET_MEAN)
    img = images(48, 80)
    with torch.no_grad():
        torch.testing.assert_close(backbone(img), model.forward_features(img)[:, 5:])
    message = one_line_error(UnknownCheckpointError, lambda: load_backbone(path))
    assert "matches no backbone family" in message and "blocks.0.gamma_1" in message
    message = one_line_error(UnknownCheckpointError, lambda: load_backbone(path, arch="vit_tiny_patch16_224"))
    assert "fits neither the timm architecture 'vit_tiny_patch16_224' (missing ['pos_embed'" in message
    assert "nor any backbone family" in message


def test_plain_timm_vit_loads_as_a_family_unless_timm_is_asked_for(tmp_path):
    arch = "vit_tiny_patch16_224"
    with torch.random.fork_rng(devices=[]):
        model = timm.create_model(arch, pretrained=False, num_classes=0, global_pool="", dynamic_img_size=True)
    path = tmp_path / "deit_tiny.pth"
    torch.save({"state_dict": model.eval().state_dict()}, path)
    assert load_backbone(path, arch=arch).family == "ibot"  # the official layout wins when the keys match one
    backbone = load_backbone(path, family="timm", arch=arch)
    assert (backbone.family, backbone.grid_size, backbone.mean) == ("timm", 14, (0.5, 0.5, 0.5))
    img = images(64, 96)
    with torch.no_grad():
        torch.testing.assert_close(backbone(img), model.forward_features(img)[:, 1:])
    assert "give arch" in one_line_error(ValueError, lambda: load_backbone(path, family="timm"))


def test_random_dinov3_architecture():
    with pytest.warns(UserWarning, match="random weights"):
        backbone = load_backbone(None, arch="vit_tiny_patch16_dinov3_qkvb")
    assert (backbone.family, backbone.position_rule, backbone.num_registers) == ("random", "timm", 4)
    assert backbone(images(32, 48)).shape == (2, 6, 192)


@pytest.mark.parametrize(
    "norm,expected",
    [
        (None, (IMAGENET_MEAN, IMAGENET_STD)),
        ("sat", (SAT_MEAN, SAT_STD)),
        ("CLIP", (CLIP_MEAN, CLIP_STD)),
        ("imagenet", (IMAGENET_MEAN, IMAGENET_STD)),
        ((0.5, 0.5, 0.5, 0.25, 0.25, 0.25), ((0.5,) * 3, (0.25,) * 3)),
        ("0.1,0.2,0.3, 0.4 0.5 0.6", ((0.1, 0.2, 0.3), (0.4, 0.5, 0.6))),
        ((SAT_MEAN, SAT_STD), (SAT_MEAN, SAT_STD)),
    ],
)
def test_norm_argument_sets_the_backbone_normalisation(dinov3, norm, expected):
    backbone = load_backbone(dinov3["meta_path"], norm=norm)
    assert (backbone.mean, backbone.std) == expected


@pytest.mark.parametrize("norm", ["satellite", (0.5, 0.5), "1,2,3,4,5,0", [0.1] * 5 + ["x"]])
def test_bad_norm_is_refused(tmp_path, norm):
    path = make_fake_checkpoint(tmp_path / "dino.pth", "dino")
    assert "normalisation" in one_line_error(ValueError, lambda: load_backbone(path, norm=norm))


def test_satellite_file_names_hint_at_their_normalisation(dinov3, tmp_path):
    sat = tmp_path / "dinov3_vitl16_pretrain_sat493m-eadcf0ff.pth"
    sat.write_bytes(dinov3["meta_path"].read_bytes())
    with pytest.warns(NormalisationHintWarning) as record:
        backbone = load_backbone(sat)
    assert (backbone.mean, backbone.std) == (IMAGENET_MEAN, IMAGENET_STD)
    (hint,) = [str(w.message) for w in record if w.category is NormalisationHintWarning]
    assert "\n" not in hint and "SAT-493M" in hint and '"sat"' in hint
    folder = save_hf_dinov3(tmp_path / "dinov3-vitl16-pretrain-sat493m", dinov3["meta"], dinov3["heads"])
    for ckpt in (folder, folder / "model.safetensors"):
        assert normalisation_hint(ckpt, None, IMAGENET_MEAN) is not None
    with warnings.catch_warnings():
        warnings.simplefilter("error", NormalisationHintWarning)
        assert load_backbone(sat, norm="sat").mean == SAT_MEAN
        assert load_backbone(sat, norm="imagenet").mean == IMAGENET_MEAN
        load_backbone(dinov3["meta_path"])
    assert normalisation_hint(sat, None, SAT_MEAN) is None
    assert normalisation_hint(None, None, IMAGENET_MEAN) is None


def test_runs_under_autocast_without_forcing_fp32(dinov3):
    backbone = load_backbone(dinov3["meta_path"])
    dtypes = []
    for layer in (backbone.vit.blocks[0].attn.proj, backbone.vit.blocks[-1].mlp.fc2):
        layer.register_forward_hook(lambda module, args, out: dtypes.append(out.dtype))
    img = images(32, 64)
    with torch.inference_mode():
        full = backbone(img)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            half = backbone(img)
    assert dtypes == [torch.float32, torch.float32, torch.bfloat16, torch.bfloat16]
    assert 0 < (half.float() - full).abs().max() < 0.25 * full.abs().max()


@pytest.mark.parametrize("width,heads", [(384, 6), (768, 12), (1024, 16), (1280, 20), (4096, 32)])
def test_dinov3_heads_rule(width, heads):
    assert default_num_heads("dinov3", width) == heads


def test_checkpoint_stem_of_hugging_face_folders(dinov3):
    assert checkpoint_stem(dinov3["hf_folder"]) == "dinov3-vits16-pretrain-lvd1689m"
    assert checkpoint_stem(str(dinov3["hf_folder"]) + "/") == "dinov3-vits16-pretrain-lvd1689m"
    assert checkpoint_stem(dinov3["hf_file"]) == "dinov3-vits16-pretrain-lvd1689m"
    assert checkpoint_stem(dinov3["meta_path"]) == "dinov3_vits16_pretrain_lvd1689m-08c60483"
    assert checkpoint_stem("weights/vit.safetensors") == "vit"
