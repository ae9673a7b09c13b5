"""Self-supervised pre-training of a small ViT on the toy images, without labels.

DINO self-distillation (Caron et al. 2021) with a patch-level objective: a student ViT and its EMA
teacher see multi-crop views (random crops, flips, quarter turns, colour jitter) of the training
images. The student's CLS output on every crop predicts the teacher's centred and sharpened CLS
output on the other global crop (DINO). Its patch outputs on the two global crops predict the
teacher's patch outputs in two ways, averaged: for the same patch unmasked where the student's
patch was masked (iBOT, Zhou et al. 2022), and for the patch of the other global crop that shows the
same image point (the two global crops overlap by construction). One projection head serves all.

The teacher backbone is written in the official DINO layout (a plain state dict: ``cls_token``,
``pos_embed``, ``patch_embed.proj.*``, ``blocks.i.*``, ``norm.*``), so every stage loads it with
``--ckpt``. By default the mean patch token of the training images is folded into the final norm's
bias, so that the tokens the stages see are centred (``--centre_tokens``; docs/toy_backbone.md):

    python pretrain_toy.py --data_dir data --out checkpoint/toy_vit_dino.pth
    python train_mediator.py --dataset toy --data_dir data --ckpt checkpoint/toy_vit_dino.pth ...

Every random draw (weights, image order, crops, jitter, masks) follows from ``--seed``, so a CPU
run with a fixed ``--threads`` is reproducible bit for bit, and ``--resume`` continues one exactly.
Beside the weights it writes ``<out>.json``: the flags, the seconds, the file's sha256 and the tokens
it gives on one fixed toy picture. ``weights/toy_vit_dino.pth`` was made with ``--half`` and nothing else.
"""

import argparse
import copy
import glob
import json
import math
import os
import tempfile
import time

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from PIL import Image
from timm.models.vision_transformer import VisionTransformer
from tqdm import tqdm

from loader.toy import TOY_WORLDS, ensure_toy, toy_sample
from loader.transforms import SegmentationTransform
from loader.views import correspondences, patch_masks, random_view
from models.backbone import load_backbone
from utils.atomic import atomic_torch_save, atomic_write_bytes

# Flags that may change between a run and its resumption.
RESUME_FREE = ("resume", "save_every", "max_steps", "threads")


class HelpFormatter(argparse.RawDescriptionHelpFormatter, argparse.ArgumentDefaultsHelpFormatter):
    """The module docstring as written, and every flag's default."""


