"""Steps/s, images/s and peak memory of every stage's training step and of evaluation, on one device.

A random ViT-B/8-shaped backbone (`--arch vit_base_patch8_224`, no checkpoint) and generated
COCO-sized batches (320-px crops for stage 1 and the test, 224 px for the MLP stages 2 and 3,
random pixels and labels, built on the device: data loading is not measured) run the
project's own step functions (modules/objectives.py) with Adam, the EMA teacher and the
concept bank, as the stage scripts do. Each stage also runs once with its heads under
`torch.compile` (`--compile`). Prints a markdown table.

    python benchmarks/gpu_stages.py --device cuda --steps 200 --amp --compile
    python benchmarks/gpu_stages.py --dry_run            # two tiny steps per stage on the CPU
"""

import argparse
import contextlib
import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from models.backbone import load_backbone  # noqa: E402
from modules.bank import ConceptBank  # noqa: E402
from modules.inference import flip_tta_features  # noqa: E402
from modules.objectives import fine_tuning_step, front_door_step, mediator_loss, update_bank  # noqa: E402
from modules.segment import Cluster, SegmentMLP  # noqa: E402


def synchronize(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def peak_mib(device):
    return torch.cuda.max_memory_allocated(device) / (1 << 20) if device.type == "cuda" else float("nan")


def reset_peak(device):
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)


class Batches:
    """Generated image/label batches, cycled (normalised pixels; labels in [-1, C))."""

    def __init__(self, count, batch, resolution, n_classes, device, seed):
        gen = torch.Generator(device=device).manual_seed(seed)
        self.items = [
            (
                torch.randn(batch, 3, resolution, resolution, generator=gen, device=device),
                torch.randint(-1, n_classes, (batch, resolution, resolution), generator=gen, device=device),
            )
            for _ in range(count)
        ]

    def __getitem__(self, step):
        return self.items[step % len(self.items)]


