import hashlib
import json
import os

import numpy as np
import pytest
import torch
from PIL import Image

import pretrain_toy
from loader.toy import PARTS_CLASS_NAMES, TOY_WORLDS, ensure_toy, parts_sample, toy_dir
from loader.transforms import SegmentationTransform
from loader.views import correspondences, image_to_view, random_view, view_to_image
from models.backbone import load_backbone
from models.checkpoints import detect_family
from models.normalisation import IMAGENET_MEAN, IMAGENET_STD

TINY_MODEL = [
    "--embed_dim", "32", "--depth", "1", "--patch_size", "8", "--out_dim", "32",
    "--global_size", "16", "--local_size", "8", "--local_crops", "2", "--batch_size", "4", "--centre_tokens", "0",
]  # fmt: skip


@pytest.fixture(scope="module")
def image_dir(tmp_path_factory):
    """Eight 32-pixel scenes of the parts world."""
    directory = tmp_path_factory.mktemp("images")
    for i in range(8):
        image, _ = parts_sample(np.random.default_rng([5, i]), 32, 6)
        Image.fromarray(image).save(directory / f"{i:05d}.png")
    return str(directory)


def pretrain(image_dir, out, *flags):
    return pretrain_toy.main(["--image_dir", image_dir, "--out", str(out), *TINY_MODEL, *flags])


def weights(path):
    return torch.load(path, map_location="cpu", weights_only=True)


def assert_same(a, b):
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_loss_goes_down(image_dir):
    """A few AdamW steps on one batch of views lower both objectives against a fixed teacher."""
    args = pretrain_toy.parser().parse_args(["--image_dir", image_dir, *TINY_MODEL])
    torch.manual_seed(0)
    student = pretrain_toy.Network(args)
    teacher = pretrain_toy.Network(args).requires_grad_(False)
    images = pretrain_toy.load_images(image_dir)
    views, masks, corr = pretrain_toy.batch_views(images, range(4), 0, args)
    assert masks.any() and (corr >= 0).any()
    centers = (torch.zeros(args.out_dim), torch.zeros(args.out_dim))
    optimizer = torch.optim.AdamW(student.parameters(), lr=1e-3)
    history = []
    for _ in range(15):
        total, cls_loss, patch_loss, _ = pretrain_toy.losses(student, teacher, views, masks, corr, centers, args)
        history.append((total.item(), cls_loss.item(), patch_loss.item()))
        optimizer.zero_grad()
        total.backward()
        optimizer.step()
    first, last = history[0], history[-1]
    assert all(np.isfinite(history).ravel())
    assert last[0] < 0.8 * first[0] and last[1] < first[1] and last[2] < first[2]


def test_view_geometry_maps_pixels_back():
    """view_to_image sends each pixel of a view (crop without resampling, flip, quarter turns) to the
    image pixel it shows; image_to_view inverts it; correspondences pair patches showing one point."""
    image = torch.randint(0, 256, (3, 48, 48), dtype=torch.uint8)
    gen = torch.Generator().manual_seed(0)
    mean, std = torch.tensor(IMAGENET_MEAN), torch.tensor(IMAGENET_STD)
    seen = set()
    while len(seen) < 6:
        view, geometry = random_view(image, 24, (0.25, 0.25), 0.0, True, gen)
        if geometry[2:4] != (24, 24):
            continue
        seen.add(geometry[4:])
        centres = (torch.arange(24, dtype=torch.float64) + 0.5) / 24
        y, x = (c.reshape(-1) for c in torch.meshgrid(centres, centres, indexing="ij"))
        rows, cols = view_to_image(geometry, y, x)
        shown = image[:, rows.long(), cols.long()].float().view(3, 24, 24)
        torch.testing.assert_close((view * std[:, None, None] + mean[:, None, None]) * 255, shown, atol=1e-3, rtol=0)
        back = image_to_view(geometry, rows, cols)
        torch.testing.assert_close(torch.stack(back), torch.stack([y, x]))
        assert torch.equal(correspondences(geometry, geometry, 3), torch.arange(9))
    shifted = (10, 20, 16, 16, False, 0)
    corr = correspondences((10, 12, 16, 16, False, 0), shifted, 2)
    assert corr.tolist() == [-1, 0, -1, 2]  # the right half of the first view is the left half of the second


def test_seed_decides_every_draw(image_dir, tmp_path):
    pretrain(image_dir, tmp_path / "a.pth", "--epochs", "2", "--seed", "3")
    pretrain(image_dir, tmp_path / "b.pth", "--epochs", "2", "--seed", "3")
    pretrain(image_dir, tmp_path / "c.pth", "--epochs", "2", "--seed", "4")
    assert_same(weights(tmp_path / "a.pth"), weights(tmp_path / "b.pth"))
    a, c = weights(tmp_path / "a.pth"), weights(tmp_path / "c.pth")
    assert not torch.equal(a["blocks.0.attn.qkv.weight"], c["blocks.0.attn.qkv.weight"])


def test_resume_equals_uninterrupted(image_dir, tmp_path):
    pretrain(image_dir, tmp_path / "straight.pth", "--epochs", "3")
    out = tmp_path / "resumed.pth"
    pretrain(image_dir, out, "--epochs", "3", "--max_steps", "3")
    assert not out.exists() and os.path.isfile(pretrain_toy.state_path(str(out)))
    with pytest.raises(SystemExit, match="flags changed: lr"):
        pretrain(image_dir, out, "--epochs", "3", "--resume", "yes", "--lr", "2e-3")
    history = pretrain(image_dir, out, "--epochs", "3", "--resume", "yes")
    assert [record["step"] for record in history] == list(range(1, 7))
    assert_same(weights(tmp_path / "straight.pth"), weights(out))
    assert not os.path.exists(pretrain_toy.state_path(str(out)))  # a finished run leaves no state
    with pytest.raises(SystemExit, match="no state"):
        pretrain(image_dir, out, "--resume", "yes")


