"""Pre-flight checks: everything a stage can find wrong before it trains for hours.

Each ``check_*`` function returns a list of problems, one line each (empty: all is well).
:func:`run_checks` gathers them at the start of a stage (and alone with ``--check``); the
stage prints them all and stops with exit code 2 before training anything.
"""

import os
import shutil
import sys
import warnings

import numpy as np
import torch
import torch.distributed as dist

from engine.build import (
    build_segment,
    check_fits,
    describe_cluster,
    describe_segment,
    expected_cluster,
    expected_segment,
    feature_cache_key,
)
from engine.store import PRODUCER, ArtifactMismatchError
from loader.datasets import build_dataset
from loader.feature_cache import cache_dir
from loader.toy import ensure_toy
from modules.segment import SEGMENT_HEADS
from utils.distributed import parse_gpu_ids, under_torchrun
from utils.errors import BadInputError, InvalidInputError, one_line

STAGE_SPLITS = {
    "mediator": ("train",),
    "front_door": ("train",),
    "fine_tuning": ("train",),
    "test": ("val",),
    "predict": (),
}
UPSTREAM_ARTIFACTS = {
    "mediator": (),
    "front_door": ("codebook",),
    "fine_tuning": ("codebook", "segment"),
    "test": ("codebook", "segment", "cluster"),
    "predict": ("codebook", "segment", "cluster"),
}
SAMPLES_DECODED = 5
GRID_CELL = 4
MIN_TOKENS = 2
MAX_FOLDER_CLASSES = 255  # label PNGs hold 8-bit class ids, 255 = ignore
DISK_MARGIN = 64 << 20  # logs, configs, plots and pictures


class PreflightError(BadInputError):
    """The last problem the pre-flight check found; the others were printed before it, one per line."""


def report(problems):
    """Print every problem but the last as one line; return the last as the error to raise (printed alike)."""
    for problem in problems[:-1]:
        print(f"error: {problem}", file=sys.stderr)
    return PreflightError(problems[-1])


def check_devices(args):
    """CUDA devices for every id of ``--gpu`` (on a CUDA machine), and the collective backend of the job."""
    if args.cpu or under_torchrun():
        return []
    try:
        ids = parse_gpu_ids(args.gpu)
    except InvalidInputError as err:
        return [str(err)]
    problems = []
    if len(ids) != len(set(ids)):
        problems.append(f"--gpu {args.gpu} names a device twice; give each GPU id once")
    if torch.cuda.is_available():
        count = torch.cuda.device_count()
        missing = [i for i in ids if not 0 <= i < count]
        if missing:
            problems.append(
                f"--gpu {args.gpu} asks for GPU {missing[0]} but this machine has {count} CUDA "
                f"device{'s' if count > 1 else ''} (ids 0..{count - 1})"
            )
        if len(ids) > 1 and not dist.is_nccl_available():
            problems.append(f"--gpu {args.gpu} needs NCCL for several GPUs, but this PyTorch build has no NCCL")
    elif len(ids) > 1 and not dist.is_gloo_available():
        problems.append(f"--gpu {args.gpu} runs {len(ids)} CPU processes, but this PyTorch build has no gloo")
    return problems


def _existing_ancestor(path):
    path = os.path.abspath(path)
    while not os.path.exists(path):
        path = os.path.dirname(path)
    return path


def check_output(args, store):
    """The stage's output directory can be created and written (``--out`` is not a file)."""
    target = os.path.abspath(store.output_dir(args.stage))
    existing = _existing_ancestor(target)
    if not os.path.isdir(existing):
        named = "--out " + args.out if existing == os.path.abspath(args.out) else existing
        return [f"{named} is a file, not a folder: the outputs go to {target}; choose another --out"]
    if not os.access(existing, os.W_OK | os.X_OK):
        return [f"cannot write in {existing} (permission denied): choose another --out"]
    return []


def min_train_resolution(patch_size, grid):
    """Smallest training resolution whose image gives ``MIN_TOKENS`` tokens to the losses."""
    side = GRID_CELL * int(np.ceil(np.sqrt(MIN_TOKENS))) if grid else int(np.ceil(np.sqrt(MIN_TOKENS)))
    return side * patch_size


