"""What every stage script does around its method: start the processes, set a run up, report its end.

:func:`run` starts the processes and turns every stop into one line and its exit code; :func:`prepare` sets one
process up (seeds, backbone, configuration, artifact store, pre-flight checks) and returns its :class:`Run`.
"""

import contextlib
import dataclasses
import os
import sys
import warnings

import torch

from engine import preflight
from engine.build import build_backbone, build_split, feature_cache_key
from engine.config import TRAINING, Config, resolve, save_config
from engine.loop import Trainer, running_name
from engine.store import ArtifactStore, RunLock, backbone_identity, folder_dir_name
from loader.batches import make_loader, seed_everything
from loader.datasets import dataset_info
from loader.feature_cache import FeatureCache, TokenSource
from loader.toy import ensure_toy
from models.backbone import FrozenViT, checkpoint_stem
from models.files import checkpoint_files
from models.normalisation import normalisation_hint
from utils.atomic import remove_stale_temporaries
from utils.distributed import PREEMPTION, DistInfo, Terminated, all_reduce_mean, barrier, cleanup, launch, leave, setup
from utils.errors import (
    EXIT_INTERRUPTED,
    REPORTED_ERRORS,
    BadInputError,
    InvalidInputError,
    SpawnedExit,
    one_line,
    show_warning,
)

# fmt: off
# Flags that may differ between an interrupted run and its resumption without changing the result.
RESUME_FREE = ("resume", "save_every", "dist_timeout", "num_workers", "port", "gpu", "cpu", "check", "lock_timeout",
               "overwrite")
# Flags recorded in the provenance records (the shapes are checked by the strict loads).
RECORDED_FLAGS = ("stage", "dataset", "n_classes", "head", "num_codebook", "reduced_dim", "projection_dim",
                  "num_queries", "train_resolution", "grid", "epoch", "lr", "seed", "family_resolved", "num_heads",
                  "world_size")
# fmt: on


def training_folder(args):
    """The image folder a ``--dataset folder`` run trains on (``--train_image_dir`` for test.py/predict.py)."""
    return os.path.abspath(getattr(args, "train_image_dir", None) or args.image_dir or args.data_dir)


def artifact_store(args, identity=None):
    """The store of this run's artifacts (only the flags that place them are read)."""
    root = os.path.join(args.out, folder_dir_name(training_folder(args)) if args.dataset == "folder" else args.dataset)
    given = {kind: getattr(args, kind, None) for kind in ("codebook", "segment", "cluster")}
    baseline = checkpoint_stem(args.ckpt or None, args.arch)
    return ArtifactStore(root, baseline, args.num_codebook, getattr(args, "head", None), given, identity)