# Flags by group: (name, default, help[, extra argparse keywords]); the type follows the default
# (a bool is a --flag / --no-flag pair, a pair of numbers takes two).
FLAGS = {
    "data": [
        ("data_dir", "data", "toy dataset root (generated on first use)"),
        ("world", "textures", "toy world to train on", {"choices": TOY_WORLDS}),
        ("image_dir", "", "train on the PNG images of this folder instead of the toy world's train split"),
    ],
    "model": [
        ("embed_dim", 192, "ViT width"),
        ("depth", 6, "ViT blocks"),
        ("patch_size", 16, "ViT patch size"),
        ("out_dim", 256, "prototypes of the projection head"),
    ],
    "views": [
        ("global_size", 128, "side of the two global crops (the native grid of the position table)"),
        ("local_size", 64, "side of the local crops"),
        ("local_crops", 4, "local crops per image"),
        ("global_scale", (0.15, 0.5), "area range of the global crops, fractions of the image"),
        ("local_scale", (0.03, 0.15), "area range of the local crops"),
        ("jitter", 0.3, "brightness / contrast / saturation jitter amplitude"),
        ("rotate", True, "random quarter turns (the toy classes have no upright)"),
        ("mask_ratio", (0.1, 0.5), "range of the masked fraction of a masked global crop's patches"),
        ("mask_prob", 0.5, "probability that a student global crop is masked"),
    ],
    "optimisation": [
        ("epochs", 20, "passes over the training images"),
        ("batch_size", 16, "images per step"),
        ("lr", 1e-3, "peak AdamW learning rate (linear warm-up, then cosine)"),
        ("warmup_epochs", 1.0, "epochs of learning-rate warm-up"),
        ("weight_decay", 0.04, "AdamW weight decay"),
        ("grad_clip", 3.0, "gradient-norm clip, 0 = none"),
        ("momentum", 0.99, "initial teacher EMA momentum (cosine to 1)"),
        ("teacher_temp", 0.04, "teacher softmax temperature"),
        ("student_temp", 0.1, "student softmax temperature"),
        ("center_momentum", 0.9, "EMA momentum of the teacher centres"),
        ("freeze_prototypes", 1.0, "epochs the prototypes stay fixed"),
        ("patch_weight", 1.0, "weight of the patch loss (0 = DINO alone)"),
        ("seed", 0, "seed of every random draw"),
        ("threads", 1, "CPU threads (a run is bit-reproducible for a fixed count)"),
    ],
    "output": [
        ("out", "checkpoint/toy_vit_dino.pth", "teacher backbone, DINO layout"),
        ("half", False, "write the weights as fp16"),
        ("centre_tokens", 320, "if > 0: fold the mean patch token of the training images at this resolution "
         "(resized as the stages resize them) into the final norm's bias, so that the tokens are centred"),
        ("resume", "no", "continue from <out>.state.pt: no = start over, yes = resume (error if there is none), "
         "auto = resume when there is one", {"choices": ("no", "yes", "auto")}),
        ("save_every", 50, "save the resumable state every N steps (0 = only when stopped early)"),
        ("max_steps", 0, "stop after this global step, schedules unchanged (0 = run to the end)"),
    ],
}  # fmt: skip


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=HelpFormatter)
    for title, flags in FLAGS.items():
        group = p.add_argument_group(title)
        for name, default, text, *extra in flags:
            kwargs = {"default": default, "help": text, **(extra[0] if extra else {})}
            if isinstance(default, bool):
                kwargs["action"] = argparse.BooleanOptionalAction
            else:
                kwargs["type"] = type(default[0]) if isinstance(default, tuple) else type(default)
                kwargs["nargs"] = 2 if isinstance(default, tuple) else None
            group.add_argument(f"--{name}", **kwargs)
    return p


def load_images(image_dir: str) -> torch.Tensor:
    """Every PNG of ``image_dir``, sorted by name: uint8 [N, 3, H, W]."""
    paths = sorted(glob.glob(os.path.join(image_dir, "*.png")))
    if not paths:
        raise SystemExit(f"pretrain_toy.py: no .png images in {image_dir}")
    return torch.from_numpy(np.stack([np.asarray(Image.open(p).convert("RGB")) for p in paths])).permute(0, 3, 1, 2)


class ProjectionHead(nn.Module):
    """DINO's head: 3-layer MLP, L2-normalised bottleneck, cosine scores against fixed-norm prototypes.

    x [..., D] -> logits [..., out_dim]
    """

    def __init__(self, dim: int, out_dim: int, hidden: int = 512, bottleneck: int = 128):
        super().__init__()
        self.mlp = nn.Sequential(
            nn.Linear(dim, hidden), nn.GELU(), nn.Linear(hidden, hidden), nn.GELU(), nn.Linear(hidden, bottleneck)
        )
        self.prototypes = nn.Parameter(torch.randn(out_dim, bottleneck) * 0.02)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(F.normalize(self.mlp(x), dim=-1), F.normalize(self.prototypes, dim=-1))


