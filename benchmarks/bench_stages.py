"""Median step time and peak memory of each stage's inner step, this project against a literal formulation.

For every stage the project's step and a literal formulation of the same step (written
from SPEC §3/§5/§7 the way the reference computes it: a loop over images, a bank kept as
one list per concept and concatenated at every read, the B×K×P×P co-membership tensor
materialised) run on the same inputs, each in a fresh process, and their outputs (loss
and gradient, or CRF marginals) are asserted equal. Steps:

* stage 1: modularity loss of the codebook, forward + backward (B=16, K=2048, P=100, D=384);
* stage 2: front-door step with a full bank: bank read + contrastive loss forward + backward
  + bank update (B=16, P=49, D=384, E=2048, K concepts × 100 vectors), and the floor: the
  bare similarity matmul [B·P, E] × [E, K·100] and its backward to the anchors;
* stage 3: teacher head, grid sampling, modularity of the cluster probe + probe
  cross-entropy, forward + backward (B=16, N=784, r=90, C=27, labels 224 px);
* test: dense CRF of a batch of 320-px images with 27 classes, per image; the project's
  process pool against the serial per-image call.

Peak memory: on CPU the growth of the process's peak resident set size over its resident
set size once the inputs exist (the peak is reset there through /proc/self/clear_refs; CRF:
the parent process only, not its workers); on CUDA `torch.cuda.max_memory_allocated` over
the memory allocated before the steps.

    python benchmarks/bench_stages.py                               # published shapes, literal stage 2 at 512
    python benchmarks/bench_stages.py --literal_concepts 2048       # also the literal at the published bank
    python benchmarks/bench_stages.py --scale 0.1 --stages 2        # shrunk, stage 2 only
    python benchmarks/bench_stages.py --device cuda --amp           # on a GPU, mixed precision
"""

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from types import SimpleNamespace

import numpy as np
import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from modules.bank import ConceptBank  # noqa: E402
from modules.objectives import front_door_loss, modularity_loss  # noqa: E402
from modules.ops import grid_sample_tokens, vq_index  # noqa: E402
from modules.segment import HeadMLP, TokenProjection, linear_probe_loss, tokens_to_image  # noqa: E402
from utils.crf import CRFPool, dense_crf  # noqa: E402

MIB = 1 << 20
BANK_CAPACITY = 100


# The published sizes of one step (SPEC: ViT-S/8 features, 2048 concepts, a bank of 100 per
# concept), each with the smallest value `--scale` may shrink it to (None: never scaled).
PUBLISHED_SHAPES = {
    "batch": (16, 2),
    "dim": (384, 8),
    "stage1_concepts": (2048, 4),
    "stage1_tokens": (100, None),  # 10x10 grid of a 320 px crop
    "stage2_tokens": (49, None),
    "projection_dim": (2048, 8),
    "bank_capacity": (BANK_CAPACITY, 2),
    "stage3_tokens": (784, None),
    "reduced_dim": (90, 4),
    "n_classes": (27, None),
    "label_size": (224, 28),
    "crf_images": (16, 2),
    "crf_size": (320, 32),
}


def published_shapes(scale: float = 1.0) -> SimpleNamespace:
    """The sizes of PUBLISHED_SHAPES times `scale`, each at least its smallest workable value."""
    return SimpleNamespace(
        **{
            name: size if least is None else max(least, int(round(size * scale)))
            for name, (size, least) in PUBLISHED_SHAPES.items()
        }
    )


# ---------------------------------------------------------------------------------------------
# Literal formulations (SPEC, the way the reference computes it)
# ---------------------------------------------------------------------------------------------


def literal_modularity_loss(concepts, feats, temp=0.1):
    """SPEC §3 with the full [B, K, P, P] co-membership tensor."""
    normed = F.normalize(feats.detach(), dim=2)
    affinity = (normed @ normed.transpose(2, 1)).clamp(0)
    affinity = affinity - affinity * torch.eye(affinity.shape[1], device=affinity.device)
    degree = affinity.sum(dim=2, keepdim=True)
    edges = affinity.sum(dim=(1, 2), keepdim=True)
    weights = affinity - (degree / edges) @ (degree.transpose(2, 1) / edges) * edges
    assignment = (normed @ F.normalize(concepts, dim=1).t()).clamp(0).transpose(2, 1)
    delta = torch.tanh(assignment.unsqueeze(3) @ assignment.unsqueeze(2) / temp).max(dim=1).values
    return -((weights / edges) @ delta).diagonal(dim1=-2, dim2=-1).sum(dim=-1).mean()


