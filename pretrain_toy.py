"""Self-supervised pre-training of a small ViT on the toy images, without labels.

DINO self-distillation (Caron et al. 2021) with iBOT's masked patch objective (Zhou et al. 2022):
a student ViT and its EMA teacher see multi-crop views of the training images; the student's
CLS output on every crop predicts the teacher's centred and sharpened CLS output on the other
global crop, and its patch outputs on randomly masked global crops predict the teacher's outputs
for the same patches unmasked. Both objectives share one projection head. The teacher backbone
is written in the official DINO layout (a plain state dict: ``cls_token``, ``pos_embed``,
``patch_embed.proj.*``, ``blocks.i.*``, ``norm.*``), so every stage loads it with ``--ckpt``:

    python pretrain_toy.py --data_dir data --out checkpoint/toy_vit_dino.pth
    python train_mediator.py --dataset toy --data_dir data --ckpt checkpoint/toy_vit_dino.pth ...

Every random draw (weights, image order, crops, colour jitter, masks) follows from ``--seed``,
so a CPU run is reproducible bit for bit, and ``--resume`` continues one exactly.
"""

import argparse
import copy
import glob
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
from torchvision.transforms.v2 import functional as TF
from tqdm import tqdm

from loader.toy import TOY_WORLDS, ensure_toy
from loader.transforms import SegmentationTransform
from models.backbone import load_backbone
from models.normalisation import IMAGENET_MEAN, IMAGENET_STD
from utils.atomic import atomic_torch_save

# Flags that may change between a run and its resumption.
RESUME_FREE = ("resume", "save_every", "max_steps", "threads", "device")


def yes_no(value: str) -> bool:
    if value.lower() not in ("yes", "no", "true", "false", "1", "0"):
        raise argparse.ArgumentTypeError(f"expected yes or no, got {value!r}")
    return value.lower() in ("yes", "true", "1")


def parser():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    g = p.add_argument_group("data")
    g.add_argument("--data_dir", default="data", help="toy dataset root (generated on first use)")
    g.add_argument("--world", choices=TOY_WORLDS, default="textures", help="which toy world to train on")
    g.add_argument(
        "--image_dir",
        default=None,
        help="train on the PNG images of this folder instead of the toy world's train split",
    )
    g = p.add_argument_group("model")
    g.add_argument("--embed_dim", type=int, default=192, help="ViT width")
    g.add_argument("--depth", type=int, default=6, help="ViT blocks")
    g.add_argument("--patch_size", type=int, default=16, help="ViT patch size")
    g.add_argument("--out_dim", type=int, default=1024, help="prototypes of the projection head")
    g = p.add_argument_group("views")
    g.add_argument("--global_size", type=int, default=128, help="side of the two global crops (the native grid)")
    g.add_argument("--local_size", type=int, default=64, help="side of the local crops")
    g.add_argument("--local_crops", type=int, default=6, help="local crops per image")
    g.add_argument("--global_scale", type=float, nargs=2, default=(0.15, 0.5), help="area range of global crops")
    g.add_argument("--local_scale", type=float, nargs=2, default=(0.03, 0.15), help="area range of local crops")
    g.add_argument("--jitter", type=float, default=0.3, help="brightness/contrast/saturation jitter amplitude")
    g.add_argument(
        "--rotate", type=yes_no, default=True, help="yes/no: random quarter turns (the toy classes have no upright)"
    )
    g.add_argument("--mask_ratio", type=float, nargs=2, default=(0.1, 0.5), help="range of masked patch fractions")
    g.add_argument("--mask_prob", type=float, default=0.5, help="probability that a student global crop is masked")
    g = p.add_argument_group("optimisation")
    g.add_argument("--epochs", type=int, default=12, help="passes over the training images")
    g.add_argument("--batch_size", type=int, default=16, help="images per step")
    g.add_argument("--lr", type=float, default=5e-4, help="peak AdamW learning rate (cosine, linear warm-up)")
    g.add_argument("--warmup_epochs", type=float, default=1.0, help="epochs of linear learning-rate warm-up")
    g.add_argument("--weight_decay", type=float, default=0.04, help="AdamW weight decay")
    g.add_argument("--grad_clip", type=float, default=3.0, help="gradient-norm clip, 0 = none")
    g.add_argument("--momentum", type=float, default=0.99, help="initial teacher EMA momentum (cosine to 1)")
    g.add_argument("--teacher_temp", type=float, default=0.04, help="teacher softmax temperature")
    g.add_argument("--student_temp", type=float, default=0.1, help="student softmax temperature")
    g.add_argument("--center_momentum", type=float, default=0.9, help="EMA momentum of the teacher centres")
    g.add_argument("--freeze_prototypes", type=float, default=1.0, help="epochs the prototypes stay fixed")
    g.add_argument("--patch_weight", type=float, default=1.0, help="weight of the masked patch loss (0 = DINO)")
    g.add_argument("--seed", type=int, default=0, help="seed of every random draw")
    g.add_argument(
        "--threads", type=int, default=1, help="CPU threads (results are bit-reproducible for a fixed count)"
    )
    g.add_argument("--device", default="cpu", help="cpu or cuda (crops are made on the CPU)")
    g = p.add_argument_group("output")
    g.add_argument("--out", default="checkpoint/toy_vit_dino.pth", help="teacher backbone, DINO layout")
    g.add_argument("--half", action="store_true", help="write the weights as fp16 (half the file size)")
    g.add_argument(
        "--centre_tokens",
        type=int,
        default=0,
        metavar="RES",
        help="if > 0: fold the mean patch token of the training images at this resolution (as the stages "
        "resize them) into the final norm's bias, so that the tokens are centred (0 = keep them as trained)",
    )
    g.add_argument(
        "--resume",
        choices=["no", "yes", "auto"],
        default="no",
        help="continue from <out>.state.pt: no = start over, yes = resume (error if none), auto = when found",
    )
    g.add_argument("--save_every", type=int, default=50, help="save the resumable state every N steps (0 = at end)")
    g.add_argument("--max_steps", type=int, default=None, help="stop after this global step (schedules unchanged)")
    return p


