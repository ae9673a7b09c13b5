import hashlib
import json
import math
import os

import numpy as np
import pytest
import torch
from PIL import Image

import pretrain_toy
from loader.toy import PARTS_CLASS_NAMES, TOY_WORLDS, ensure_toy, parts_sample, toy_dir
from loader.transforms import SegmentationTransform
from loader.views import correspondences, image_to_view, patch_masks, random_view, view_to_image
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


def literal_losses(student, teacher, views, masks, corr, centers, args):
    """The objective written out one image, one view pair and one patch at a time: (total, cls, patch)."""
    globals_, locals_ = views
    n = len(globals_) // 2  # images; global view v of image b is row v * n + b, local crop l is row l * n + b
    with torch.no_grad():
        t_cls, t_patch = teacher(globals_)
    s_cls, s_patch = student(globals_, masks)
    s_local = student(locals_)[0]

    def ce(teacher_logits, center, student_logits):
        p = torch.softmax((teacher_logits - center) / args.teacher_temp, dim=-1)
        return -(p * torch.log_softmax(student_logits / args.student_temp, dim=-1)).sum()

    students = [s_cls[v * n : (v + 1) * n] for v in range(2)]  # per view: its n images' outputs
    students += [s_local[c * n : (c + 1) * n] for c in range(args.local_crops)]
    cls_terms = [ce(t_cls[i * n + b], centers[0], students[j][b]) for i in range(2) for j in range(len(students))
                 if j != i for b in range(n)]  # fmt: skip
    masked, matched = [], []
    for row in range(2 * n):
        other = (row + n) % (2 * n)  # the image's other global view
        for k in range(masks.shape[1]):
            if masks[row, k]:
                masked.append(ce(t_patch[row, k], centers[1], s_patch[row, k]))
            if corr[row, k] >= 0:
                matched.append(ce(t_patch[other, corr[row, k]], centers[1], s_patch[row, k]))
    cls_loss = torch.stack(cls_terms).mean()
    patch_loss = (torch.stack(masked).mean() + torch.stack(matched).mean()) / 2
    return cls_loss + args.patch_weight * patch_loss, cls_loss, patch_loss


def test_losses_equal_the_literal_recipe(image_dir):
    """CLS loss over every (teacher global, other student view) pair, local crops included; patch loss of the
    masked patches and of the matched patches of the other global view."""
    args = pretrain_toy.parser().parse_args(["--image_dir", image_dir, *TINY_MODEL, "--patch_weight", "0.7"])
    torch.manual_seed(1)
    student, teacher = pretrain_toy.Network(args), pretrain_toy.Network(args)
    torch.nn.init.normal_(student.mask_token)
    views, masks, corr = pretrain_toy.batch_views(pretrain_toy.load_images(image_dir), range(4), 3, args)
    assert masks.any() and (corr >= 0).any() and args.local_crops == 2
    centers = (0.1 * torch.randn(args.out_dim), 0.1 * torch.randn(args.out_dim))
    ours = pretrain_toy.losses(student, teacher, views, masks, corr, centers, args)[:3]
    for value, literal in zip(ours, literal_losses(student, teacher, views, masks, corr, centers, args), strict=True):
        torch.testing.assert_close(value, literal, rtol=1e-5, atol=1e-6)


def test_training_steps_follow_the_literal_recipe(image_dir, tmp_path):
    """Three steps of pretrain_toy.py (warm-up then cosine, prototypes frozen in the first epoch, gradients
    clipped) leave the student, teacher and centres of a literal AdamW + EMA loop written out here."""
    flags = ["--epochs", "2", "--warmup_epochs", "1", "--freeze_prototypes", "1", "--grad_clip", "0.05"]
    pretrain(image_dir, tmp_path / "toy.pth", *flags, "--max_steps", "3")
    saved = torch.load(str(tmp_path / "toy.pth") + ".state.pt", map_location="cpu", weights_only=False)

    args = pretrain_toy.parser().parse_args(["--image_dir", image_dir, *TINY_MODEL, *flags])
    torch.manual_seed(args.seed)
    images = pretrain_toy.load_images(image_dir)
    student = pretrain_toy.Network(args)
    teacher = pretrain_toy.Network(args)
    teacher.load_state_dict(student.state_dict())
    decayed = {n: p.ndim > 1 and "token" not in n and "pos_embed" not in n for n, p in student.named_parameters()}
    groups = [[p for n, p in student.named_parameters() if decayed[n] == flag] for flag in (True, False)]
    optimizer = torch.optim.AdamW(
        [{"params": groups[0], "weight_decay": args.weight_decay}, {"params": groups[1], "weight_decay": 0.0}]
    )
    centers = (torch.zeros(args.out_dim), torch.zeros(args.out_dim))
    per_epoch, total = 2, 4  # 8 images, batches of 4, 2 epochs
    for step in range(3):
        epoch = step // per_epoch
        order = torch.randperm(8, generator=torch.Generator().manual_seed(args.seed * 7919 + epoch))
        batch = order[(step % per_epoch) * 4 : (step % per_epoch + 1) * 4]
        views, masks, corr = pretrain_toy.batch_views(images, batch, step, args)
        if step < per_epoch:  # linear warm-up over one epoch
            lr = args.lr * (step + 1) / per_epoch
        else:
            lr = 1e-6 + (args.lr - 1e-6) * 0.5 * (1 + math.cos(math.pi * (step - per_epoch) / (total - per_epoch)))
        for group in optimizer.param_groups:
            group["lr"] = lr
        loss, _, _, means = pretrain_toy.losses(student, teacher, views, masks, corr, centers, args)
        optimizer.zero_grad()
        loss.backward()
        if epoch < 1:  # --freeze_prototypes 1
            student.head.prototypes.grad = None
        torch.nn.utils.clip_grad_norm_(student.parameters(), 0.05)
        optimizer.step()
        momentum = 1.0 + (args.momentum - 1.0) * 0.5 * (1 + math.cos(math.pi * step / total))
        with torch.no_grad():
            for t, s in zip(teacher.parameters(), student.parameters()):
                t.copy_(momentum * t + (1 - momentum) * s)
        centers = tuple(args.center_momentum * c + (1 - args.center_momentum) * m for c, m in zip(centers, means))
    assert saved["step"] == 3
    for name, network in (("student", student), ("teacher", teacher)):
        for key, value in network.state_dict().items():
            torch.testing.assert_close(
                saved[name][key], value, rtol=1e-5, atol=1e-6, msg=lambda m: f"{name} {key}: {m}"
            )
    for ours, literal in zip(saved["centers"], centers, strict=True):
        torch.testing.assert_close(ours, literal, rtol=1e-5, atol=1e-6)