class LiteralBank:
    """One tensor per concept, as the reference keeps it. Every read grows the flat bank and
    its codebook rows by one concatenation per concept (each copies everything gathered so
    far), then normalises both; every update concatenates and slices each concept's tensor."""

    def __init__(self, stored, capacity):
        self.fifos = list(stored)
        self.capacity = capacity

    def contents(self, codebook):
        """-> (normalised feats [S, E], normalised codebook row of each [S, D])"""
        feats = codebook.new_zeros(0, self.fifos[0].shape[1])
        codes = codebook.new_zeros(0, codebook.shape[1])
        for concept, fifo in enumerate(self.fifos):
            if fifo.shape[0]:
                codes = torch.cat([codes, codebook[concept].unsqueeze(0).repeat(fifo.shape[0], 1)])
                feats = torch.cat([feats, fifo])
        return F.normalize(feats, dim=1), F.normalize(codes, dim=1)

    def update(self, concept_idx, feats, keep_ratio=0.5):
        for concept in concept_idx.unique().tolist():
            rows = feats[concept_idx == concept]
            keep = rows[torch.randperm(rows.shape[0], device=rows.device)[: int(rows.shape[0] * keep_ratio)]]
            self.fifos[concept] = torch.cat([self.fifos[concept], keep])[-self.capacity :]


def literal_front_door_loss(feat, proj, proj_ema, codebook, bank, bank_codes, temp=0.07, pos=0.3, neg=0.1):
    """SPEC §5: per anchor image, the full [P, S] logits, code similarities and loss matrices.

    bank: normalised bank vectors [S, E]; bank_codes: the normalised codebook row of each [S, D].
    """
    batch, tokens, _ = proj.shape
    normed_codebook = F.normalize(codebook, dim=1)
    quantised = normed_codebook[vq_index(feat, codebook)]
    student = F.normalize(proj, dim=2)
    teacher = F.normalize(proj_ema.detach(), dim=2).reshape(batch * tokens, -1)
    batch_codes = quantised.reshape(batch * tokens, -1)
    terms = []
    for b in range(batch):
        for keys, key_codes, self_excluded in ((teacher, batch_codes, True), (bank, bank_codes, False)):
            logits = student[b] @ keys.t() / temp
            shifted = logits - logits.max(dim=1, keepdim=True).values.detach()
            codes = quantised[b] @ key_codes.t()
            positive = codes > pos
            if self_excluded:
                eye = torch.zeros_like(positive)
                eye[:, b * tokens : (b + 1) * tokens] = torch.eye(tokens, dtype=torch.bool, device=eye.device)
                positive = positive & ~eye
            counted = positive | (codes < neg)
            denominator = (shifted.exp() * counted).sum(dim=1, keepdim=True)
            losses = -shifted + torch.log(denominator.clamp(min=torch.finfo(denominator.dtype).tiny))
            if positive.any():
                terms.append(losses[positive].mean())
    return sum(terms) / len(terms)


def literal_crf(images, logits, iters=10):
    return torch.stack([dense_crf(image, scores, iters) for image, scores in zip(images, logits)])


# ---------------------------------------------------------------------------------------------
# Inputs (identical in every process: seeded CPU generators, then moved to the device)
# ---------------------------------------------------------------------------------------------