def timed(run_step, steps, warmup, device):
    """-> (steps per second after the warm-up, peak MiB)."""
    for step in range(warmup):
        run_step(step)
    synchronize(device)
    reset_peak(device)
    start = time.perf_counter()
    for step in range(steps):
        run_step(warmup + step)
    synchronize(device)
    return steps / (time.perf_counter() - start), peak_mib(device)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", default="cuda")
    p.add_argument("--arch", default="vit_base_patch8_224", help="timm ViT, random weights")
    p.add_argument("--steps", type=int, default=200, help="timed steps per stage")
    p.add_argument("--warmup", type=int, default=10)
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--images", type=int, default=320, help="generated images (cycled); COCO-sized crops")
    p.add_argument("--num_codebook", type=int, default=2048)
    p.add_argument("--projection_dim", type=int, default=2048)
    p.add_argument("--n_classes", type=int, default=27)
    p.add_argument("--train_resolution", type=int, default=224, help="stages 2 and 3 (MLP head)")
    p.add_argument("--mediator_resolution", type=int, default=320, help="stage 1 and the test")
    p.add_argument("--amp", action="store_true", help="float16 autocast, as the stage scripts do on CUDA")
    p.add_argument("--compile", action="store_true", help="also time each stage with torch.compile on its heads")
    p.add_argument("--compile_backend", default="inductor", help="torch.compile backend")
    p.add_argument(
        "--dry_run",
        action="store_true",
        help="tiny CPU check: ViT-Tiny/16, 64 px, 2 steps, the 'eager' compile backend",
    )
    args = p.parse_args(argv)
    if args.dry_run:
        args.device, args.arch, args.steps, args.warmup = "cpu", "vit_tiny_patch16_224", 2, 1
        args.batch, args.images = 2, 4
        args.num_codebook, args.projection_dim, args.train_resolution, args.mediator_resolution = 32, 32, 64, 64
        args.compile_backend = "eager"
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("gpu_stages: --device cuda but no CUDA device is visible")
    torch.manual_seed(0)
    backbone = load_backbone(None, arch=args.arch).to(device)
    dim = backbone.embed_dim
    count = max(1, args.images // args.batch)
    train_batches = Batches(count, args.batch, args.train_resolution, args.n_classes, device, 1)
    big_batches = Batches(count, args.batch, args.mediator_resolution, args.n_classes, device, 2)
    autocast = (
        (lambda: torch.autocast(device.type, dtype=torch.float16))
        if args.amp and device.type == "cuda"
        else contextlib.nullcontext
    )
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU"
    rows = []

    def record(stage, compiled, rate, peak):
        rows.append(f"| {stage} | {'yes' if compiled else 'no'} | {rate:.2f} | {rate * args.batch:.1f} | {peak:.0f} |")
        print(rows[-1], flush=True)

    print(
        f"# gpu_stages: {name}, {args.arch} (random), batch {args.batch}, amp {'on' if args.amp else 'off'}, "
        f"{args.steps} timed steps, torch {torch.__version__}"
    )
    print()
    print("| stage | compiled heads | steps/s | images/s | peak MiB |")
    print("|---|---|---|---|---|")
    for compiled in [False, True] if args.compile else [False]:

        def maybe_compile(module):
            return torch.compile(module, backend=args.compile_backend) if compiled else module

        codebook = (
            torch.empty(args.num_codebook, dim, device=device)
            .uniform_(-1 / args.num_codebook, 1 / args.num_codebook)
            .requires_grad_(True)
        )
        optimizer = torch.optim.Adam([codebook], lr=1e-3)

        def stage1(step):
            img, _ = big_batches[step]
            with torch.no_grad(), autocast():
                tokens = backbone(img)
            with autocast():
                loss = mediator_loss(codebook, tokens)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()

        record("1 mediator", compiled, *timed(stage1, args.steps, args.warmup, device))

        frozen = codebook.detach()
        segment = SegmentMLP(dim, 90, args.projection_dim, args.n_classes).to(device).train()
        segment.head, segment.projection_head = maybe_compile(segment.head), maybe_compile(segment.projection_head)
        bank = ConceptBank(args.num_codebook, args.projection_dim).to(device)
        optimizer = torch.optim.Adam([p for p in segment.parameters() if p.requires_grad], lr=1e-3)

        def stage2(step):
            img, label = train_batches[step]
            with torch.no_grad(), autocast():
                tokens = backbone(img)
            with autocast():
                out = front_door_step(segment, tokens, label, frozen, bank, args.n_classes)
            optimizer.zero_grad(set_to_none=True)
            out["loss"].backward()
            optimizer.step()
            segment.update_teacher(0.99)
            update_bank(bank, frozen, out["sampled_tokens"], out["teacher_proj"])

        record("2 front door (bank filling)", compiled, *timed(stage2, args.steps, args.warmup, device))

        cluster = Cluster(dim, 90, args.num_codebook, args.n_classes).to(device)
        optimizer = torch.optim.Adam(
            [*segment.head_ema.parameters(), cluster.cluster_probe, *segment.linear.parameters()], lr=1e-3
        )
        segment.head_ema = maybe_compile(segment.head_ema)

        def stage3(step):
            img, label = train_batches[step]
            with torch.no_grad(), autocast():
                tokens = backbone(img)
            with autocast():
                out = fine_tuning_step(segment, cluster.cluster_probe, tokens, label, args.n_classes)
            optimizer.zero_grad(set_to_none=True)
            out["loss"].backward()
            optimizer.step()

        record("3 fine-tuning", compiled, *timed(stage3, args.steps, args.warmup, device))

        segment.eval()

        def evaluate(step):
            img, _ = big_batches[step]
            with torch.no_grad(), autocast():
                u, _ = flip_tta_features(backbone, segment.head_ema, img)
                cluster.scores(torch.nn.functional.interpolate(u.float(), size=img.shape[-2:], mode="bilinear"))

        record("test features + scores (no CRF)", compiled, *timed(evaluate, args.steps, args.warmup, device))
    print()
    print(
        "steps/s over the timed steps after the warm-up; images/s = steps/s × batch; peak: "
        "torch.cuda.max_memory_allocated over the timed steps (nan on CPU)"
    )


if __name__ == "__main__":
    main()