def sampled_tokens(resolution, patch_size, grid):
    side = max(0, resolution // patch_size)
    return (side // GRID_CELL) ** 2 if grid else side**2


def check_geometry(args, patch_size):
    """Resolutions that give the losses at least two tokens per image, and a usable class count."""
    problems = []
    if args.dataset == "folder" and not 1 <= args.n_classes <= MAX_FOLDER_CLASSES:
        problems.append(
            f"--n_classes {args.n_classes} is out of range for --dataset folder: use 1 to "
            f"{MAX_FOLDER_CLASSES} (label PNGs hold class ids 0..254, 255 = ignore)"
        )
    if args.stage in ("test", "predict"):
        if args.test_resolution < patch_size:
            problems.append(
                f"--test_resolution {args.test_resolution} is below one patch of {patch_size} px; "
                f"use at least {patch_size}"
            )
        return problems
    tokens = sampled_tokens(args.train_resolution, patch_size, args.grid)
    if tokens < MIN_TOKENS:
        problems.append(
            f"--train_resolution {args.train_resolution} gives {tokens} sampled token"
            f"{'' if tokens == 1 else 's'} per image with patch {patch_size} and --grid "
            f"{'yes' if args.grid else 'no'}; use at least "
            f"{min_train_resolution(patch_size, args.grid)}"
        )
    return problems


def _build_split(cfg, split, resolution):
    if cfg.dataset == "toy":
        ensure_toy(cfg.data_dir)
    return build_dataset(
        cfg.dataset,
        cfg.data_dir,
        split,
        resolution,
        n_classes=cfg.n_classes,
        image_dir=cfg.image_dir,
        label_dir=cfg.label_dir,
    )


def _split_resolution(cfg, split):
    return cfg.test_resolution if split == "val" else cfg.train_resolution


def check_dataset(cfg, split, samples=SAMPLES_DECODED):
    """The split's layout, and a sample of its images and labels spread over it decodes within range."""
    if cfg.dataset == "folder" and not 1 <= cfg.n_classes <= MAX_FOLDER_CLASSES:
        return []  # check_geometry reports it; labels cannot be checked against it
    if cfg.stage == "test" and cfg.dataset == "folder" and not cfg.label_dir:
        return [
            "test.py scores predictions against labels: give --label_dir, or segment unlabelled images with predict.py"
        ]
    try:
        data = _build_split(cfg, split, _split_resolution(cfg, split))
    except BadInputError as err:
        return [one_line(err)]
    if len(data) == 0:
        return [f"the {split} split of {cfg.dataset} has no images"]
    picks = sorted(set(np.linspace(0, len(data) - 1, min(samples, len(data))).round().astype(int).tolist()))
    problems = []
    for index in picks:
        try:
            data.load(index)
        except BadInputError as err:
            problems.append(one_line(err))
    return problems


def _codebook_problems(cfg, store, dim, fix):
    path = store.path("codebook")
    try:
        codebook = store.codebook()
    except BadInputError as err:
        return [one_line(err)]
    if codebook.shape != (cfg.num_codebook, dim):
        return [
            f"codebook {path} is {list(codebook.shape)} but this run needs [{cfg.num_codebook}, {dim}] "
            f"(--num_codebook, backbone width): {fix}"
        ]
    if not np.isfinite(codebook).all():
        return [f"codebook {path} holds NaN or infinite values: {fix}"]
    return []


def _fit_problems(path, held, expected):
    """[] when the file's head type and shapes match what the flags build, else its one line."""
    try:
        check_fits(path, held, expected)
    except ArtifactMismatchError as err:
        return [one_line(err)]
    return []


def _segment_problems(cfg, store, dim):
    path = store.path("segment")
    other = next(name for name in SEGMENT_HEADS if name != cfg.head)
    other_path = os.path.join(os.path.dirname(path), f"segment_{other}.pth")
    if not os.path.isfile(path) and os.path.isfile(other_path):
        return [
            f"segment weights {path} not found, but segment_{other}.pth is there: did you mean --head {other}? "
            f"(else run {PRODUCER['segment']} --head {cfg.head})"
        ]
    try:
        state = store.state("segment")
    except BadInputError as err:
        return [one_line(err)]
    return _fit_problems(path, describe_segment(state), expected_segment(cfg, dim))


def _cluster_problems(cfg, store, dim):
    path = store.path("cluster")
    try:
        state = store.state("cluster")
    except BadInputError as err:
        return [one_line(err)]
    if set(state) != {"codebook", "cluster_probe"}:
        return [f"{path} holds {sorted(state)[:4]}, not codebook and cluster_probe: rerun {PRODUCER['cluster']}"]
    return _fit_problems(path, describe_cluster(state), expected_cluster(cfg, dim))


def needed_artifacts(cfg):
    """The earlier stages' artifacts this stage reads (evaluation reads the codebook only for the TR head)."""
    evaluation = cfg.stage in ("test", "predict")
    return [
        kind
        for kind in UPSTREAM_ARTIFACTS[cfg.stage]
        if not (evaluation and kind == "codebook" and not SEGMENT_HEADS[cfg.head].needs_codebook)
    ]


def check_artifacts(cfg, store, dim):
    """Earlier stages' artifacts: present, readable, of this run's shapes, and trained from what this run uses."""
    if cfg.stage == "mediator":
        if not os.path.isfile(store.path("codebook")) or getattr(cfg, "overwrite", False):
            return []
        problems = _codebook_problems(cfg, store, dim, "train_mediator.py --overwrite retrains it")
        return problems + [f"{p} (or --overwrite)" for p in store.problems("codebook")]
    shape_checks = {
        "codebook": lambda: _codebook_problems(cfg, store, dim, "rerun train_mediator.py --overwrite"),
        "segment": lambda: _segment_problems(cfg, store, dim),
        "cluster": lambda: _cluster_problems(cfg, store, dim),
    }
    for kind in needed_artifacts(cfg):
        found = shape_checks[kind]()
        if os.path.isfile(store.path(kind)):
            found = found or store.problems(kind)
        if found:
            return found  # the later artifacts are retrained once this one is fixed
    return []


def _artifact_bytes(cfg, dim):
    codebook = cfg.num_codebook * dim * 4
    if cfg.stage == "mediator":
        return codebook
    if cfg.stage in ("test", "predict"):
        return 0
    with torch.device("meta"), warnings.catch_warnings():
        warnings.simplefilter("ignore")  # empty layers of a bad --n_classes are reported by check_geometry
        segment = sum(t.numel() for t in build_segment(cfg, dim).state_dict().values()) * 4
    if cfg.stage == "front_door":
        return segment
    return segment + codebook + cfg.n_classes * cfg.reduced_dim * 4


def _feature_cache_bytes(run):
    """Bytes the feature cache still needs for the training split (cached items are not counted)."""
    cfg, backbone = run.cfg, run.backbone
    key = feature_cache_key(cfg, backbone)
    directory = cache_dir(cfg.feature_cache, key)
    try:
        items = len(_build_split(cfg, "train", cfg.train_resolution))
    except BadInputError:
        return 0
    cached = len([f for f in os.listdir(directory) if f.endswith(".npy")]) if os.path.isdir(directory) else 0
    tokens = (cfg.train_resolution // backbone.patch_size) ** 2
    return max(0, items - cached) * (tokens * backbone.embed_dim * (2 if "16" in key["dtype"] else 4) + 128)


def _size(n):
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} TiB"


def check_disk(run):
    """Free space for this stage's artifacts (written next to the old ones, then renamed) and the feature cache."""
    cfg = run.cfg
    feature_cache = getattr(cfg, "feature_cache", None)
    needs = {
        _existing_ancestor(run.store.output_dir(cfg.stage)): 2 * _artifact_bytes(cfg, run.backbone.embed_dim)
        + DISK_MARGIN
    }
    if feature_cache:
        cache = _existing_ancestor(feature_cache)
        needs[cache] = needs.get(cache, 0) + _feature_cache_bytes(run)
    by_device = {}
    for path, need in needs.items():
        device = os.stat(path).st_dev
        first, total = by_device.get(device, (path, 0))
        by_device[device] = (first, total + need)
    problems = []
    for path, need in by_device.values():
        free = shutil.disk_usage(path).free
        if free < need:
            problems.append(
                f"{path} has {_size(free)} free but this stage needs about {_size(need)} "
                f"(artifacts, logs{', feature cache' if feature_cache else ''}): free some space "
                f"or choose another --out/--feature_cache"
            )
    return problems


def run_checks(run, splits=None):
    """All problems of this run, one line each; warnings (e.g. released heads without provenance) are printed."""
    cfg, backbone = run.cfg, run.backbone
    splits = STAGE_SPLITS[cfg.stage] if splits is None else splits
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        output = check_output(cfg, run.store)
        problems = check_devices(cfg) + output + check_geometry(cfg, backbone.patch_size)
        for split in splits:
            problems += check_dataset(cfg, split)
        problems += check_artifacts(cfg, run.store, backbone.embed_dim)
        if not output:
            problems += check_disk(run)
    for warning in caught:
        print(f"warning: {warning.message}", file=sys.stderr)
    return problems


def summary(run, splits=None):
    """The short report of a passing ``--check``."""
    cfg, backbone, store = run.cfg, run.backbone, run.store
    splits = STAGE_SPLITS[cfg.stage] if splits is None else splits
    head = f", head {cfg.head}" if hasattr(cfg, "head") else ""
    lines = [
        f"check {cfg.stage} ({cfg.dataset}{head}): OK",
        f"  backbone: {backbone.family}, width {backbone.embed_dim}, patch {backbone.patch_size}",
    ]
    if hasattr(cfg, "grid"):
        lines.append(
            f"  resolution: train {cfg.train_resolution}, "
            f"{sampled_tokens(cfg.train_resolution, backbone.patch_size, cfg.grid)} sampled tokens per image"
        )
    else:
        lines.append(f"  resolution: test {cfg.test_resolution}")
    for split in splits:
        count = len(_build_split(cfg, split, _split_resolution(cfg, split)))
        lines.append(f"  {split}: {count} images, {min(SAMPLES_DECODED, count)} decoded")
    for kind in needed_artifacts(cfg):
        lines.append(f"  {kind}: {store.path(kind)}")
    out = _existing_ancestor(store.output_dir(cfg.stage))
    lines.append(f"  output: {store.output_dir(cfg.stage)} ({_size(shutil.disk_usage(out).free)} free)")
    return lines