def clustered_codebook(concepts, dim, gen):
    """Concepts in groups around shared directions, so positives, negatives and the ignored
    band between them all occur (random rows alone would all be negatives of each other)."""
    groups = max(1, concepts // 32)
    centres = F.normalize(torch.randn(groups, dim, generator=gen), dim=1)
    members = centres[torch.randint(0, groups, (concepts,), generator=gen)]
    return members + 1.2 * torch.randn(concepts, dim, generator=gen) / dim**0.5


def stage2_inputs(shapes, concepts, device):
    gen = torch.Generator().manual_seed(2)
    codebook = clustered_codebook(concepts, shapes.dim, gen)
    picks = torch.randint(0, concepts, (shapes.batch, shapes.stage2_tokens), generator=gen)
    feat = (
        codebook[picks]
        + 0.3 * torch.randn(shapes.batch, shapes.stage2_tokens, shapes.dim, generator=gen) / shapes.dim**0.5
    )
    proj = torch.randn(shapes.batch, shapes.stage2_tokens, shapes.projection_dim, generator=gen)
    proj_ema = proj + 0.5 * torch.randn(proj.shape, generator=gen)
    bank = torch.randn(concepts, shapes.bank_capacity, shapes.projection_dim, generator=gen)
    return [t.to(device) for t in (feat, proj, proj_ema, codebook, bank)]


def stage3_inputs(shapes, device):
    gen = torch.Generator().manual_seed(3)
    torch.manual_seed(3)
    head = HeadMLP(shapes.dim, shapes.reduced_dim).eval()
    probe = TokenProjection(shapes.reduced_dim, shapes.n_classes)
    tokens = torch.randn(shapes.batch, shapes.stage3_tokens, shapes.dim, generator=gen)
    label = torch.randint(-1, shapes.n_classes, (shapes.batch, shapes.label_size, shapes.label_size), generator=gen)
    cluster_probe = torch.empty(shapes.n_classes, shapes.reduced_dim).uniform_(
        -1 / shapes.n_classes, 1 / shapes.n_classes, generator=gen
    )
    order = grid_sample_tokens(tokens[..., :1], generator=gen)[1]
    return (
        head.to(device),
        probe.to(device),
        tokens.to(device),
        label.to(device),
        cluster_probe.to(device),
        order.to(device),
    )


def crf_inputs(shapes):
    rng = np.random.default_rng(4)
    size = shapes.crf_size
    images = rng.integers(0, 256, (shapes.crf_images, size // 8, size // 8, 3), dtype=np.uint8)
    images = images.repeat(8, axis=1).repeat(8, axis=2)
    scores = torch.from_numpy(rng.normal(0, 1, (shapes.crf_images, shapes.n_classes, size // 8, size // 8)))
    return images, torch.log_softmax(3 * scores.float(), dim=1)


# ---------------------------------------------------------------------------------------------
# One measurement (runs in a child process)
# ---------------------------------------------------------------------------------------------


def _status_mib(field):
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith(field + ":"):
                return int(line.split()[1]) / 1024
    raise OSError(f"no {field} in /proc/self/status")


def reset_peak(device):
    """Start a peak-memory measurement; returns the baseline in MiB."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        return torch.cuda.memory_allocated(device) / MIB
    try:
        # Linux: "5" resets the high-water mark VmHWM to the current resident set size, so
        # building the inputs does not hide the step's own peak.
        with open("/proc/self/clear_refs", "w") as clear_refs:
            clear_refs.write("5")
        return _status_mib("VmRSS")
    except OSError:
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def peak_memory_mib(device):
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / MIB
    try:
        return _status_mib("VmHWM")
    except OSError:
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def synchronize(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def stage1_step(method, shapes, device, amp):
    gen = torch.Generator().manual_seed(1)
    feats = torch.randn(shapes.batch, shapes.stage1_tokens, shapes.dim, generator=gen).to(device)
    codebook = (
        torch.empty(shapes.stage1_concepts, shapes.dim)
        .uniform_(-1 / shapes.stage1_concepts, 1 / shapes.stage1_concepts, generator=gen)
        .to(device)
        .requires_grad_(True)
    )
    loss_fn = literal_modularity_loss if method == "literal" else modularity_loss

    def step():
        codebook.grad = None
        with torch.autocast(device.type, enabled=amp):
            loss = loss_fn(codebook, feats)
        loss.backward()
        return {"loss": loss.detach(), "grad": codebook.grad}

    return step


def stage2_step(method, shapes, device, amp, concepts):
    feat, proj, proj_ema, codebook, stored = stage2_inputs(shapes, concepts, device)
    codes = vq_index(feat, codebook).reshape(-1)
    proj.requires_grad_(True)
    if method == "floor":
        anchors = F.normalize(proj.detach(), dim=2).reshape(-1, proj.shape[2]).requires_grad_(True)
        keys = stored.view(-1, proj.shape[2])

        def step():
            anchors.grad = None
            logits = anchors @ keys.t()
            logits.backward(torch.ones_like(logits))
            return {}

        return step
    if method == "literal":
        bank = LiteralBank(stored, shapes.bank_capacity)
        loss_fn, read = literal_front_door_loss, lambda: bank.contents(codebook)
    else:
        bank = ConceptBank(concepts, shapes.projection_dim, shapes.bank_capacity).to(device)
        bank.storage.copy_(stored)
        bank.counts.fill_(shapes.bank_capacity)
        loss_fn, read = front_door_loss, bank.loss_keys
    del stored

    def step():
        proj.grad = None
        bank_feats, bank_idx = read()
        with torch.autocast(device.type, enabled=amp):
            loss = loss_fn(feat, proj, proj_ema, codebook, bank_feats, bank_idx)
        loss.backward()
        bank.update(codes, proj_ema.reshape(codes.shape[0], -1))
        return {"loss": loss.detach(), "grad": proj.grad}

    return step


def stage3_step(method, shapes, device, amp):
    head, probe, tokens, label, cluster_probe, order = stage3_inputs(shapes, device)
    cluster_probe.requires_grad_(True)
    loss_fn = literal_modularity_loss if method == "literal" else modularity_loss

    def step():
        cluster_probe.grad = None
        head.zero_grad()
        with torch.autocast(device.type, enabled=amp):
            teacher = head(tokens)
            sampled = grid_sample_tokens(teacher, order=order)[0]
            loss_mod = loss_fn(cluster_probe, sampled.detach())
            loss_lin = linear_probe_loss(tokens_to_image(probe(teacher)), label, shapes.n_classes)[0]
        (loss_mod + loss_lin).backward()
        return {"loss": (loss_mod + loss_lin).detach(), "grad": cluster_probe.grad}

    return step


def crf_step(method, shapes, workers):
    images, logits = crf_inputs(shapes)
    if method == "literal":
        return lambda: {"probs": literal_crf(images, logits)}, None
    pool = CRFPool(num_workers=workers)
    pool(images[:workers], logits[:workers])  # start the workers outside the timing
    return lambda: {"probs": pool(images, logits)}, pool


def measure(spec, out_path):
    device = torch.device(spec["device"])
    shapes = SimpleNamespace(**spec["shapes"])
    pool = None
    if spec["stage"] == "1":
        step = stage1_step(spec["method"], shapes, device, spec["amp"])
    elif spec["stage"] == "2":
        step = stage2_step(spec["method"], shapes, device, spec["amp"], spec["concepts"])
    elif spec["stage"] == "3":
        step = stage3_step(spec["method"], shapes, device, spec["amp"])
    else:
        step, pool = crf_step(spec["method"], shapes, spec["crf_workers"])
    before = reset_peak(device)
    times, first = [], None
    for call in range(spec["warmup"] + spec["repeats"]):
        synchronize(device)
        start = time.perf_counter()
        outputs = step()
        synchronize(device)
        if call >= spec["warmup"]:
            times.append(time.perf_counter() - start)
        if first is None:
            first = {key: value.detach().float().cpu().clone() for key, value in outputs.items()}
    peak = peak_memory_mib(device) - before
    if pool is not None:
        pool.close()
    torch.save(first, out_path)
    per = shapes.crf_images if spec["stage"] == "crf" else 1
    return {"seconds": statistics.median(times) / per, "peak_mib": peak}


def run_child(spec):
    with tempfile.TemporaryDirectory() as tmp:
        out_path = os.path.join(tmp, "outputs.pt")
        command = [sys.executable, os.path.abspath(__file__), "--child", json.dumps(spec), "--child_out", out_path]
        result = subprocess.run(command, capture_output=True, text=True, check=False)
        if result.returncode != 0:
            tail = "\n".join(result.stderr.strip().splitlines()[-5:])
            raise SystemExit(f"bench_stages: {spec['stage']}/{spec['method']} failed:\n{tail}")
        summary = json.loads(result.stdout.strip().splitlines()[-1])
        summary["outputs"] = torch.load(out_path)
    return summary


# ---------------------------------------------------------------------------------------------
# The table
# ---------------------------------------------------------------------------------------------


def assert_equal_outputs(name, project, literal, amp):
    """Loss to 1e-4 relative (1e-2 under AMP), gradient / marginals to 1e-4 of their largest value."""
    tolerance = 1e-2 if amp else 1e-4
    for key, mine in project.items():
        theirs = literal[key]
        scale = max(float(theirs.abs().max()), 1e-12)
        error = float((mine - theirs).abs().max()) / scale
        if error > tolerance:
            raise SystemExit(
                f"bench_stages: {name}: the project's {key} differs from the literal one "
                f"(max relative error {error:.2e} > {tolerance:.0e})"
            )


def row(name, project, literal=None, floor=None):
    cells = [name, f"{project['seconds']:.3f}", f"{project['peak_mib']:.0f}"]
    if literal is not None:
        cells += [
            f"{literal['seconds']:.3f}",
            f"{literal['peak_mib']:.0f}",
            f"{literal['seconds'] / project['seconds']:.1f}×",
            f"{literal['peak_mib'] / max(project['peak_mib'], 1.0):.1f}×",
        ]
    else:
        cells += ["–"] * 4
    cells.append(f"{floor['seconds']:.3f} ({project['seconds'] / floor['seconds']:.2f}×)" if floor else "–")
    return "| " + " | ".join(cells) + " |"


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", default="cpu", help="cpu or cuda (one device)")
    p.add_argument("--amp", action="store_true", help="steps under torch.autocast (bfloat16 on CPU, float16 on CUDA)")
    p.add_argument(
        "--scale",
        type=float,
        default=1.0,
        help="shrink the published shapes (batch, widths, concepts, bank capacity, image sizes)",
    )
    p.add_argument("--stages", nargs="+", default=["1", "2", "3", "crf"], choices=["1", "2", "3", "crf"])
    p.add_argument(
        "--bank_concepts",
        nargs="+",
        type=int,
        default=[512, 2048],
        help="stage 2: concepts in the (full) bank and codebook, one row each (scaled by --scale)",
    )
    p.add_argument(
        "--literal_concepts",
        type=int,
        default=512,
        help="stage 2: run the literal formulation only for banks up to this many concepts (before "
        "--scale; the literal step at 2048 takes minutes and ~10 GB)",
    )
    p.add_argument(
        "--repeats", type=int, default=3, help="timed steps per measurement after one warm-up step (median reported)"
    )
    p.add_argument(
        "--literal_repeats",
        type=int,
        default=1,
        help="timed steps of the slow literal stage-2 runs (no warm-up step for them)",
    )
    p.add_argument("--crf_workers", type=int, default=os.cpu_count() or 1, help="CRF pool size")
    p.add_argument("--no_literal", action="store_true", help="project and floor only (no equality check)")
    p.add_argument("--json", help="also write the measurements to this JSON file")
    p.add_argument("--child", help=argparse.SUPPRESS)
    p.add_argument("--child_out", help=argparse.SUPPRESS)
    return p.parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    if args.child:
        print(json.dumps(measure(json.loads(args.child), args.child_out)))
        return
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        raise SystemExit("bench_stages: --device cuda but no CUDA device is visible")
    shapes = published_shapes(args.scale)
    base = {
        "device": args.device,
        "amp": args.amp,
        "shapes": vars(shapes),
        "repeats": args.repeats,
        "warmup": 1,
        "crf_workers": args.crf_workers,
    }
    if args.device.startswith("cuda"):
        name = torch.cuda.get_device_name(0)
    else:
        name = f"CPU, {torch.get_num_threads()} threads"
    print(f"# bench_stages: {name}, torch {torch.__version__}, amp {'on' if args.amp else 'off'}, scale {args.scale}")
    print()
    print(
        "| step | project s | project MiB | literal s | literal MiB | speed-up | memory ratio "
        "| floor s (project/floor) |"
    )
    print("|---|---|---|---|---|---|---|---|")
    records = []

    def compare(label, stage, extra=None, literal_repeats=None, with_literal=True, with_floor=False):
        spec = {**base, "stage": stage, **(extra or {})}
        project = run_child({**spec, "method": "project"})
        literal = floor = None
        if with_literal and not args.no_literal:
            slow = {"repeats": literal_repeats, "warmup": 0} if literal_repeats else {}
            literal = run_child({**spec, "method": "literal", **slow})
            assert_equal_outputs(label, project["outputs"], literal["outputs"], args.amp)
        if with_floor:
            floor = run_child({**spec, "method": "floor"})
        print(row(label, project, literal, floor), flush=True)
        records.append(
            {
                "step": label,
                **{
                    k: ({"seconds": v["seconds"], "peak_mib": v["peak_mib"]} if v else None)
                    for k, v in (("project", project), ("literal", literal), ("floor", floor))
                },
            }
        )

    s = shapes
    if "1" in args.stages:
        compare(f"stage 1 modularity B{s.batch} K{s.stage1_concepts} P{s.stage1_tokens} D{s.dim}", "1")
    if "2" in args.stages:
        for concepts in args.bank_concepts:
            scaled = max(4, int(round(concepts * args.scale)))
            compare(
                f"stage 2 front door, bank {scaled}×{s.bank_capacity}×{s.projection_dim}, B{s.batch} "
                f"P{s.stage2_tokens}",
                "2",
                {"concepts": scaled},
                literal_repeats=args.literal_repeats,
                with_literal=concepts <= args.literal_concepts,
                with_floor=True,
            )
    if "3" in args.stages:
        compare(f"stage 3 step B{s.batch} N{s.stage3_tokens} r{s.reduced_dim} C{s.n_classes}", "3")
    if "crf" in args.stages:
        compare(f"test CRF per image {s.crf_size} px C{s.n_classes}, pool of {args.crf_workers}", "crf")
    print()
    print(
        "time: median seconds per step (CRF: per image); memory: peak growth in MiB (CPU: resident set size of "
        "the measuring process; CUDA: max_memory_allocated); floor: the bare similarity matmul and its backward"
    )
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"device": name, "amp": args.amp, "scale": args.scale, "rows": records}, f, indent=2)


if __name__ == "__main__":
    main()
