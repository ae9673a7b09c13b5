"""Pre-flight checks: everything a stage can find wrong before it trains for hours.

Each ``check_*`` function returns a list of problems, one line each (empty: all is well).
:func:`run_checks` gathers them at the start of a stage (and alone with ``--check``); the
stage prints them all and stops with exit code 2 before training anything.
"""

import hashlib
import json
import os
import shutil
import sys
import warnings

import numpy as np
import torch
import torch.distributed as dist

from loader.datasets import build_dataset
from loader.feature_cache import cache_key
from loader.netloader import (STAGE_SCRIPTS, ArtifactMismatchError, artifact_path, build_segment, check_fits,
                              codebook_path, describe_cluster, describe_segment, expected_cluster, expected_segment,
                              output_dir, provenance_problems, read_codebook, read_state)
from loader.toy import ensure_toy
from utils.distributed import parse_gpu_ids, under_torchrun
from utils.errors import BadInputError, InvalidInputError, one_line

STAGE_SPLITS = {"mediator": ("train",), "front_door": ("train",), "fine_tuning": ("train",), "test": ("val",)}
UPSTREAM_ARTIFACTS = {"mediator": (), "front_door": ("codebook",), "fine_tuning": ("codebook", "segment"),
                      "test": ("codebook", "segment", "cluster")}
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
            problems.append(f"--gpu {args.gpu} asks for GPU {missing[0]} but this machine has {count} CUDA "
                            f"device{'s' if count > 1 else ''} (ids 0..{count - 1})")
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


