"""What every stage script does around its method: start the processes, set a run up, report its end.

``run(main, parser)`` parses the flags, locks the output directory, starts one process per
device and turns every stop into its exit code (utils.errors.EXIT_CODES) with one line.
``prepare(args)`` sets one process up: seeds, backbone, the resolved configuration, the
artifact store and the pre-flight checks; it returns the :class:`Run` the script works with.
"""

import dataclasses
import os
import sys
import warnings

import torch

from engine import preflight
from engine.build import build_backbone, feature_cache_key
from engine.config import Config, resolve, save_config
from engine.loop import Trainer
from engine.store import ArtifactStore, RunLock, backbone_identity, folder_dir_name
from loader.batches import make_loader, seed_everything
from loader.datasets import build_dataset, dataset_info
from loader.feature_cache import FeatureCache, TokenSource
from loader.toy import ensure_toy
from models.backbone import FrozenViT, checkpoint_stem
from utils.distributed import DistInfo, all_reduce_mean, barrier, cleanup, launch, leave, setup
from utils.errors import EXIT_INTERRUPTED, REPORTED_ERRORS, BadInputError, InvalidInputError, SpawnedExit, one_line


def dataset_dir_name(dataset, image_dir, data_dir=None):
    """``<dataset>`` of the artifact layout: the name, or ``folder-<name>-<hash>`` per image folder."""
    return folder_dir_name(image_dir or data_dir) if dataset == "folder" else dataset


def training_folder(args):
    """The image folder a ``--dataset folder`` run trains on (``--train_image_dir`` for test.py/predict.py)."""
    return os.path.abspath(getattr(args, "train_image_dir", None) or args.image_dir or args.data_dir)


def dataset_identity(args):
    if args.dataset == "folder":
        return {"name": "folder", "image_dir": training_folder(args)}
    return {"name": args.dataset}


def artifact_store(args, identity=None):
    """The store of this run's artifacts (only the flags that place them are read)."""
    root = os.path.join(args.out, dataset_dir_name(args.dataset, training_folder(args)))
    given = {kind: getattr(args, kind, None) for kind in ("codebook", "segment", "cluster")}
    return ArtifactStore(
        root,
        checkpoint_stem(args.ckpt or None, args.arch),
        args.num_codebook,
        getattr(args, "head", None),
        given,
        identity,
    )


def _print_warnings(caught):
    for warning in caught:
        print(f"warning: {warning.message}", file=sys.stderr)


def run(main, parser, argv=None, single_process=False, lock=True):
    """Parse flags, launch one process per device, and report a stop the user can act on as one line.

    Bad input and the other reported stops (utils.errors) are printed as one line with their
    exit code; any other exception is a bug and keeps its traceback. Ctrl-C exits 130 and names
    the resumable state when the stage saved one. ``single_process``: evaluation scripts use only
    the first id of ``--gpu``. ``lock``: hold the stage's output directory (``run.lock``) so that
    a second run writing it at the same time is refused.
    """
    args = parser.parse_args(argv)
    if single_process:
        args.gpu = str(args.gpu).split(",")[0]
    held = None
    try:
        if hasattr(args, "stage"):  # a stage script's parser (engine/config.py)
            problems = preflight.check_devices(args) + preflight.check_output(args, artifact_store(args))
            if problems:
                raise preflight.report(problems)
            if lock and not args.check and int(os.environ.get("RANK", 0)) == 0:
                with warnings.catch_warnings(record=True) as caught:
                    warnings.simplefilter("always")
                    held = RunLock(artifact_store(args).output_dir(args.stage)).acquire()
                _print_warnings(caught)
        launch(main, args)
        leave()  # torchrun's processes (spawned ones leave in their own process)
    except SpawnedExit as err:
        sys.exit(err.exit_code)
    except REPORTED_ERRORS as err:
        print(f"error: {one_line(err)}", file=sys.stderr)
        sys.exit(err.exit_code)
    except KeyboardInterrupt as err:
        saved = f"; {err.args[0]}" if err.args else ""
        print(f"interrupted: no partial artifact was written{saved}", file=sys.stderr)
        sys.exit(EXIT_INTERRUPTED)
    finally:
        if held is not None:
            held.release()
        cleanup()