def test_saved_file_is_a_dino_checkpoint(image_dir, tmp_path):
    out = tmp_path / "toy_vit_dino.pth"
    pretrain(image_dir, out, "--epochs", "1", "--half", "--centre_tokens", "24")
    state_dict = weights(out)
    assert all(value.dtype == torch.float16 for value in state_dict.values())
    assert {"cls_token", "pos_embed", "patch_embed.proj.weight", "blocks.0.attn.qkv.weight", "norm.weight"} <= set(
        state_dict
    )
    assert not any(key.startswith(("head", "mask_token")) for key in state_dict)
    assert detect_family(state_dict) == "dino"
    backbone = load_backbone(str(out))
    assert (backbone.family, backbone.embed_dim, backbone.patch_size) == ("dino", 32, 8)
    tokens = backbone(torch.randn(2, 3, 40, 24))
    assert tokens.shape == (2, 5 * 3, 32) and torch.isfinite(tokens).all()
    # --centre_tokens 24: the training images' tokens at 24 px, as the stages compute them, have mean ~0
    transform = SegmentationTransform(24, "center", backbone.mean, backbone.std)
    images = [Image.open(os.path.join(image_dir, name)).convert("RGB") for name in sorted(os.listdir(image_dir))]
    tokens = torch.cat([backbone(transform(image, None)[0][None])[0] for image in images])
    assert tokens.mean(0).abs().max() < 0.02 * tokens.std()
    # the record beside the weights: flags, the file's sha256 and the tokens it gives
    record = json.load(open(pretrain_toy.record_path(str(out))))
    assert record["flags"]["half"] and record["flags"]["epochs"] == 1 and record["seconds"] >= 0
    assert record["sha256"] == hashlib.sha256(out.read_bytes()).hexdigest()
    assert record["fingerprint"] == pretrain_toy.fingerprint(str(out))
    assert len(record["fingerprint"]["first"]) == 4 and record["fingerprint"]["mean_abs"] > 0


SHIPPED = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "weights", "toy_vit_dino.pth")


def test_the_shipped_backbone_is_the_default_recipes_and_gives_its_recorded_tokens():
    """weights/toy_vit_dino.pth: made by `python pretrain_toy.py` with today's defaults (fp16, nothing else
    changed), unaltered since (sha256), and it still loads as a DINO ViT giving the tokens recorded at saving."""
    record = json.load(open(pretrain_toy.record_path(SHIPPED)))
    with open(SHIPPED, "rb") as f:
        assert hashlib.sha256(f.read()).hexdigest() == record["sha256"]
    defaults = vars(pretrain_toy.parser().parse_args([]))
    changed = {
        k
        for k, v in record["flags"].items()
        if v != (list(defaults[k]) if isinstance(defaults[k], tuple) else defaults[k])
    }
    assert changed == {"half", "out"} and record["flags"]["half"]
    backbone = load_backbone(SHIPPED)
    assert (backbone.family, backbone.embed_dim, backbone.patch_size) == ("dino", 192, 16)
    got = pretrain_toy.fingerprint(SHIPPED)
    assert np.allclose(got["first"], record["fingerprint"]["first"], atol=1e-5)
    assert abs(got["mean_abs"] - record["fingerprint"]["mean_abs"]) < 1e-5


def test_parts_world_is_seeded_and_labelled(tmp_path):
    first = parts_sample(np.random.default_rng([1, 0, 2]), 40, 6)
    second = parts_sample(np.random.default_rng([1, 0, 2]), 40, 6)
    other = parts_sample(np.random.default_rng([1, 0, 3]), 40, 6)
    assert all(np.array_equal(a, b) for a, b in zip(first, second))
    assert not np.array_equal(first[0], other[0])
    image, label = first
    assert image.shape == (40, 40, 3) and image.dtype == np.uint8
    assert label.shape == (40, 40) and label.dtype == np.uint8 and label.max() < len(PARTS_CLASS_NAMES)
    for n_classes in (2, 4):
        assert parts_sample(np.random.default_rng(n_classes), 32, n_classes)[1].max() < n_classes


def test_worlds_live_side_by_side(tmp_path):
    tiny = dict(n_train=2, n_val=1, size=32)
    textures = ensure_toy(str(tmp_path), **tiny)
    parts = ensure_toy(str(tmp_path), world="parts", **tiny)
    assert textures == toy_dir(str(tmp_path)) == str(tmp_path / "toy")
    assert parts == toy_dir(str(tmp_path), "parts") == str(tmp_path / "toy_parts")
    again = ensure_toy(str(tmp_path / "again"), world="parts", **tiny)
    for split, kind, name in (("train", "images", "00001.png"), ("val", "labels", "00000.png")):
        with (
            open(os.path.join(parts, split, kind, name), "rb") as f,
            open(os.path.join(again, split, kind, name), "rb") as g,
        ):
            assert f.read() == g.read()
    labels = np.array(Image.open(os.path.join(parts, "train", "labels", "00000.png")))
    assert labels.max() < 6
    assert set(TOY_WORLDS) == {"textures", "parts"}
    with pytest.raises(ValueError, match="unknown toy world"):
        ensure_toy(str(tmp_path), world="nope")
