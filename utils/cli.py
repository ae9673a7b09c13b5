"""Entry-point helpers shared by the stage scripts: error reporting and run set-up."""

import dataclasses
import os
import sys
import warnings

import torch

from loader.datasets import build_dataset, dataset_info
from loader.feature_cache import FeatureCache, TokenSource, cache_key
from loader.netloader import RunLock, build_backbone, output_dir
from loader.toy import ensure_toy
from utils import preflight
from utils.config import resolve, save_config
from utils.distributed import all_reduce_mean, barrier, cleanup, launch, leave, setup
from utils.engine import make_loader, seed_everything
from utils.errors import REPORTED_ERRORS, BadInputError, InvalidInputError, SpawnedBadInput, one_line


def _print_warnings(caught):
    for warning in caught:
        print(f"warning: {warning.message}", file=sys.stderr)


def lock_output(args):
    """Hold the stage's output directory for this run (rank 0 of a torchrun job, or the launching process)."""
    if int(os.environ.get("RANK", 0)) != 0:
        return None
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        lock = RunLock(output_dir(args)).acquire()
    _print_warnings(caught)
    return lock


def run(main, parser, argv=None, single_process=False, lock=True):
    """Parse flags, launch one process per device, and report a stop the user can act on as one line.

    Bad input (:class:`~utils.errors.BadInputError`, exit code 2) and the other reported stops
    (:class:`~utils.errors.RunStoppedError`: a non-finite loss, exit 3; a dead process, exit 1) are
    printed as one line; any other exception is a bug and keeps its traceback. Ctrl-C exits 130
    and names the resumable state when the stage saved one. ``single_process``:
    evaluation-type scripts use only the first id of ``--gpu``. ``lock``: hold the stage's output
    directory (``run.lock``) so that a second run writing it at the same time is refused.
    """
    args = parser.parse_args(argv)
    if single_process:
        args.gpu = str(args.gpu).split(",")[0]
    held = None
    try:
        if hasattr(args, "stage"):  # a stage script's shared parser (utils/config.py)
            problems = preflight.check_devices(args) + preflight.check_output(args)
            if problems:
                raise preflight.report(problems)
            if lock and not args.check:
                held = lock_output(args)
        launch(main, args)
        leave()  # torchrun's processes (spawned ones leave in their own process)
    except SpawnedBadInput as err:
        sys.exit(err.exit_code)
    except REPORTED_ERRORS as err:
        print(f"error: {one_line(err)}", file=sys.stderr)
        sys.exit(err.exit_code)
    except KeyboardInterrupt as err:
        saved = f"; {err.args[0]}" if err.args else ""
        print(f"interrupted: no partial artifact was written{saved}", file=sys.stderr)
        sys.exit(130)
    finally:
        if held is not None:
            held.release()
        cleanup()


def prepare(args, splits=None):
    """Set up this process, the backbone and the resolved flags, then run the pre-flight checks.

    Returns ``(info, backbone)``; ``args`` is completed in place with the published defaults.
    Rank 0 checks the run (see :mod:`utils.preflight`; ``splits``: the dataset splits the
    stage reads, by default those of ``args.stage``); when it finds problems every rank stops
    before training, with exit code 2. With ``--check`` every rank stops here.
    """
    info = setup(args.gpu, use_cpu=args.cpu, timeout_min=args.dist_timeout)
    seed_everything(args.seed + info.rank)
    if args.amp is None:
        args.amp = info.device.type == "cuda"
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        backbone = build_backbone(args, info.device)
    if info.is_main:
        _print_warnings(caught)
    n_classes = args.n_classes if args.dataset == "folder" else dataset_info(args.dataset).n_classes
    if n_classes is None:
        raise InvalidInputError("--dataset folder needs --n_classes")
    resolve(args, backbone.patch_size, n_classes)
    args.family_resolved = backbone.family
    args.world_size = info.world_size
    if info.device.type == "cuda":
        torch.backends.cudnn.benchmark = True
    problems = preflight.run_checks(args, backbone, splits) if info.is_main else []
    if all_reduce_mean(float(len(problems)), info) > 0:
        if info.is_main:
            raise preflight.report(problems)
        sys.exit(BadInputError.exit_code)  # rank 0 reports the problems
    if args.check:
        if info.is_main:
            print("\n".join(preflight.summary(args, backbone, splits)))
        sys.exit(0)
    return info, backbone


def single_process(info):
    """This process's place as if it ran alone (evaluation runs on rank 0 only, without collectives)."""
    return dataclasses.replace(info, rank=0, world_size=1)


def dataset(args, info, split, resolution, backbone):
    """Build a split with the backbone's own normalisation; the toy data is generated once, by rank 0."""
    if args.dataset == "toy":
        if info.is_main:
            ensure_toy(args.data_dir)
        barrier(info)
    return build_dataset(args.dataset, args.data_dir, split, resolution, mean=backbone.mean, std=backbone.std,
                         n_classes=args.n_classes, image_dir=args.image_dir, label_dir=args.label_dir)


def train_loader(args, info, backbone):
    """The training split at ``--train_resolution``: ``(loader, sampler)``, shuffled, ``--drop_last``."""
    train_set = dataset(args, info, "train", args.train_resolution, backbone)
    return make_loader(train_set, info, args.batch_size, args.num_workers, shuffle=True, drop_last=args.drop_last,
                       seed=args.seed)


def token_source(args, info, backbone, split, resolution):
    """The frozen tokens of training batches: ``tokens(img, ind)``, cached with ``--feature_cache``."""
    if not args.feature_cache:
        return TokenSource(backbone)
    dtype = torch.float16 if args.amp and info.device.type == "cuda" else torch.float32
    return TokenSource(backbone, FeatureCache(args.feature_cache, cache_key(args, backbone, split, resolution, dtype)))


def write_config(args, directory, name):
    os.makedirs(directory, exist_ok=True)
    save_config(args, os.path.join(directory, f"config_{name}.json"))