@contextlib.contextmanager
def printed_warnings(show=True):
    """The warnings raised inside, printed once it ends as one ``warning:`` line each (when ``show``)."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        yield
    for warning in caught if show else ():
        print(f"warning: {warning.message}", file=sys.stderr)


def run(main, parser, argv=None, single_process=False, lock=True):
    """Parse flags, lock the output directory (``lock``), launch one process per device and report a stop as one line.

    Reported stops exit with their code (``utils.errors.EXIT_CODES``), Ctrl-C 130, SIGTERM 143 (after a training stage
    saved its state); any other exception is a bug and keeps its traceback. ``single_process``: the first --gpu only.
    """
    args = parser.parse_args(argv)
    if single_process:
        args.gpu = str(args.gpu).split(",")[0]
    held, previous, shown = None, PREEMPTION.install(), warnings.showwarning
    warnings.showwarning = show_warning
    try:
        if hasattr(args, "stage"):  # a stage script's parser (engine/config.py)
            store = artifact_store(args)
            problems = preflight.check_devices(args) + preflight.check_output(args, store)
            if problems:
                raise preflight.report(problems)
            if lock and not args.check and int(os.environ.get("RANK", 0)) == 0:
                with printed_warnings():
                    held = RunLock(store.output_dir(args.stage), 60 * args.lock_timeout).acquire()
        launch(main, args)
        leave()  # torchrun's processes (spawned ones leave in their own process)
    except SpawnedExit as err:
        sys.exit(err.exit_code)
    except REPORTED_ERRORS as err:
        print(f"error: {one_line(err)}", file=sys.stderr)
        sys.exit(err.exit_code)
    except KeyboardInterrupt as err:
        what = "terminated (SIGTERM)" if isinstance(err, Terminated) else "interrupted"
        print(f"{what}: no partial artifact was written{'; ' + err.args[0] if err.args else ''}", file=sys.stderr)
        sys.exit(err.exit_code if isinstance(err, Terminated) else EXIT_INTERRUPTED)
    finally:
        PREEMPTION.restore(previous)
        warnings.showwarning = shown
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

    @property
    def lr(self):
        """The learning rate of the job: ``--lr`` times the number of processes (SPEC §4-6)."""
        return self.cfg.lr * self.info.world_size

    def dataset(self, split, resolution=None):
        """The split at ``resolution`` (default ``--train_resolution``); rank 0 generates the toy data."""
        if self.cfg.dataset == "toy":
            if self.info.is_main:
                ensure_toy(self.cfg.data_dir)
            barrier(self.info)
        return build_split(self.cfg, split, resolution or self.cfg.train_resolution, self.backbone)

    def train_loader(self):
        """The training split at ``--train_resolution``: ``(loader, sampler)``, shuffled, ``--drop_last``."""
        cfg, data = self.cfg, self.dataset("train")
        return make_loader(data, self.info, cfg.batch_size, cfg.num_workers, True, cfg.drop_last, seed=cfg.seed)

    def tokens(self):
        """``tokens(img, ind)``: the frozen tokens of training batches, cached with ``--feature_cache``."""
        cfg = self.cfg
        cache = FeatureCache(cfg.feature_cache, feature_cache_key(cfg, self.backbone)) if cfg.feature_cache else None
        return TokenSource(self.backbone, cache)

    def write_config(self, name, directory=None):
        """``config_<name>.json`` (a training stage's as ``.running.json`` until it completes: Trainer.finish)."""
        if self.info.is_main:
            path = os.path.join(directory or self.store.output_dir(self.cfg.stage), f"config_{name}.json")
            save_config(self.cfg, running_name(path) if self.cfg.stage in TRAINING else path)

    def trainer(self, shared, local=None):
        """The stage's :class:`~engine.loop.Trainer`; a resumed state must have this run's flags, upstream and data."""
        cfg = self.cfg
        flags = {k: v for k, v in cfg.as_dict().items() if k not in RESUME_FREE}
        flags.update(upstream=dict(self.store.loaded), dataset=self.store.identity.get("dataset"))
        loop = {"epochs": cfg.epoch, "max_steps": cfg.max_steps, "save_every": cfg.save_every, "amp": cfg.amp}
        directory = self.store.output_dir(cfg.stage)
        return Trainer(cfg.stage, self.info, directory, flags=flags, shared=shared, local=local, **loop)

    def flags(self, **what_ran):
        """The flags recorded with every artifact this run saves, and what the stage says actually ran."""
        return {**{key: getattr(self.cfg, key) for key in RECORDED_FLAGS if hasattr(self.cfg, key)}, **what_ran}


def _identity(cfg, dataset):
    """The dataset (its training files' manifest for a training stage) and the backbone this run uses."""
    data = {"name": cfg.dataset, **({"image_dir": training_folder(cfg)} if cfg.dataset == "folder" else {})}
    if dataset is not None:
        data.update(dataset.manifest())
    return {"dataset": data, "backbone": backbone_identity(checkpoint_files(cfg.ckpt) if cfg.ckpt else [], cfg.arch)}


def prepare(args, splits=None):
    """Set this process up and return its :class:`Run`; every rank stops (exit 2) when rank 0's pre-flight check
    (of ``splits``, by default the stage's) fails. ``--check`` stops here."""
    info = setup(args.gpu, use_cpu=args.cpu, timeout_min=getattr(args, "dist_timeout", 10.0))
    seed_everything(getattr(args, "seed", 0) + info.rank)
    with printed_warnings(info.is_main):
        backbone = build_backbone(args, info.device)
        hint = normalisation_hint(args.ckpt or None, args.norm, backbone.mean)
        if hint:
            warnings.warn(hint)
        if not torch.cuda.is_available() and not args.cpu and str(args.gpu) not in ("0", ""):
            warnings.warn(f"no CUDA device on this machine: --gpu {args.gpu} runs on the CPU (--cpu says so)")
    n_classes = args.n_classes if args.dataset == "folder" else dataset_info(args.dataset).n_classes
    if n_classes is None:
        raise InvalidInputError("--dataset folder needs --n_classes")
    norm = backbone.mean + backbone.std
    extra = {"family_resolved": backbone.family, "world_size": info.world_size, "norm_resolved": norm}
    if hasattr(args, "amp"):
        extra["amp"] = info.device.type == "cuda" if args.amp is None else args.amp
    cfg = resolve(args, backbone.patch_size, n_classes, **extra)
    run = Run(cfg, info, backbone, None)
    try:  # the training files' manifest (a missing or bad dataset is the pre-flight check's to report)
        training = run.dataset("train") if cfg.stage in TRAINING else None
    except BadInputError:
        training = None
    run = dataclasses.replace(run, store=artifact_store(cfg, _identity(cfg, training)))
    if info.device.type == "cuda":
        torch.backends.cudnn.benchmark = True
    with printed_warnings():  # e.g. released heads without provenance
        problems = preflight.run_checks(run, splits) if info.is_main else []
    if all_reduce_mean(float(len(problems)), info) > 0:
        if info.is_main:
            raise preflight.report(problems)
        sys.exit(BadInputError.exit_code)  # rank 0 reports the problems
    if cfg.check:
        if info.is_main:
            print("\n".join(preflight.summary(run, splits)))
        sys.exit(0)
    if info.is_main:
        for directory in (run.store.output_dir(cfg.stage), run.store.artifact_dir):
            remove_stale_temporaries(directory)
    return run


def single_process(run):
    """The run as if it ran alone (evaluation runs on rank 0 only, without collectives)."""
    return dataclasses.replace(run, info=dataclasses.replace(run.info, rank=0, world_size=1))
