"""End-to-end parity with the authors' CAUSE code on the toy data, on a CPU.

    python benchmarks/parity/parity.py --reference PATH/TO/Causal-Unsupervised-Segmentation \
        --work /tmp/parity --seeds 0 1 2 3 [--head mlp] [--mode runs|swaps|steps]

``PATH/TO/...`` is the user's own checkout of the authors' repository; the harness never
downloads, vendors or edits it. It copies it to ``<work>/reference`` and applies one textual
patch there (``CLIP_PATCH``: the toy dataset clips gradients like Cityscapes, at 1; the
authors' code knows no toy dataset), then runs the authors' stage scripts through
``run_reference.py`` with the run-time CPU patches of ``reference_shim.PATCHES``.

Shared inputs, written once into ``<work>``: the toy images (``loader/toy.py``), the same
images in the crop layout the authors' loader reads, and a random ViT-Tiny/16 saved as a DINO
checkpoint (``dino_vit_tiny_16.pth``). Before training, the harness checks that both sides
read bit-identical images, labels and backbone tokens.

Modes:
  runs   stages 1-3 by each side on every seed, each side's files evaluated by the project's
         test.py (with and without CRF; the probe), one table of means and spreads
  swaps  stages 1-2 from one side, stage 3 from the other (all four pairs) on every seed
  steps  stage 3 (then stage 2) of both sides from identical state with injected dropout
         masks, grid picks, bank subsets and data order: losses, gradients and parameters
         compared step by step (``inject.py``)
"""

import argparse
import json
import os
import re
import shutil
import statistics
import subprocess
import sys
import time

import numpy as np
import torch
from PIL import Image

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(os.path.dirname(HERE))
sys.path.insert(0, ROOT)
sys.path.insert(0, HERE)

import inject  # noqa: E402

from loader.toy import ensure_toy  # noqa: E402

BACKBONE = "dino_vit_tiny_16"
# Toy settings shared by both sides (README "Reproducing the reference").
K, E, RES, BATCH = 256, 256, 320, 16
EPOCHS = {"mediator": 1, "front_door": 2, "fine_tuning": 5}
REFERENCE_SCRIPTS = {
    "mediator": "train_mediator.py",
    "front_door": "train_front_door_{head}.py",
    "fine_tuning": "fine_tuning_{head}.py",
}
PROJECT_SCRIPTS = {
    "mediator": "train_mediator.py",
    "front_door": "train_front_door.py",
    "fine_tuning": "fine_tuning.py",
}
# The one textual patch of the scratch copy: stages 2 and 3 clip the toy's gradients at 1, as the
# authors' code clips Cityscapes (it has no branch for other datasets; stage 2 raises there).
CLIP_PATTERN = re.compile(r"if args\.dataset\s*==\s*'cityscapes':(\s*\n\s*scaler\.unscale_)")
CLIP_REPLACEMENT = r"if args.dataset in ('cityscapes', 'toy'):\1"
CLIP_FILES = ("train_front_door_mlp.py", "train_front_door_tr.py", "fine_tuning_mlp.py", "fine_tuning_tr.py")
# The project's stage 3 clips nowhere but COCO-Stuff and Cityscapes by default; the toy runs of both
# sides clip at 1 in stages 2 and 3.
PROJECT_STAGE3_CLIP = "1"


def log(message):
    print(f"[parity {time.strftime('%H:%M:%S')}] {message}", flush=True)


# -- shared inputs ------------------------------------------------------------------------------


class Paths:
    def __init__(self, work):
        self.work = os.path.abspath(work)
        self.reference = os.path.join(self.work, "reference")
        self.data = os.path.join(self.work, "data")
        self.crops = os.path.join(self.work, "toy_crops")
        self.ckpt = os.path.join(self.work, "checkpoint", f"{BACKBONE}.pth")

    def run(self, *parts):
        path = os.path.join(self.work, "runs", *parts)
        os.makedirs(path, exist_ok=True)
        return path