def check_output(args):
    """The stage's output directory can be created and written (``--out`` is not a file)."""
    target = os.path.abspath(output_dir(args))
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
    return (side // GRID_CELL) ** 2 if grid else side ** 2


def check_geometry(args, patch_size):
    """Resolutions that give the losses at least two tokens per image, and a usable class count."""
    problems = []
    if args.dataset == "folder" and not 1 <= args.n_classes <= MAX_FOLDER_CLASSES:
        problems.append(f"--n_classes {args.n_classes} is out of range for --dataset folder: use 1 to "
                        f"{MAX_FOLDER_CLASSES} (label PNGs hold class ids 0..254, 255 = ignore)")
    if args.stage == "test":
        if args.test_resolution < patch_size:
            problems.append(f"--test_resolution {args.test_resolution} is below one patch of {patch_size} px; "
                            f"use at least {patch_size}")
        return problems
    tokens = sampled_tokens(args.train_resolution, patch_size, args.grid)
    if tokens < MIN_TOKENS:
        problems.append(f"--train_resolution {args.train_resolution} gives {tokens} sampled token"
                        f"{'' if tokens == 1 else 's'} per image with patch {patch_size} and --grid "
                        f"{'yes' if args.grid else 'no'}; use at least "
                        f"{min_train_resolution(patch_size, args.grid)}")
    return problems


def _build_split(args, split, resolution):
    if args.dataset == "toy":
        ensure_toy(args.data_dir)
    return build_dataset(args.dataset, args.data_dir, split, resolution, n_classes=args.n_classes,
                         image_dir=args.image_dir, label_dir=args.label_dir)


def check_dataset(args, split, samples=SAMPLES_DECODED):
    """The split's layout, and a sample of its images and labels spread over it decodes within range."""
    resolution = args.test_resolution if split == "val" else args.train_resolution
    if args.dataset == "folder" and not 1 <= args.n_classes <= MAX_FOLDER_CLASSES:
        return []  # check_geometry reports it; labels cannot be checked against it
    if args.stage == "test" and args.dataset == "folder" and not args.label_dir:
        return ["test.py scores predictions against labels: give --label_dir, or segment unlabelled images with "
                "predict.py"]
    try:
        data = _build_split(args, split, resolution)
    except BadInputError as err:
        return [one_line(err)]
    if len(data) == 0:
        return [f"the {split} split of {args.dataset} has no images"]
    picks = sorted(set(np.linspace(0, len(data) - 1, min(samples, len(data))).round().astype(int).tolist()))
    problems = []
    for index in picks:
        try:
            data.load(index)
        except BadInputError as err:
            problems.append(one_line(err))
    return problems


def _codebook_problems(args, dim, fix):
    path = artifact_path(args, "codebook")
    try:
        codebook = read_codebook(path)
    except BadInputError as err:
        return [one_line(err)]
    problems = []
    if codebook.shape != (args.num_codebook, dim):
        problems.append(f"codebook {path} is {list(codebook.shape)} but this run needs [{args.num_codebook}, {dim}] "
                        f"(--num_codebook, backbone width): {fix}")
    elif not np.isfinite(codebook).all():
        problems.append(f"codebook {path} holds NaN or infinite values: {fix}")
    return problems


def _fit_problems(path, held, expected):
    """[] when the file's head type and shapes match what the flags build, else its one line."""
    try:
        check_fits(path, held, expected)
    except ArtifactMismatchError as err:
        return [one_line(err)]
    return []


def _segment_problems(args, dim):
    path = artifact_path(args, "segment")
    other = "tr" if args.head == "mlp" else "mlp"
    other_path = os.path.join(os.path.dirname(path), f"segment_{other}.pth")
    if not os.path.isfile(path) and os.path.isfile(other_path):
        return [f"segment weights {path} not found, but segment_{other}.pth is there: did you mean --head {other}? "
                f"(else run {STAGE_SCRIPTS['segment']} --head {args.head})"]
    try:
        state = read_state(path, "segment", given=bool(getattr(args, "segment", None)))
    except BadInputError as err:
        return [one_line(err)]
    return _fit_problems(path, describe_segment(state), expected_segment(args, dim))


def _cluster_problems(args, dim):
    path = artifact_path(args, "cluster")
    try:
        state = read_state(path, "cluster", given=bool(getattr(args, "cluster", None)))
    except BadInputError as err:
        return [one_line(err)]
    if set(state) != {"codebook", "cluster_probe"}:
        return [f"{path} holds {sorted(state)[:4]}, not codebook and cluster_probe: rerun {STAGE_SCRIPTS['cluster']}"]
    return _fit_problems(path, describe_cluster(state), expected_cluster(args, dim))


def check_artifacts(args, dim):
    """Earlier stages' artifacts: present, readable, of this run's shapes, and trained from what this run uses."""
    if args.stage == "mediator":
        if not os.path.isfile(codebook_path(args)) or getattr(args, "overwrite", False):
            return []
        fix = "train_mediator.py --overwrite retrains it"
        problems = _codebook_problems(args, dim, fix)
        return problems + [f"{p} (or --overwrite)" for p in provenance_problems(args, "codebook")]
    shape_checks = {"codebook": lambda: _codebook_problems(args, dim, "rerun train_mediator.py --overwrite"),
                    "segment": lambda: _segment_problems(args, dim), "cluster": lambda: _cluster_problems(args, dim)}
    # Evaluation needs the codebook only for the TR head's queries.
    needed = [k for k in UPSTREAM_ARTIFACTS[args.stage] if not (args.stage == "test" and k == "codebook"
                                                                 and args.head == "mlp")]
    for kind in needed:
        found = shape_checks[kind]()
        if os.path.isfile(artifact_path(args, kind)):
            found = found or provenance_problems(args, kind)
        if found:
            return found  # the later artifacts are retrained once this one is fixed
    return []


def _artifact_bytes(args, dim):
    codebook = args.num_codebook * dim * 4
    if args.stage == "mediator":
        return codebook
    if args.stage == "test":
        return 0
    with torch.device("meta"), warnings.catch_warnings():
        warnings.simplefilter("ignore")  # empty layers of a bad --n_classes are reported by check_geometry
        segment = sum(t.numel() for t in build_segment(args, dim).state_dict().values()) * 4
    if args.stage == "front_door":
        return segment
    return segment + codebook + args.n_classes * args.reduced_dim * 4


def _feature_cache_bytes(args, backbone):
    """Bytes the feature cache still needs for the training split (cached items are not counted)."""
    dtype = torch.float16 if args.amp and torch.cuda.is_available() and not args.cpu else torch.float32
    key = cache_key(args, backbone, "train", args.train_resolution, dtype)
    cache_dir = os.path.join(args.feature_cache,
                             hashlib.sha1(json.dumps(key, sort_keys=True).encode()).hexdigest()[:16])
    try:
        items = len(_build_split(args, "train", args.train_resolution))
    except BadInputError:
        return 0
    cached = len([f for f in os.listdir(cache_dir) if f.endswith(".npy")]) if os.path.isdir(cache_dir) else 0
    tokens = (args.train_resolution // backbone.patch_size) ** 2
    return max(0, items - cached) * (tokens * backbone.embed_dim * (2 if dtype == torch.float16 else 4) + 128)


def _size(n):
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} TiB"


def check_disk(args, backbone):
    """Free space for this stage's artifacts (written next to the old ones, then renamed) and the feature cache."""
    needs = {}
    out = _existing_ancestor(output_dir(args))
    needs[out] = 2 * _artifact_bytes(args, backbone.embed_dim) + DISK_MARGIN
    if args.feature_cache and args.stage != "test":
        cache = _existing_ancestor(args.feature_cache)
        needs[cache] = needs.get(cache, 0) + _feature_cache_bytes(args, backbone)
    by_device = {}
    for path, need in needs.items():
        device = os.stat(path).st_dev
        first, total = by_device.get(device, (path, 0))
        by_device[device] = (first, total + need)
    problems = []
    for path, need in by_device.values():
        free = shutil.disk_usage(path).free
        if free < need:
            problems.append(f"{path} has {_size(free)} free but this stage needs about {_size(need)} "
                            f"(artifacts, logs{', feature cache' if args.feature_cache else ''}): free some space "
                            f"or choose another --out/--feature_cache")
    return problems


def run_checks(args, backbone, splits=None):
    """All problems of this run, one line each; warnings (e.g. released heads without provenance) are printed."""
    splits = STAGE_SPLITS[args.stage] if splits is None else splits
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        problems = check_devices(args) + check_output(args) + check_geometry(args, backbone.patch_size)
        for split in splits:
            problems += check_dataset(args, split)
        problems += check_artifacts(args, backbone.embed_dim)
        if not check_output(args):
            problems += check_disk(args, backbone)
    for warning in caught:
        print(f"warning: {warning.message}", file=sys.stderr)
    return problems


def summary(args, backbone, splits=None):
    """The short report of a passing ``--check``."""
    splits = STAGE_SPLITS[args.stage] if splits is None else splits
    lines = [f"check {args.stage} ({args.dataset}, head {args.head}): OK",
             f"  backbone: {backbone.family}, width {backbone.embed_dim}, patch {backbone.patch_size}",
             f"  resolution: train {args.train_resolution}, test {args.test_resolution}, "
             f"{sampled_tokens(args.train_resolution, backbone.patch_size, args.grid)} sampled tokens per image"]
    for split in splits:
        resolution = args.test_resolution if split == "val" else args.train_resolution
        count = len(_build_split(args, split, resolution))
        lines.append(f"  {split}: {count} images, {min(SAMPLES_DECODED, count)} decoded")
    # Evaluation needs the codebook only for the TR head's queries.
    needed = [k for k in UPSTREAM_ARTIFACTS[args.stage] if not (args.stage == "test" and k == "codebook"
                                                                 and args.head == "mlp")]
    for kind in needed:
        lines.append(f"  {kind}: {artifact_path(args, kind)}")
    out = _existing_ancestor(output_dir(args))
    lines.append(f"  output: {output_dir(args)} ({_size(shutil.disk_usage(out).free)} free)")
    return lines