@dataclasses.dataclass(frozen=True)
class Run:
    """One process's run: its resolved configuration, place in the job, backbone and artifact store."""

    cfg: Config
    info: DistInfo
    backbone: FrozenViT
    store: ArtifactStore

    @property
    def device(self):
        return self.info.device

    def dataset(self, split, resolution):
        """A split with the backbone's own normalisation; the toy data is generated once, by rank 0."""
        cfg = self.cfg
        if cfg.dataset == "toy":
            if self.info.is_main:
                ensure_toy(cfg.data_dir)
            barrier(self.info)
        return build_dataset(
            cfg.dataset,
            cfg.data_dir,
            split,
            resolution,
            mean=self.backbone.mean,
            std=self.backbone.std,
            n_classes=cfg.n_classes,
            image_dir=cfg.image_dir,
            label_dir=cfg.label_dir,
        )

    def train_loader(self):
        """The training split at ``--train_resolution``: ``(loader, sampler)``, shuffled, ``--drop_last``."""
        cfg = self.cfg
        return make_loader(
            self.dataset("train", cfg.train_resolution),
            self.info,
            cfg.batch_size,
            cfg.num_workers,
            shuffle=True,
            drop_last=cfg.drop_last,
            seed=cfg.seed,
        )

    def tokens(self):
        """``tokens(img, ind)``: the frozen tokens of training batches, cached with ``--feature_cache``."""
        if not self.cfg.feature_cache:
            return TokenSource(self.backbone)
        return TokenSource(
            self.backbone, FeatureCache(self.cfg.feature_cache, feature_cache_key(self.cfg, self.backbone))
        )

    def write_config(self, name, directory=None):
        if self.info.is_main:
            directory = directory or self.store.output_dir(self.cfg.stage)
            os.makedirs(directory, exist_ok=True)
            save_config(self.cfg, os.path.join(directory, f"config_{name}.json"))

    def trainer(self, shared, local=None):
        """The :class:`~engine.loop.Trainer` of this training stage, logging into its output directory."""
        cfg = self.cfg
        return Trainer(
            cfg.stage,
            self.info,
            self.store.output_dir(cfg.stage),
            epochs=cfg.epoch,
            max_steps=cfg.max_steps,
            save_every=cfg.save_every,
            amp=cfg.amp,
            flags=comparable_flags(cfg),
            shared=shared,
            local=local,
        )

    def flags(self):
        """The flags recorded with every artifact this run saves."""
        return {key: getattr(self.cfg, key) for key in RECORDED_FLAGS if hasattr(self.cfg, key)}


# Flags that may differ between an interrupted run and its resumption without changing the result.
RESUME_FREE_FLAGS = ("resume", "save_every", "dist_timeout", "num_workers", "port", "gpu", "cpu", "check")
# Flags recorded in the provenance records (the shapes are checked by the strict loads).
RECORDED_FLAGS = (
    "stage",
    "dataset",
    "n_classes",
    "head",
    "num_codebook",
    "reduced_dim",
    "projection_dim",
    "num_queries",
    "train_resolution",
    "grid",
    "epoch",
    "lr",
    "seed",
    "family_resolved",
    "num_heads",
    "world_size",
    "reference_stage3",
)


def comparable_flags(cfg):
    return {k: v for k, v in cfg.as_dict().items() if k not in RESUME_FREE_FLAGS}


def prepare(args, splits=None):
    """Set this process up and return its :class:`Run`; stop (exit 2) when the pre-flight check fails.

    Rank 0 checks the run (:mod:`engine.preflight`; ``splits``: the dataset splits the stage
    reads, by default those of its stage); when it finds problems every rank stops before
    training. With ``--check`` every rank stops here.
    """
    info = setup(args.gpu, use_cpu=args.cpu, timeout_min=getattr(args, "dist_timeout", 10.0))
    seed_everything(getattr(args, "seed", 0) + info.rank)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        backbone = build_backbone(args, info.device)
    if info.is_main:
        _print_warnings(caught)
    n_classes = args.n_classes if args.dataset == "folder" else dataset_info(args.dataset).n_classes
    if n_classes is None:
        raise InvalidInputError("--dataset folder needs --n_classes")
    extra = {"family_resolved": backbone.family, "world_size": info.world_size}
    if hasattr(args, "amp"):
        extra["amp"] = info.device.type == "cuda" if args.amp is None else args.amp
    cfg = resolve(args, backbone.patch_size, n_classes, **extra)
    identity = {"dataset": dataset_identity(cfg), "backbone": backbone_identity(cfg.ckpt, cfg.arch)}
    run = Run(cfg, info, backbone, artifact_store(cfg, identity))
    if info.device.type == "cuda":
        torch.backends.cudnn.benchmark = True
    problems = preflight.run_checks(run, splits) if info.is_main else []
    if all_reduce_mean(float(len(problems)), info) > 0:
        if info.is_main:
            raise preflight.report(problems)
        sys.exit(BadInputError.exit_code)  # rank 0 reports the problems
    if cfg.check:
        if info.is_main:
            print("\n".join(preflight.summary(run, splits)))
        sys.exit(0)
    return run


def single_process(run):
    """The run as if it ran alone (evaluation runs on rank 0 only, without collectives)."""
    return dataclasses.replace(run, info=dataclasses.replace(run.info, rank=0, world_size=1))