def copy_reference(source, target):
    """A scratch copy of the user's checkout with ``CLIP_PATCH`` applied; the source is only read."""
    if not os.path.isfile(os.path.join(source, "fine_tuning_mlp.py")):
        raise SystemExit(
            f"error: {source} is not a checkout of the authors' CAUSE repository "
            f"(no fine_tuning_mlp.py); clone github.com/ByungKwanLee/Causal-Unsupervised-Segmentation"
        )
    if os.path.isdir(target):
        shutil.rmtree(target)
    shutil.copytree(source, target, ignore=shutil.ignore_patterns(".git", "__pycache__", "CAUSE", "results"))
    for name in CLIP_FILES:
        path = os.path.join(target, name)
        with open(path, newline="") as f:
            text = f.read()
        patched, count = CLIP_PATTERN.subn(CLIP_REPLACEMENT, text)
        if count != 1:
            raise SystemExit(
                f"error: {name}: the Cityscapes clipping branch was not found once ({count} times); "
                f"this checkout differs from the one the harness knows"
            )
        with open(path, "w", newline="") as f:
            f.write(patched)


def write_toy_crops(data_root, crops):
    """The toy images in the crop layout of the authors' loader: img/<split>/<i>.jpg (links to the PNGs,
    which PIL reads by content) and label/<split>/<i>.png holding class + 1 (0 = unlabelled)."""
    for split in ("train", "val"):
        images = os.path.join(data_root, "toy", split, "images")
        labels = os.path.join(data_root, "toy", split, "labels")
        img_dir, label_dir = os.path.join(crops, "img", split), os.path.join(crops, "label", split)
        os.makedirs(img_dir, exist_ok=True)
        os.makedirs(label_dir, exist_ok=True)
        for i, name in enumerate(sorted(os.listdir(images))):
            link = os.path.join(img_dir, f"{i}.jpg")
            if not os.path.lexists(link):
                os.symlink(os.path.join(images, name), link)
            label = np.asarray(Image.open(os.path.join(labels, name)), dtype=np.uint8)
            Image.fromarray(label + 1).save(os.path.join(label_dir, f"{i}.png"))


def write_backbone(path):
    """A random ViT-Tiny/16 (the project's toy default) saved as a DINO checkpoint (plain state dict)."""
    from models.backbone import load_backbone

    backbone = load_backbone(None, arch="vit_tiny_patch16_224")
    os.makedirs(os.path.dirname(path), exist_ok=True)
    torch.save({k: v.clone() for k, v in backbone.vit.state_dict().items()}, path)


def prepare(paths, reference_source):
    log(f"scratch copy of {reference_source} -> {paths.reference}")
    copy_reference(reference_source, paths.reference)
    ensure_toy(paths.data)
    write_toy_crops(paths.data, paths.crops)
    if not os.path.isfile(paths.ckpt):
        write_backbone(paths.ckpt)
    check_inputs(paths)


def check_inputs(paths):
    """Images, labels and backbone tokens of the first training items, read by each side: bit-identical."""
    out = paths.run("inputs")
    reference_file, project_file = os.path.join(out, "reference.pt"), os.path.join(out, "project.pt")
    run_reference(
        paths,
        seed=0,
        script=os.path.join(HERE, "dump_inputs.py"),
        flags=[reference_file, paths.data, paths.ckpt],
        cwd=out,
        extra=[],
    )
    subprocess.run(
        [sys.executable, os.path.join(HERE, "dump_inputs.py"), "--project", project_file, paths.data, paths.ckpt],
        check=True,
        cwd=out,
    )
    reference, project = torch.load(reference_file), torch.load(project_file)
    for key in ("img", "label", "tokens"):
        if not torch.equal(reference[key], project[key]):
            diff = (reference[key].double() - project[key].double()).abs().max().item()
            raise SystemExit(f"error: the two sides read different {key} (max difference {diff:.3g})")
    log(
        f"inputs bit-identical on both sides: {tuple(reference['img'].shape)} images, labels, "
        f"{tuple(reference['tokens'].shape)} tokens"
    )


# -- running each side --------------------------------------------------------------------------


