"""Pre-flight checks: everything a stage can find wrong before it trains for hours.

Each ``check_*`` returns its problems, one line each; :func:`run_checks` gathers them at the start of a stage (and
alone with ``--check``), which prints them all and stops (exit 2) before training anything.
"""

import os
import shutil
import sys
import warnings

import numpy as np
import torch
import torch.distributed as dist

from engine.build import build_segment, build_split, feature_cache_key, read_artifact, read_codebook
from engine.store import PRODUCER
from loader.feature_cache import cache_dir
from loader.toy import ensure_toy
from modules.segment import SEGMENT_HEADS
from utils.distributed import parse_gpu_ids, under_torchrun
from utils.errors import BadInputError, InvalidInputError, one_line

SPLITS = {"mediator": ("train",), "front_door": ("train",), "fine_tuning": ("train",), "test": ("val",), "predict": ()}
UPSTREAM = {"mediator": (), "front_door": ("codebook",), "fine_tuning": ("codebook", "segment")}
SAMPLES_DECODED, GRID_CELL, MIN_TOKENS = 5, 4, 2
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
    problems = [f"--gpu {args.gpu} names a device twice; give each GPU id once"] if len(ids) != len(set(ids)) else []
    if torch.cuda.is_available():
        count = torch.cuda.device_count()
        missing = [i for i in ids if not 0 <= i < count]
        if missing:
            problems.append(f"--gpu {args.gpu} asks for GPU {missing[0]} but this machine has {count} CUDA device(s)")
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