def test_masked_patches_see_the_mask_token_only(image_dir):
    """With every patch masked the network sees no pixel: two different pictures give the same outputs."""
    args = pretrain_toy.parser().parse_args(["--image_dir", image_dir, *TINY_MODEL])
    torch.manual_seed(0)
    network = pretrain_toy.Network(args)
    img = torch.randn(2, 3, args.global_size, args.global_size)
    grid = (args.global_size // args.patch_size) ** 2
    cls, patch = network(img, torch.ones(2, grid, dtype=torch.bool))
    torch.testing.assert_close(cls[0], cls[1])
    torch.testing.assert_close(patch[0], patch[1])
    cls, patch = network(img, torch.zeros(2, grid, dtype=torch.bool))
    assert not torch.allclose(patch[0], patch[1])
    torch.testing.assert_close(network(img)[1], patch)


def test_pair_flags_take_two_values():
    args = pretrain_toy.parser().parse_args(["--global_scale", "0.2", "0.6", "--mask_ratio", "0.3", "0.4"])
    assert args.global_scale == [0.2, 0.6] and args.mask_ratio == [0.3, 0.4]
    assert pretrain_toy.parser().parse_args([]).local_scale == (0.03, 0.15)


def test_colour_jitter_is_brightness_contrast_saturation_in_that_order():
    """A jittered view equals the same crop unjittered, then scaled in brightness, contrast about its mean and
    saturation about its luma, with the factors 1 + jitter * U(-1, 1) drawn after the geometry."""
    image = torch.randint(60, 200, (3, 40, 52), generator=torch.Generator().manual_seed(0), dtype=torch.uint8)
    mean, std = torch.tensor(IMAGENET_MEAN)[:, None, None], torch.tensor(IMAGENET_STD)[:, None, None]

    def view(jitter):
        out, geometry = random_view(image, 16, (0.3, 0.6), jitter, True, torch.Generator().manual_seed(7))
        return out * std + mean, geometry

    (plain, geometry), (jittered, same) = view(0.0), view(0.4)
    assert same == geometry
    draws = torch.Generator().manual_seed(7)
    torch.rand(7, generator=draws)
    brightness, contrast, saturation = (1 + 0.4 * (2 * torch.rand(3, generator=draws) - 1)).tolist()
    expected = plain * brightness
    expected = (expected - expected.mean()) * contrast + expected.mean()
    luma = 0.299 * expected[0] + 0.587 * expected[1] + 0.114 * expected[2]
    expected = ((expected - luma) * saturation + luma).clamp(0, 1)
    assert min(abs(brightness - 1), abs(contrast - 1), abs(saturation - 1)) > 0.01
    torch.testing.assert_close(jittered, expected, rtol=0, atol=1e-5)


def test_patch_masks_mask_a_share_of_crops_within_the_ratio():
    masks = patch_masks(4000, 4, (0.25, 0.5), 0.3, torch.Generator().manual_seed(0))
    counts = masks.sum(1)
    assert masks.shape == (4000, 16) and abs((counts > 0).float().mean().item() - 0.3) < 0.03
    assert counts[counts > 0].min() >= 4 and counts.max() <= 8  # 25 % to 50 % of 16 patches
    assert not patch_masks(50, 4, (0.25, 0.5), 0.0, torch.Generator().manual_seed(0)).any()


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


def test_resume_equals_uninterrupted(image_dir, tmp_path, monkeypatch, capsys):
    pretrain(image_dir, tmp_path / "straight.pth", "--epochs", "3")
    out = tmp_path / "resumed.pth"
    saves = []
    save = pretrain_toy.atomic_torch_save
    monkeypatch.setattr(
        pretrain_toy, "atomic_torch_save", lambda obj, path: saves.append(obj.get("step")) or save(obj, path)
    )
    pretrain(image_dir, out, "--epochs", "3", "--max_steps", "3", "--save_every", "2")
    assert saves == [2, 3]  # every --save_every steps, and where it stopped
    assert not out.exists() and os.path.isfile(pretrain_toy.state_path(str(out)))
    assert f"stopped at step 3/6; --resume yes continues from {out}.state.pt" in capsys.readouterr().out
    with pytest.raises(SystemExit, match="flags changed: lr"):
        pretrain(image_dir, out, "--epochs", "3", "--resume", "yes", "--lr", "2e-3")
    # A pair flag given as its default is the same flag as the default it was started with.
    history = pretrain(image_dir, out, "--epochs", "3", "--resume", "yes", "--global_scale", "0.15", "0.5")
    assert "6 steps" in capsys.readouterr().out
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