def run_quietly(command, cwd):
    """Run a command; its output is shown with --verbose only."""
    quiet = None if VERBOSE else subprocess.DEVNULL
    subprocess.run(command, check=True, cwd=cwd, stdout=quiet, stderr=quiet)


def run_reference(paths, seed, script, flags, cwd, extra):
    command = [
        sys.executable,
        os.path.join(HERE, "run_reference.py"),
        "--reference",
        paths.reference,
        "--toy_crops",
        paths.crops,
        "--seed",
        str(seed),
        *extra,
        script,
        *flags,
    ]
    run_quietly(command, cwd)


def reference_flags(paths, stage, head):
    return [
        "--dataset",
        "toy",
        "--data_dir",
        paths.data,
        "--ckpt",
        paths.ckpt,
        "--distributed",
        "false",
        "--gpu",
        "0",
        "--num_codebook",
        str(K),
        "--projection_dim",
        str(E),
        "--train_resolution",
        str(RES),
        "--test_resolution",
        str(RES),
        "--batch_size",
        str(BATCH),
        "--num_workers",
        "0",
        "--epoch",
        str(EPOCHS[stage]),
    ]


def artifact_paths(base, head):
    """Both sides' layout below their dataset folder ``base``: codebook, segment and cluster files."""
    return {
        "codebook": os.path.join(base, "modularity", BACKBONE, str(K), "modular.npy"),
        "segment": os.path.join(base, BACKBONE, str(K), f"segment_{head}.pth"),
        "cluster": os.path.join(base, BACKBONE, str(K), f"cluster_{head}.pth"),
    }


def reference_artifacts(run, head):
    return artifact_paths(os.path.join(run, "CAUSE", "toy"), head)


def run_reference_stage(paths, stage, head, seed, run, extra=()):
    log(f"reference {stage} ({head}, seed {seed})")
    run_reference(
        paths, seed, REFERENCE_SCRIPTS[stage].format(head=head), reference_flags(paths, stage, head), run, list(extra)
    )


def shared_flags(paths, head=None):
    """The project's flags of the data, backbone and sizes, the same for training and test.py (head flags with a
    head only: stage 1 has none)."""
    flags = ["--dataset", "toy", "--data_dir", paths.data, "--ckpt", paths.ckpt, "--num_codebook", str(K)]
    flags += ["--train_resolution", str(RES), "--num_workers", "0"]
    return flags + (["--head", head, "--projection_dim", str(E)] if head else [])


def project_flags(paths, stage, head, seed, out):
    flags = shared_flags(paths, None if stage == "mediator" else head)
    flags += ["--batch_size", str(BATCH), "--seed", str(seed), "--out", out, "--epoch", str(EPOCHS[stage])]
    return flags + (["--grad_clip", PROJECT_STAGE3_CLIP] if stage == "fine_tuning" else [])


def project_artifacts(out, head):
    return artifact_paths(os.path.join(out, "toy"), head)


def run_project_stage(paths, stage, head, seed, out, extra=()):
    log(f"project {stage} ({head}, seed {seed})")
    command = [
        sys.executable,
        os.path.join(HERE, "run_project.py"),
        *extra,
        PROJECT_SCRIPTS[stage],
        *project_flags(paths, stage, head, seed, out),
    ]
    run_quietly(command, ROOT)


def place(files, targets, kinds):
    """Copy ``files[kind]`` to ``targets[kind]`` for each kind (a stage swap)."""
    for kind in kinds:
        os.makedirs(os.path.dirname(targets[kind]), exist_ok=True)
        shutil.copyfile(files[kind], targets[kind])
        for stale in (targets[kind] + ".json",):
            if os.path.exists(stale):
                os.remove(stale)