def sampled_tokens(resolution, patch_size, grid):
    return (resolution // patch_size // (GRID_CELL if grid else 1)) ** 2


def check_geometry(cfg, patch_size):
    """Resolutions that give the losses at least two tokens per image, and a usable class count."""
    problems = []
    if cfg.dataset == "folder" and not 1 <= cfg.n_classes <= MAX_FOLDER_CLASSES:
        limits = f"use 1 to {MAX_FOLDER_CLASSES} (label PNGs hold class ids 0..254, 255 = ignore)"
        problems.append(f"--n_classes {cfg.n_classes} is out of range for --dataset folder: {limits}")
    if cfg.stage in ("test", "predict"):
        if cfg.test_resolution < patch_size:
            limit = f"below one patch of {patch_size} px; use at least {patch_size}"
            problems.append(f"--test_resolution {cfg.test_resolution} is {limit}")
        return problems
    tokens = sampled_tokens(cfg.train_resolution, patch_size, cfg.grid)
    if tokens < MIN_TOKENS:
        side = (GRID_CELL if cfg.grid else 1) * int(np.ceil(np.sqrt(MIN_TOKENS)))
        how = f"with patch {patch_size} and --grid {'yes' if cfg.grid else 'no'}; use at least {side * patch_size}"
        problems.append(f"--train_resolution {cfg.train_resolution} gives {tokens} sampled token(s) per image {how}")
    return problems


def _split(cfg, split, backbone):
    if cfg.dataset == "toy":
        ensure_toy(cfg.data_dir)
    return build_split(cfg, split, cfg.test_resolution if split == "val" else cfg.train_resolution, backbone)


def check_dataset(cfg, split, backbone, samples=SAMPLES_DECODED):
    """The split's layout, and a sample of its images and labels spread over it decodes within range."""
    if cfg.dataset == "folder" and not 1 <= cfg.n_classes <= MAX_FOLDER_CLASSES:
        return []  # check_geometry reports it; labels cannot be checked against it
    if cfg.stage == "test" and cfg.dataset == "folder" and not cfg.label_dir:
        why = "test.py scores predictions against labels"
        return [f"{why}: give --label_dir, or segment unlabelled images with predict.py"]
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # the stage itself warns about left-out files
            data = _split(cfg, split, backbone)
        picks = sorted(set(np.linspace(0, len(data) - 1, min(samples, len(data))).round().astype(int).tolist()))
    except BadInputError as err:
        return [one_line(err)]
    problems = []
    for index in picks:
        try:
            data.load(index)
        except BadInputError as err:
            problems.append(one_line(err))
    return problems


def needed_artifacts(cfg):
    """The earlier stages' artifacts this stage reads (evaluation reads the codebook only for the TR head)."""
    if cfg.stage in ("test", "predict"):
        return (["codebook"] if SEGMENT_HEADS[cfg.head].needs_codebook else []) + ["segment", "cluster"]
    return list(UPSTREAM[cfg.stage])


def _artifact_problems(cfg, store, kind, dim):
    """[] when ``kind`` reads, fits these flags, holds finite values and was trained from what this run uses."""
    path = store.path(kind)
    if kind == "segment" and not os.path.isfile(path):
        other = next(name for name in SEGMENT_HEADS if name != cfg.head)
        if os.path.isfile(os.path.join(os.path.dirname(path), f"segment_{other}.pth")):
            hint = f"did you mean --head {other}? (else run {PRODUCER['segment']} --head {cfg.head})"
            return [f"segment weights {path} not found, but segment_{other}.pth is there: {hint}"]
    try:
        if kind == "codebook" and not torch.isfinite(read_codebook(store, cfg, dim)).all():
            return [f"codebook {path} holds NaN or infinite values: rerun {PRODUCER['codebook']} --overwrite"]
        if kind != "codebook":
            read_artifact(store, kind, cfg, dim)
    except BadInputError as err:
        return [one_line(err)]
    return store.problems(kind)


def check_artifacts(cfg, store, dim):
    """Earlier stages' artifacts: present, readable, of this run's shapes, and trained from what this run uses."""
    if cfg.stage == "mediator":
        if not os.path.isfile(store.path("codebook")) or cfg.overwrite:
            return []
        return [f"{p} (or --overwrite)" for p in _artifact_problems(cfg, store, "codebook", dim)]
    for kind in needed_artifacts(cfg):
        problems = _artifact_problems(cfg, store, kind, dim)
        if problems:
            return problems  # the later artifacts are retrained once this one is fixed
    return []


def _bytes_needed(run):
    """Bytes the stage writes: its artifacts (twice: written beside the old ones, then renamed) and cache."""
    cfg, dim = run.cfg, run.backbone.embed_dim
    codebook = cfg.num_codebook * dim * 4
    need = {"mediator": codebook, "test": 0, "predict": 0}.get(cfg.stage)
    if need is None:
        with torch.device("meta"), warnings.catch_warnings():
            warnings.simplefilter("ignore")  # empty layers of a bad --n_classes are reported by check_geometry
            need = 4 * sum(t.numel() for t in build_segment(cfg, dim).state_dict().values())
        need += 0 if cfg.stage == "front_door" else codebook + cfg.n_classes * cfg.reduced_dim * 4
    cache = 0
    if getattr(cfg, "feature_cache", None):
        key = feature_cache_key(cfg, run.backbone)
        directory = cache_dir(cfg.feature_cache, key)
        try:
            items = len(_split(cfg, "train", run.backbone))
        except BadInputError:
            items = 0
        cached = len([f for f in os.listdir(directory) if f.endswith(".npy")]) if os.path.isdir(directory) else 0
        per_item = (cfg.train_resolution // run.backbone.patch_size) ** 2 * dim * (2 if "16" in key["dtype"] else 4)
        cache = max(0, items - cached) * (per_item + 128)
    return 2 * need + DISK_MARGIN, cache


def _size(n):
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024


def check_disk(run):
    """Free space for this stage's artifacts and the feature cache, per file system."""
    artifacts, cache = _bytes_needed(run)
    by_device = {}  # file system -> (its first folder, bytes needed there)
    wanted = [(run.store.output_dir(run.cfg.stage), artifacts), (getattr(run.cfg, "feature_cache", None), cache)]
    for folder, need in wanted:
        if need:
            path = _existing_ancestor(folder)
            first, total = by_device.get(os.stat(path).st_dev, (path, 0))
            by_device[os.stat(path).st_dev] = (first, total + need)
    problems = []
    for path, need in by_device.values():
        free = shutil.disk_usage(path).free
        if free < need:
            what = f"artifacts, logs{', feature cache' if cache else ''}"
            fix = "free some space or choose another --out/--feature_cache"
            problems.append(f"{path} has {_size(free)} free but this stage needs about {_size(need)} ({what}): {fix}")
    return problems


def run_checks(run, splits=None):
    """All problems of this run, one line each."""
    cfg, backbone = run.cfg, run.backbone
    output = check_output(cfg, run.store)
    problems = check_devices(cfg) + output + check_geometry(cfg, backbone.patch_size)
    for split in SPLITS[cfg.stage] if splits is None else splits:
        problems += check_dataset(cfg, split, backbone)
    problems += check_artifacts(cfg, run.store, backbone.embed_dim)
    return problems + ([] if output else check_disk(run))


def summary(run, splits=None):
    """The short report of a passing ``--check``."""
    cfg, backbone, store = run.cfg, run.backbone, run.store
    head = f", head {cfg.head}" if hasattr(cfg, "head") else ""
    lines = [
        f"check {cfg.stage} ({cfg.dataset}{head}): OK",
        f"  backbone: {backbone.family}, width {backbone.embed_dim}, patch {backbone.patch_size}",
    ]
    if hasattr(cfg, "grid"):
        tokens = sampled_tokens(cfg.train_resolution, backbone.patch_size, cfg.grid)
        lines.append(f"  resolution: train {cfg.train_resolution}, {tokens} sampled tokens per image")
    else:
        lines.append(f"  resolution: test {cfg.test_resolution}")
    for split in SPLITS[cfg.stage] if splits is None else splits:
        count = len(_split(cfg, split, backbone))
        lines.append(f"  {split}: {count} images, {min(SAMPLES_DECODED, count)} decoded")
    lines += [f"  {kind}: {store.path(kind)}" for kind in needed_artifacts(cfg)]
    free = _size(shutil.disk_usage(_existing_ancestor(store.output_dir(cfg.stage))).free)
    return lines + [f"  output: {store.output_dir(cfg.stage)} ({free} free)"]