def load_images(image_dir: str) -> torch.Tensor:
    """Every PNG of ``image_dir``, sorted by name: uint8 [N, 3, H, W]."""
    paths = sorted(glob.glob(os.path.join(image_dir, "*.png")))
    if not paths:
        raise SystemExit(f"pretrain_toy.py: no .png images in {image_dir}")
    return torch.from_numpy(np.stack([np.asarray(Image.open(p).convert("RGB")) for p in paths])).permute(0, 3, 1, 2)


def random_view(
    image: torch.Tensor, size: int, scale, jitter: float, rotate: bool, gen: torch.Generator, near=None
) -> tuple[torch.Tensor, tuple]:
    """A random resized crop, flip, quarter-turn and colour jitter of uint8 [3, H, W].

    near: a geometry whose crop box must hold this crop's centre (so that the two overlap).
    Returns (normalised float [3, size, size], geometry (top, left, h, w, flipped, quarter turns)).
    """
    height, width = image.shape[-2:]
    u = torch.rand(7, generator=gen).tolist()
    area = height * width * (scale[0] + (scale[1] - scale[0]) * u[0])
    ratio = math.exp(math.log(3 / 4) + math.log(16 / 9) * u[1])
    h = min(height, round(math.sqrt(area / ratio)))
    w = min(width, round(math.sqrt(area * ratio)))
    if near is None:
        top, left = int(u[2] * (height - h + 1)), int(u[3] * (width - w + 1))
    else:
        top = min(max(0, round(near[0] + u[2] * near[2] - h / 2)), height - h)
        left = min(max(0, round(near[1] + u[3] * near[3] - w / 2)), width - w)
    flipped, turns = u[4] < 0.5, int(u[5] * 4) if rotate else 0
    view = TF.resized_crop(image.float() / 255, top, left, h, w, [size, size], antialias=True)
    if flipped:
        view = view.flip(-1)
    view = torch.rot90(view, turns, dims=(-2, -1))
    brightness, contrast, saturation = (1 + jitter * (2 * torch.rand(3, generator=gen) - 1)).tolist()
    view = view * brightness
    view = (view - view.mean()) * contrast + view.mean()
    gray = (view * torch.tensor([0.299, 0.587, 0.114])[:, None, None]).sum(0, keepdim=True)
    view = ((view - gray) * saturation + gray).clamp(0, 1)
    return TF.normalize(view, IMAGENET_MEAN, IMAGENET_STD), (top, left, h, w, flipped, turns)