def evaluate(paths, head, files, out):
    """The project's test.py on one set of trained files -> metrics.json as a dict."""
    command = [sys.executable, "test.py", *shared_flags(paths, head), "--test_resolution", str(RES), "--out", out]
    command += ["--save_images", "0", *(f"--{kind}={files[kind]}" for kind in ("segment", "cluster", "codebook"))]
    subprocess.run(command, check=True, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    with open(os.path.join(out, "toy", BACKBONE, str(K), head, "metrics.json")) as f:
        return json.load(f)


VERBOSE = False


# -- whole runs and stage swaps -----------------------------------------------------------------

SIDES = ("reference", "project")
STAGES = ("mediator", "front_door", "fine_tuning")
LOSS_TERM = {"mediator": "modularity", "front_door": "front_door", "fine_tuning": "modularity"}


def artifacts(side, run, head):
    return reference_artifacts(run, head) if side == "reference" else project_artifacts(run, head)


def train(paths, side, head, seed, run, stages):
    """Run ``stages`` of one side in ``run``; a stage whose loss log exists already ran and is skipped. The
    stage-2 segment is kept as ``segment_stage2.pth`` (stage 3 overwrites ``segment_<head>.pth``)."""
    for stage in stages:
        losses = os.path.join(run, f"losses_{stage}.json")
        if os.path.isfile(losses):
            continue
        extra = ["--losses", losses]
        if side == "reference":
            run_reference_stage(paths, stage, head, seed, run, extra)
        else:
            run_project_stage(paths, stage, head, seed, run, extra)
        if stage == "front_door":
            shutil.copyfile(artifacts(side, run, head)["segment"], os.path.join(run, "segment_stage2.pth"))


def stage2_files(paths, side, head, seed):
    """The codebook and stage-2 segment of ``side``'s run on ``seed``; a run from before the stage-2 copy
    was kept gets its stage 2 again, on its own codebook, in a run directory of its own."""
    run = paths.run(head, side, f"seed{seed}")
    files = artifacts(side, run, head)
    kept = os.path.join(run, "segment_stage2.pth")
    if not os.path.isfile(kept):
        again = paths.run(head, f"{side}_stage2", f"seed{seed}")
        place(files, artifacts(side, again, head), ("codebook",))
        train(paths, side, head, seed, again, ("front_door",))
        kept = os.path.join(again, "segment_stage2.pth")
    return {"codebook": files["codebook"], "segment": kept}


def loss_summary(run, stage):
    """Mean of the stage's first and last five logged values of its own loss term."""
    path = os.path.join(run, f"losses_{stage}.json")
    if not os.path.isfile(path):
        return None
    with open(path) as f:
        values = [v for term, v in json.load(f) if term == LOSS_TERM[stage]]
    return {"first5": statistics.fmean(values[:5]), "last5": statistics.fmean(values[-5:]), "steps": len(values)}


def result_of(paths, head, run, files, upstream_run=None):
    metrics = evaluate(paths, head, files, os.path.join(run, "test"))
    losses = {
        stage: loss_summary(upstream_run if upstream_run and stage != "fine_tuning" else run, stage) for stage in STAGES
    }
    return {
        "metrics": {key: metrics[key] for key in ("cluster", "cluster_crf", "linear", "kmeans") if key in metrics}
        | {"clusters_used": metrics["clusters_used"]},
        "losses": losses,
    }


class Results:
    """``<work>/results_<head>.json``: one entry per (kind, seed); finished entries are not rerun."""

    def __init__(self, paths, head):
        self.path = os.path.join(paths.work, f"results_{head}.json")
        self.data = json.load(open(self.path)) if os.path.isfile(self.path) else {}

    def get(self, key):
        return self.data.get(key)

    def put(self, key, value):
        self.data[key] = value
        with open(self.path, "w") as f:
            json.dump(self.data, f, indent=1)


def runs(paths, head, seeds, results):
    """Stages 1-3 by each side on every seed, each side's files evaluated by the project's test.py."""
    for seed in seeds:
        for side in SIDES:
            key = f"{side}->{side} seed {seed}"
            if results.get(key):
                continue
            run = paths.run(head, side, f"seed{seed}")
            train(paths, side, head, seed, run, STAGES)
            results.put(key, result_of(paths, head, run, artifacts(side, run, head)))


def swaps(paths, head, seeds, results):
    """Stage 3 of each side on the other side's stages 1-2, every seed (``runs`` first)."""
    runs(paths, head, seeds, results)
    for seed in seeds:
        for upstream, side in (("reference", "project"), ("project", "reference")):
            key = f"{upstream}->{side} seed {seed}"
            if results.get(key):
                continue
            source = stage2_files(paths, upstream, head, seed)
            run = paths.run(head, f"{upstream}_to_{side}", f"seed{seed}")
            place(source, artifacts(side, run, head), ("codebook", "segment"))
            train(paths, side, head, seed, run, ("fine_tuning",))
            results.put(
                key,
                result_of(
                    paths, head, run, artifacts(side, run, head), upstream_run=paths.run(head, upstream, f"seed{seed}")
                ),
            )


def _mean_spread(values):
    values = [v for v in values if v is not None]
    if not values:
        return "-"
    if len(values) == 1:
        return f"{values[0]:.2f}"
    return f"{statistics.fmean(values):.2f} ± {statistics.stdev(values):.2f} [{min(values):.2f}, {max(values):.2f}]"


COLUMNS = (
    ("stage 1 loss (last 5)", lambda r: (r["losses"]["mediator"] or {}).get("last5")),
    ("stage 2 loss (last 5)", lambda r: (r["losses"]["front_door"] or {}).get("last5")),
    ("stage 3 loss (last 5)", lambda r: (r["losses"]["fine_tuning"] or {}).get("last5")),
    ("mIoU", lambda r: r["metrics"]["cluster"]["mIoU"]),
    ("pAcc", lambda r: r["metrics"]["cluster"]["pAcc"]),
    ("mIoU + CRF", lambda r: r["metrics"]["cluster_crf"]["mIoU"]),
    ("pAcc + CRF", lambda r: r["metrics"]["cluster_crf"]["pAcc"]),
    ("clusters used", lambda r: r["metrics"]["clusters_used"]),
    ("probe mIoU", lambda r: r["metrics"]["linear"]["mIoU"]),
    ("k-means mIoU", lambda r: r["metrics"]["kmeans"]["mIoU"]),
)


def table(results, head, seeds):
    """Markdown: one row per pair (stages 1-2 from -> stage 3 by), mean ± sd [min, max] over seeds."""
    lines = [
        f"| {head.upper()}: stages 1-2 -> stage 3 | seeds | " + " | ".join(name for name, _ in COLUMNS) + " |",
        "|---|---|" + "---|" * len(COLUMNS),
    ]
    for pair in ("reference->reference", "project->project", "reference->project", "project->reference"):
        rows = [results.get(f"{pair} seed {seed}") for seed in seeds]
        rows = [r for r in rows if r]
        if not rows:
            continue
        cells = [_mean_spread([get(r) for r in rows]) for _, get in COLUMNS]
        lines.append(f"| {pair.replace('->', ' -> ')} | {len(rows)} | " + " | ".join(cells) + " |")
    lines.append("")
    lines.append("| pair | seed | mIoU | mIoU + CRF | probe mIoU |")
    lines.append("|---|---|---|---|---|")
    for pair in ("reference->reference", "project->project", "reference->project", "project->reference"):
        for seed in seeds:
            r = results.get(f"{pair} seed {seed}")
            if r:
                m = r["metrics"]
                lines.append(
                    f"| {pair.replace('->', ' -> ')} | {seed} | {m['cluster']['mIoU']:.2f} | "
                    f"{m['cluster_crf']['mIoU']:.2f} | {m['linear']['mIoU']:.2f} |"
                )
    return "\n".join(lines)


# -- step-by-step comparison --------------------------------------------------------------------


def write_injection(out, seed, n_train, n_classes, reduced_dim=90):
    """Per-epoch orders (full batches only: both sides then train the same batches) and a cluster probe."""
    gen = torch.Generator().manual_seed(seed)
    usable = n_train // BATCH * BATCH
    orders = [torch.randperm(n_train, generator=gen)[:usable].tolist() for _ in range(max(EPOCHS.values()))]
    order_file, probe_file = os.path.join(out, "orders.json"), os.path.join(out, "probe.pt")
    with open(order_file, "w") as f:
        json.dump(orders, f)
    torch.save(
        torch.empty(n_classes, reduced_dim).uniform_(-1.0 / n_classes, 1.0 / n_classes, generator=gen), probe_file
    )
    return order_file, probe_file


def initial_segment(head, seed, dim=192):
    """A fresh segment module's state (teacher = student), from the project's constructors."""
    from modules.segment import SegmentMLP, SegmentTR

    torch.manual_seed(seed)
    if head == "mlp":
        return SegmentMLP(dim, 90, E, 6).state_dict()
    return SegmentTR(dim, 90, E, 6, (RES // 16) ** 2).state_dict()


def steps(paths, head, seed, stage="fine_tuning"):
    """Stage ``stage`` of both sides from identical state with injected draws; per-step differences."""
    upstream = paths.run("steps", head, f"upstream{seed}")
    files = project_artifacts(upstream, head)
    needed = ("mediator",) if stage == "front_door" else ("mediator", "front_door")
    for name in needed:
        if not os.path.isfile(files["codebook" if name == "mediator" else "segment"]):
            run_project_stage(paths, name, head, seed, upstream)
    kinds = ["codebook"] + (["segment"] if stage == "fine_tuning" else [])
    out = paths.run("steps", head, f"{stage}{seed}")
    order_file, probe_file = write_injection(out, seed + 1000, 300, 6)
    segment_file = os.path.join(out, "segment_init.pt")
    torch.save(initial_segment(head, seed + 3000), segment_file)
    records = {}
    for side in ("project", "reference"):
        run = paths.run("steps", head, f"{stage}{seed}", side)
        record = os.path.join(out, f"{side}.pt")
        extra = [
            "--inject",
            str(seed + 2000),
            "--orders",
            order_file,
            "--probe",
            probe_file,
            "--record",
            record,
            "--segment_init",
            segment_file,
        ]
        if side == "project":
            place(files, project_artifacts(run, head), kinds)
            run_project_stage(paths, stage, head, seed, run, extra)
        else:
            place(files, reference_artifacts(run, head), kinds)
            flags = reference_flags(paths, stage, head) + (["--load_segment", "true"] if stage == "fine_tuning" else [])
            log(f"reference {stage} ({head}, seed {seed}, injected)")
            run_reference(paths, seed, REFERENCE_SCRIPTS[stage].format(head=head), flags, run, extra)
        records[side] = record
    rows, n_project, n_reference = inject.compare(records["project"], records["reference"])
    print(f"{stage} {head}: {n_project} optimiser steps (project), {n_reference} (reference)")
    print(f"{'call':>5s} {'loss project':>14s} {'loss reference':>14s} {'max|dgrad|':>11s} {'max|dparam|':>11s}")
    for row in rows:
        print(
            f"{row['call']:5d} {row['loss'][0]:14.7f} {row['loss'][1]:14.7f} {row['grad']:11.3g} {row['param']:11.3g}"
        )
    return rows


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--reference", required=True, help="your checkout of the authors' repository")
    parser.add_argument("--work", default="parity_work", help="scratch folder for copies, data and runs")
    parser.add_argument("--mode", choices=["prepare", "runs", "swaps", "steps"], default="runs")
    parser.add_argument("--head", choices=["mlp", "tr"], default="mlp")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 3])
    parser.add_argument(
        "--stage",
        choices=["front_door", "fine_tuning"],
        default="fine_tuning",
        help="--mode steps: the stage compared step by step",
    )
    parser.add_argument("--verbose", action="store_true")
    args = parser.parse_args()
    global VERBOSE
    VERBOSE = args.verbose
    paths = Paths(args.work)
    prepare(paths, os.path.abspath(args.reference))
    if args.mode == "steps":
        steps(paths, args.head, args.seeds[0], args.stage)
    elif args.mode in ("runs", "swaps"):
        results = Results(paths, args.head)
        (runs if args.mode == "runs" else swaps)(paths, args.head, args.seeds, results)
        print(table(results, args.head, args.seeds))


if __name__ == "__main__":
    main()