class Network(nn.Module):
    """ViT backbone (with a mask token for masked patches, not part of the saved weights) and head."""

    def __init__(self, args):
        super().__init__()
        self.vit = VisionTransformer(
            img_size=args.global_size, patch_size=args.patch_size, embed_dim=args.embed_dim, depth=args.depth,
            num_heads=max(1, args.embed_dim // 64), num_classes=0, global_pool="", dynamic_img_size=True,
        )  # fmt: skip
        self.mask_token = nn.Parameter(torch.zeros(args.embed_dim))
        self.head = ProjectionHead(args.embed_dim, args.out_dim)

    def forward(self, img: torch.Tensor, mask: torch.Tensor | None = None):
        """img [B, 3, S, S], mask bool [B, N] or None -> (CLS logits [B, K], patch logits [B, N, K])."""
        x = self.vit.patch_embed(img)  # [B, h, w, D]
        if mask is not None:
            x = torch.where(mask.view(x.shape[:3])[..., None], self.mask_token.to(x.dtype), x)
        x = self.vit.norm(self.vit.blocks(self.vit._pos_embed(x)))  # timm's CLS + interpolated positions
        out = self.head(x)
        return out[:, 0], out[:, 1:]

    def dino_state_dict(self) -> dict[str, torch.Tensor]:
        """The backbone as DINO publishes it: a plain fp32 state dict of the ViT, no head."""
        return {k: v.float().clone() for k, v in self.vit.state_dict().items()}


def cross_entropy(teacher_probs: torch.Tensor, student_logits: torch.Tensor, temp: float) -> torch.Tensor:
    """-sum p_t log p_s over the last axis: [..., K], [..., K] -> [...]."""
    return -(teacher_probs * F.log_softmax(student_logits / temp, dim=-1)).sum(-1)


def losses(student, teacher, views, masks, corr, centers, args):
    """DINO loss on the CLS outputs of all crops; patch loss on the global crops.

    The patch loss has two terms: iBOT's (a masked student patch predicts the teacher's output for the
    same patch unmasked) and a cross-view one (a student patch predicts the teacher's output for the patch
    of the other global view that shows the same image point), averaged.
    views: (globals [2B, 3, G, G], locals [LB, 3, L, L]); masks, corr: [2B, N] (``batch_views``);
    centers: (cls [K], patch [K]). Returns (total, cls loss, patch loss, teacher means to update centres).
    """
    globals_, locals_ = views
    with torch.no_grad():
        t_cls, t_patch = teacher(globals_)
        t_cls_probs = F.softmax((t_cls - centers[0]) / args.teacher_temp, dim=-1).chunk(2)
        t_patch_probs = F.softmax((t_patch - centers[1]) / args.teacher_temp, dim=-1)
        other = t_patch_probs.roll(len(globals_) // 2, dims=0)  # row b holds the other global view of b's image
        t_matched = other.gather(1, corr.clamp(min=0)[..., None].expand(-1, -1, other.shape[-1]))
    s_cls, s_patch = student(globals_, masks)
    s_cls = s_cls.chunk(2) + (student(locals_)[0].chunk(args.local_crops) if args.local_crops else ())
    terms = [cross_entropy(t, s, args.student_temp).mean() for i, t in enumerate(t_cls_probs)
             for j, s in enumerate(s_cls) if i != j]  # fmt: skip
    cls_loss = torch.stack(terms).mean()
    patch_terms = []
    for target, weight in ((t_patch_probs, masks), (t_matched, corr >= 0)):
        if weight.any():
            per_patch = cross_entropy(target, s_patch, args.student_temp)
            patch_terms.append((per_patch * weight).sum() / weight.sum())
    patch_loss = torch.stack(patch_terms).mean() if patch_terms else 0 * cls_loss
    total = cls_loss + args.patch_weight * patch_loss
    return total, cls_loss, patch_loss, (t_cls.mean(0), t_patch.mean((0, 1)))


def cosine(step: int, total: int, start: float, end: float, warmup: int = 0) -> float:
    """Linear warm-up from 0 to ``start`` over ``warmup`` steps, then cosine from ``start`` to ``end``."""
    if step < warmup:
        return start * (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return end + (start - end) * 0.5 * (1 + math.cos(math.pi * progress))


def batch_views(images, order, step, args):
    """The views of global step ``step``, drawn from a generator seeded by (seed, step).

    Returns ((globals [2B, 3, G, G], locals [LB, 3, L, L]), masks bool [2B, N], correspondences long
    [2B, N]: for each global-view patch, the patch of the image's other global view showing its centre, or -1).
    The second global view of an image is centred inside the first, so the two overlap.
    """
    gen = torch.Generator().manual_seed(args.seed * 1_000_003 + step)
    grid = args.global_size // args.patch_size

    def view(i, size, scale, near=None):
        return random_view(images[i], size, scale, args.jitter, args.rotate, gen, near)

    first, second = [], []
    for i in order:
        first.append(view(i, args.global_size, args.global_scale))
        second.append(view(i, args.global_size, args.global_scale, near=first[-1][1]))
    local_views = [view(i, args.local_size, args.local_scale)[0] for _ in range(args.local_crops) for i in order]
    masks = patch_masks(2 * len(order), grid, args.mask_ratio, args.mask_prob, gen)
    corr = [correspondences(a[1], b[1], grid) for a, b in (*zip(first, second), *zip(second, first))]
    globals_ = torch.stack([view for view, _ in first + second])
    return (globals_, torch.stack(local_views) if local_views else torch.empty(0)), masks, torch.stack(corr)


@torch.no_grad()
def token_mean(weights: dict[str, torch.Tensor], image_dir: str, resolution: int) -> torch.Tensor:
    """Mean patch token [D] of the DINO-layout ``weights`` over the images of ``image_dir``, each
    resized and normalised as the stages do (``loader.transforms``, centre crop) and encoded by
    ``models.backbone`` (DINO's position rule): exactly the tokens the stages see."""
    with tempfile.TemporaryDirectory() as tmp:
        torch.save(weights, os.path.join(tmp, "weights.pth"))
        backbone = load_backbone(os.path.join(tmp, "weights.pth"), family="dino")
    transform = SegmentationTransform(resolution, "center", backbone.mean, backbone.std)
    total = torch.zeros(backbone.embed_dim, dtype=torch.float64)
    count = 0
    for path in sorted(glob.glob(os.path.join(image_dir, "*.png"))):
        tokens = backbone(transform(Image.open(path).convert("RGB"), None)[0][None])[0]
        total += tokens.double().sum(0)
        count += tokens.shape[0]
    return (total / count).float()


def state_path(out: str) -> str:
    return out + ".state.pt"


def record_path(out: str) -> str:
    """``a/toy_vit_dino.pth`` -> ``a/toy_vit_dino.json``: what made the weights, and what they give."""
    return os.path.splitext(out)[0] + ".json"


@torch.no_grad()
def fingerprint(path: str) -> dict:
    """Tokens of the backbone saved at ``path`` on one fixed picture (the textures world's sample of seed 0,
    64 px, through the stages' transform): the first 8 values of the first 4 tokens and the mean absolute
    token. A file that gives them again is the recorded one, however it was stored."""
    backbone = load_backbone(path, family="dino")
    transform = SegmentationTransform(64, "center", backbone.mean, backbone.std)
    image = transform(Image.fromarray(toy_sample(np.random.default_rng(0), 64, 6)[0]), None)[0]
    tokens = backbone(image[None])[0].double()
    return {"first": [[round(v, 6) for v in row] for row in tokens[:4, :8].tolist()],
            "mean_abs": round(float(tokens.abs().mean()), 6)}  # fmt: skip


def write_record(args, sha256: str, seconds: float) -> None:
    """``record_path(args.out)``: the flags (the thread count included), this run's seconds, the file's sha256 and
    :func:`fingerprint`."""
    flags = {k: v for k, v in vars(args).items() if k == "threads" or k not in RESUME_FREE}
    record = {"flags": flags, "seconds": round(seconds), "sha256": sha256, "fingerprint": fingerprint(args.out)}
    atomic_write_bytes(record_path(args.out), json.dumps(record, indent=1).encode())


def train(args) -> list[dict]:
    """Pre-train and write ``args.out`` (or the resumable state when stopped early); -> the per-step losses."""
    torch.manual_seed(args.seed)
    image_dir = args.image_dir or os.path.join(ensure_toy(args.data_dir, world=args.world), "train", "images")
    images = load_images(image_dir)
    student = Network(args)
    teacher = copy.deepcopy(student).requires_grad_(False)
    named = list(student.named_parameters())
    decayed = [p.ndim > 1 and "token" not in n and "pos_embed" not in n for n, p in named]
    optimizer = torch.optim.AdamW(
        [{"params": [p for (_, p), d in zip(named, decayed) if d == flag], "weight_decay": wd}
         for flag, wd in ((True, args.weight_decay), (False, 0.0))]
    )  # fmt: skip
    centers = (torch.zeros(args.out_dim), torch.zeros(args.out_dim))
    steps_per_epoch = len(images) // args.batch_size
    if steps_per_epoch < 1:
        raise SystemExit(f"pretrain_toy.py: {len(images)} images is fewer than one batch of {args.batch_size}")
    total, step, history = args.epochs * steps_per_epoch, 0, []
    flags = {k: v for k, v in vars(args).items() if k not in RESUME_FREE}
    modules = {"student": student, "teacher": teacher, "optimizer": optimizer}
    state_file = state_path(args.out)
    if args.resume == "yes" and not os.path.isfile(state_file):
        raise SystemExit(f"pretrain_toy.py: --resume yes but there is no state {state_file}")
    if args.resume != "no" and os.path.isfile(state_file):
        state = torch.load(state_file, map_location="cpu", weights_only=False)
        changed = sorted(k for k in flags if state["flags"].get(k) != flags[k])
        if changed:
            raise SystemExit(f"pretrain_toy.py: cannot resume {state_file}: flags changed: {', '.join(changed)}")
        for name, module in modules.items():
            module.load_state_dict(state[name])
        centers, step, history = state["centers"], state["step"], state["history"]

    def save_state():
        state = {name: module.state_dict() for name, module in modules.items()}
        atomic_torch_save(state | {"centers": centers, "step": step, "history": history, "flags": flags}, state_file)

    last, started = min(total, args.max_steps or total), time.time()
    bar = tqdm(total=last, initial=step, desc="[pretrain toy]", dynamic_ncols=True)
    while step < last:
        epoch, position = divmod(step, steps_per_epoch)
        order = torch.randperm(len(images), generator=torch.Generator().manual_seed(args.seed * 7919 + epoch))
        batch = order[position * args.batch_size : (position + 1) * args.batch_size]
        views, masks, corr = batch_views(images, batch, step, args)
        for group in optimizer.param_groups:
            group["lr"] = cosine(step, total, args.lr, 1e-6, round(args.warmup_epochs * steps_per_epoch))
        loss, cls_loss, patch_loss, means = losses(student, teacher, views, masks, corr, centers, args)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if epoch < args.freeze_prototypes:
            student.head.prototypes.grad = None
        if args.grad_clip > 0:
            nn.utils.clip_grad_norm_(student.parameters(), args.grad_clip)
        optimizer.step()
        momentum, c = cosine(step, total, args.momentum, 1.0), args.center_momentum
        with torch.no_grad():
            for p_teacher, p_student in zip(teacher.parameters(), student.parameters()):
                p_teacher.mul_(momentum).add_(p_student.detach(), alpha=1 - momentum)
            centers = tuple(center * c + mean * (1 - c) for center, mean in zip(centers, means))
        step += 1
        history.append({"step": step, "loss": loss.item(), "cls": cls_loss.item(), "patch": patch_loss.item()})
        bar.update(1)
        bar.set_postfix({k: f"{v:.3f}" for k, v in history[-1].items() if k != "step"})
        if args.save_every and step % args.save_every == 0 and step < last:
            save_state()
    bar.close()
    if step < total:
        save_state()
        print(f"[pretrain toy] stopped at step {step}/{total}; --resume yes continues from {state_file}")
        return history
    weights = teacher.dino_state_dict()
    if args.centre_tokens:
        weights["norm.bias"] -= token_mean(weights, image_dir, args.centre_tokens)
    sha256 = atomic_torch_save({k: v.half() if args.half else v for k, v in weights.items()}, args.out)
    if os.path.isfile(state_file):
        os.remove(state_file)
    write_record(args, sha256, time.time() - started)
    print(f"[pretrain toy] {total} steps ({time.time() - started:.0f} s); DINO-layout teacher written to {args.out}")
    return history


def main(argv=None):
    args = parser().parse_args(argv)
    torch.set_num_threads(args.threads)
    for name in ("global_scale", "local_scale", "mask_ratio"):
        setattr(args, name, tuple(getattr(args, name)))
    if args.global_size % args.patch_size or args.local_size % args.patch_size:
        raise SystemExit("pretrain_toy.py: --global_size and --local_size must be multiples of --patch_size")
    return train(args)


if __name__ == "__main__":
    main()