def view_to_image(geometry, y: torch.Tensor, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Points of a view (fractions of its side, [M] each) -> image pixel coordinates."""
    top, left, h, w, flipped, turns = geometry
    for _ in range(turns):  # rot90 turns counter-clockwise: view (y, x) shows (x, 1 - y) of the unturned crop
        y, x = x, 1 - y
    if flipped:
        x = 1 - x
    return top + y * h, left + x * w


def image_to_view(geometry, y: torch.Tensor, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The inverse of ``view_to_image``."""
    top, left, h, w, flipped, turns = geometry
    y, x = (y - top) / h, (x - left) / w
    if flipped:
        x = 1 - x
    for _ in range(turns):
        y, x = 1 - x, y
    return y, x


def correspondences(source, target, grid: int) -> torch.Tensor:
    """For each patch of view ``source`` (row-major), the patch of view ``target`` holding its centre,
    or -1 where the target does not show it: long [grid * grid]."""
    centres = (torch.arange(grid, dtype=torch.float64) + 0.5) / grid
    y, x = torch.meshgrid(centres, centres, indexing="ij")
    y, x = image_to_view(target, *view_to_image(source, y.reshape(-1), x.reshape(-1)))
    inside = (y >= 0) & (y < 1) & (x >= 0) & (x < 1)
    index = (y * grid).floor().long().clamp(0, grid - 1) * grid + (x * grid).floor().long().clamp(0, grid - 1)
    return torch.where(inside, index, torch.full_like(index, -1))


def patch_masks(n: int, grid: int, ratio, prob: float, gen: torch.Generator) -> torch.Tensor:
    """Random patch masks of ``n`` crops: bool [n, grid * grid]; a crop is masked with probability ``prob``."""
    fraction = ratio[0] + (ratio[1] - ratio[0]) * torch.rand(n, generator=gen)
    fraction = torch.where(torch.rand(n, generator=gen) < prob, fraction, torch.zeros(n))
    count = (fraction * grid * grid).round().long()
    ranks = torch.rand(n, grid * grid, generator=gen).argsort(1).argsort(1)
    return ranks < count[:, None]


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
            img_size=args.global_size,
            patch_size=args.patch_size,
            embed_dim=args.embed_dim,
            depth=args.depth,
            num_heads=max(1, args.embed_dim // 64),
            num_classes=0,
            global_pool="",
            dynamic_img_size=True,
        )
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
        return {k: v.float().cpu().clone() for k, v in self.vit.state_dict().items()}


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
    views, geometries = [[], []], [[], []]
    for im in (images[i] for i in order):
        for k in range(2):
            near = geometries[0][-1] if k else None
            view, geometry = random_view(im, args.global_size, args.global_scale, args.jitter, args.rotate, gen, near)
            views[k].append(view)
            geometries[k].append(geometry)
    locals_ = [
        random_view(images[i], args.local_size, args.local_scale, args.jitter, args.rotate, gen)[0]
        for _ in range(args.local_crops)
        for i in order
    ]
    masks = patch_masks(2 * len(views[0]), grid, args.mask_ratio, args.mask_prob, gen)
    pairs = [(a, b) for a, b in zip(*geometries)]
    corr = [correspondences(a, b, grid) for a, b in pairs] + [correspondences(b, a, grid) for a, b in pairs]
    locals_ = torch.stack(locals_) if locals_ else torch.empty(0)
    return (torch.stack(views[0] + views[1]), locals_), masks, torch.stack(corr)


@torch.no_grad()
def token_mean(weights: dict[str, torch.Tensor], image_dir: str, resolution: int) -> torch.Tensor:
    """Mean patch token [D] of the DINO-layout ``weights`` over the images of ``image_dir``, each
    resized and normalised as the stages do (``loader.transforms``, centre crop) and encoded by
    ``models.backbone`` (DINO's position rule): exactly the tokens the stages see."""
    backbone = load_backbone_from_state(weights)
    transform = SegmentationTransform(resolution, "center", backbone.mean, backbone.std)
    total = torch.zeros(backbone.embed_dim, dtype=torch.float64)
    count = 0
    for path in sorted(glob.glob(os.path.join(image_dir, "*.png"))):
        tokens = backbone(transform(Image.open(path).convert("RGB"), None)[0][None])[0]
        total += tokens.double().sum(0)
        count += tokens.shape[0]
    return (total / count).float()


def load_backbone_from_state(weights: dict[str, torch.Tensor]):
    """The frozen DINO backbone the stages would build from these weights."""
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "weights.pth")
        torch.save(weights, path)
        return load_backbone(path, family="dino")


def state_path(out: str) -> str:
    return out + ".state.pt"


def train(args) -> list[dict]:
    """Pre-train and write ``args.out`` (or the resumable state when stopped early); -> the per-step losses."""
    torch.manual_seed(args.seed)
    image_dir = args.image_dir or os.path.join(ensure_toy(args.data_dir, world=args.world), "train", "images")
    images = load_images(image_dir)
    device = torch.device(args.device)
    student = Network(args).to(device)
    teacher = copy.deepcopy(student).requires_grad_(False)
    decayed = {n: p.ndim > 1 and "token" not in n and "pos_embed" not in n for n, p in student.named_parameters()}
    groups = [
        {"params": [p for n, p in student.named_parameters() if decayed[n]], "weight_decay": args.weight_decay},
        {"params": [p for n, p in student.named_parameters() if not decayed[n]], "weight_decay": 0.0},
    ]
    optimizer = torch.optim.AdamW(groups, lr=0.0)
    centers = (torch.zeros(args.out_dim, device=device), torch.zeros(args.out_dim, device=device))
    steps_per_epoch = len(images) // args.batch_size
    if steps_per_epoch < 1:
        raise SystemExit(f"pretrain_toy.py: {len(images)} images is fewer than one batch of {args.batch_size}")
    total = args.epochs * steps_per_epoch
    flags = {k: v for k, v in vars(args).items() if k not in RESUME_FREE}
    step, history = 0, []
    state_file = state_path(args.out)
    if args.resume == "yes" and not os.path.isfile(state_file):
        raise SystemExit(f"pretrain_toy.py: --resume yes but there is no state {state_file}")
    if args.resume != "no" and os.path.isfile(state_file):
        state = torch.load(state_file, map_location="cpu", weights_only=False)
        changed = sorted(k for k in flags if state["flags"].get(k) != flags[k])
        if changed:
            raise SystemExit(f"pretrain_toy.py: cannot resume {state_file}: flags changed: {', '.join(changed)}")
        student.load_state_dict(state["student"])
        teacher.load_state_dict(state["teacher"])
        optimizer.load_state_dict(state["optimizer"])
        centers, step, history = tuple(c.to(device) for c in state["centers"]), state["step"], state["history"]

    def save_state():
        atomic_torch_save(
            {
                "student": student.state_dict(),
                "teacher": teacher.state_dict(),
                "optimizer": optimizer.state_dict(),
                "centers": centers,
                "step": step,
                "history": history,
                "flags": flags,
            },
            state_file,
        )

    last = total if args.max_steps is None else min(total, args.max_steps)
    started = time.time()
    bar = tqdm(total=last, initial=step, desc="[pretrain toy]", dynamic_ncols=True)
    while step < last:
        epoch, position = divmod(step, steps_per_epoch)
        order = torch.randperm(len(images), generator=torch.Generator().manual_seed(args.seed * 7919 + epoch))
        views, masks, corr = batch_views(
            images, order[position * args.batch_size : (position + 1) * args.batch_size], step, args
        )
        views, masks, corr = tuple(v.to(device) for v in views), masks.to(device), corr.to(device)
        lr = cosine(step, total, args.lr, 1e-6, round(args.warmup_epochs * steps_per_epoch))
        for group in optimizer.param_groups:
            group["lr"] = lr
        loss, cls_loss, patch_loss, means = losses(student, teacher, views, masks, corr, centers, args)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if epoch < args.freeze_prototypes:
            student.head.prototypes.grad = None
        if args.grad_clip > 0:
            nn.utils.clip_grad_norm_(student.parameters(), args.grad_clip)
        optimizer.step()
        momentum = cosine(step, total, args.momentum, 1.0)
        with torch.no_grad():
            for p_teacher, p_student in zip(teacher.parameters(), student.parameters()):
                p_teacher.mul_(momentum).add_(p_student.detach(), alpha=1 - momentum)
            c = args.center_momentum
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
    atomic_torch_save({k: v.half() if args.half else v for k, v in weights.items()}, args.out)
    if os.path.isfile(state_file):
        os.remove(state_file)
    print(
        f"[pretrain toy] {total} steps ({time.time() - started:.0f} s this run); teacher backbone "
        f"(DINO layout) written to {args.out}"
    )
    return history


def main(argv=None):
    args = parser().parse_args(argv)
    torch.set_num_threads(args.threads)
    args.global_scale, args.local_scale = tuple(args.global_scale), tuple(args.local_scale)
    args.mask_ratio = tuple(args.mask_ratio)
    if args.global_size % args.patch_size or args.local_size % args.patch_size:
        raise SystemExit("pretrain_toy.py: --global_size and --local_size must be multiples of --patch_size")
    return train(args)


if __name__ == "__main__":
    main()
