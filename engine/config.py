"""The command line of the stage scripts, and its resolution into one read-only configuration.

Every script builds its parser with :func:`build_parser` (which holds only the flags that
script uses) and adds its own few flags. The published defaults of SPEC depend on the dataset,
the head and the backbone's patch size, so flags left at ``None`` are filled in once the
backbone is known: :func:`resolve` returns a new, read-only :class:`Config`, which the run
reads and saves as ``config_<stage>.json``.
"""

import argparse
import json
import math
import os

from utils.atomic import atomic_write_bytes

HEAD_ALIASES = {"mlp": "mlp", "cnn": "mlp", "tr": "tr", "detr": "tr"}
COCO_FAMILY = ("cocostuff27", "coco81", "coco171")
TRAINING_STAGES = ("mediator", "front_door", "fine_tuning")
EVALUATION_STAGES = ("test", "predict")
HEAD_STAGES = ("front_door", "fine_tuning", "test", "predict")

# Published per-stage settings (SPEC §4-6), per head.
STAGE_EPOCHS = {"mediator": {"mlp": 1, "tr": 1}, "front_door": {"mlp": 2, "tr": 2}, "fine_tuning": {"mlp": 1, "tr": 5}}
STAGE_RESOLUTION = {
    "mediator": {"mlp": 320, "tr": 320},
    "front_door": {"mlp": 224, "tr": 320},
    "fine_tuning": {"mlp": 224, "tr": 320},
}
# Gradient-norm clip of the segment on COCO-Stuff, per head (SPEC §5-6).
COCO_GRAD_CLIP = {"mlp": 0.1, "tr": 2.0}
TEST_RESOLUTION = 320


def str2bool(value):
    """argparse type for yes/no flags (``--grid yes``), as the reference spells them."""
    if isinstance(value, bool):
        return value
    lowered = value.lower()
    if lowered in ("yes", "true", "t", "y", "1"):
        return True
    if lowered in ("no", "false", "f", "n", "0"):
        return False
    raise argparse.ArgumentTypeError(f"expected yes/no, got {value!r}")


def _number(kind, value, low, strict, what):
    """A finite number of ``kind`` above ``low`` (or at least ``low`` unless ``strict``), else an argparse error."""
    try:
        number = kind(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected {what}, got {value!r}") from None
    if not math.isfinite(number) or number < low or (strict and number == low):
        raise argparse.ArgumentTypeError(f"expected {what}, got {value}")
    return number


def positive_int(value):
    return _number(int, value, 0, True, "an integer >= 1")


def non_negative_int(value):
    return _number(int, value, 0, False, "an integer >= 0")


def positive_float(value):
    return _number(float, value, 0.0, True, "a positive finite number")


def non_negative_float(value):
    return _number(float, value, 0.0, False, "a finite number >= 0")


def unit_float(value):
    number = _number(float, value, 0.0, False, "a number in [0, 1]")
    if number > 1:
        raise argparse.ArgumentTypeError(f"expected a number in [0, 1], got {value}")
    return number


def head_type(value):
    """argparse type for ``--head``: ``mlp``/``tr`` and the reference's ``cnn``/``detr``."""
    try:
        return HEAD_ALIASES[value.lower()]
    except KeyError:
        raise argparse.ArgumentTypeError(f"--head must be one of mlp, tr (aliases cnn, detr), got {value!r}") from None


class _HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Shows a flag's default unless its help already says what the default is."""

    def _get_help_string(self, action):
        if action.default is None or "default" in (action.help or ""):
            return action.help
        return super()._get_help_string(action)


# The method's constants (SPEC §3-7), as flags of the stages that use them with the published
# values as defaults: (flag, type, default, stages, help).
METHOD_FLAGS = (
    (
        "modularity_temp",
        positive_float,
        0.1,
        ("mediator", "fine_tuning"),
        "temperature of the soft co-membership tanh(S S^T / temp) (SPEC §3)",
    ),
    (
        "contrastive_temp",
        positive_float,
        0.07,
        ("front_door",),
        "temperature of the concept-wise contrastive loss (SPEC §5)",
    ),
    ("pos_thresh", float, 0.3, ("front_door",), "codebook cosine above which two tokens are positives"),
    ("neg_thresh", float, 0.1, ("front_door",), "codebook cosine below which two tokens are negatives"),
    ("bank_capacity", positive_int, 100, ("front_door",), "teacher projections kept per concept in the concept bank"),
    ("bank_keep_ratio", unit_float, 0.5, ("front_door",), "share of a concept's tokens stored by one bank update"),
    (
        "ema_momentum",
        unit_float,
        0.99,
        ("front_door",),
        "teacher <- momentum * teacher + (1 - momentum) * student after each step",
    ),
    (
        "reference_stage3",
        str2bool,
        True,
        ("fine_tuning",),
        "yes: as the published CAUSE, the supervised linear probe reads the teacher head's features without "
        "detaching them, so the labels train the head in stage 3; no: label-free, the probe reads detached "
        "features and the head does not change",
    ),
    (
        "crf_alpha",
        positive_float,
        3.0,
        ("test", "predict"),
        "the CRF's unary is log_softmax(crf_alpha * cosine scores) (SPEC §7)",
    ),
)


def _data_flags(parser, stage):
    data = parser.add_argument_group("data")
    data.add_argument(
        "--dataset",
        default="toy",
        help="cocostuff27, cityscapes, pascalvoc, coco81, coco171, folder or toy "
        "(embedded synthetic data, generated on first use)",
    )
    data.add_argument("--data_dir", default="data", help="root folder that holds the datasets")
    data.add_argument("--image_dir", default=None, help="--dataset folder: the folder of images")
    data.add_argument("--label_dir", default=None, help="--dataset folder: optional folder of label PNGs")
    if stage in EVALUATION_STAGES:
        data.add_argument(
            "--train_image_dir",
            default=None,
            help="--dataset folder: the image folder the heads were trained on, when it is not "
            "--image_dir (artifacts are kept per training folder)",
        )
    data.add_argument(
        "--n_classes",
        type=positive_int,
        default=None,
        help="number of classes (taken from the dataset registry; needed for --dataset folder)",
    )
    data.add_argument("--batch_size", type=positive_int, default=16, help="images per process")
    data.add_argument(
        "--num_workers",
        type=non_negative_int,
        default=min(4, os.cpu_count() or 1),
        help="data-loading worker processes per process",
    )
    data.add_argument(
        "--train_resolution",
        type=positive_int,
        default=None,
        help="training crop size (default: the published one for the stage and head, rounded up to a "
        "multiple of the patch size, e.g. 322 for patch 14)",
    )
    if stage in TRAINING_STAGES:
        data.add_argument(
            "--feature_cache",
            default=None,
            help="folder where the frozen backbone's training tokens are cached, so that later "
            "epochs and stages skip the backbone (off by default; about N x D values per image)",
        )
    else:
        data.add_argument(
            "--test_resolution",
            type=positive_int,
            default=None,
            help="evaluation size (default 320, rounded up to the patch size; the TR head is "
            "evaluated at its training resolution)",
        )


def _model_flags(parser, stage):
    backbone = parser.add_argument_group("backbone")
    backbone.add_argument(
        "--ckpt",
        default="",
        help="official self-supervised checkpoint file (DINO, DINOv2, iBOT, MSN, MAE, MoCo v3, "
        "Unicom); empty = random weights of --arch (plumbing check only)",
    )
    backbone.add_argument(
        "--family",
        default=None,
        choices=["dino", "dinov2", "ibot", "msn", "mae", "mocov3", "unicom"],
        help="checkpoint family (default: detected from the file's keys)",
    )
    backbone.add_argument("--arch", default="vit_tiny_patch16_224", help="timm ViT name used when --ckpt is empty")
    backbone.add_argument(
        "--num_heads",
        type=positive_int,
        default=None,
        help="attention heads of the backbone (default: the official architecture; "
        "12 reproduces the reference's DINO ViT-S features)",
    )
    head = parser.add_argument_group("head")
    if stage in HEAD_STAGES:
        head.add_argument(
            "--head", type=head_type, default="mlp", help="segmentation head: mlp or tr (aliases cnn, detr)"
        )
    head.add_argument("--num_codebook", type=positive_int, default=2048, help="concepts in the mediator codebook (K)")
    if stage in HEAD_STAGES:
        head.add_argument("--reduced_dim", type=positive_int, default=90, help="segment feature width (r)")
        head.add_argument("--projection_dim", type=positive_int, default=2048, help="projection head width (E)")
    if stage in TRAINING_STAGES:
        head.add_argument("--grid", type=str2bool, default=True, help="yes/no: stochastic 4x4 grid sampling")


def _optimisation_flags(parser, stage):
    optim = parser.add_argument_group("optimisation")
    if stage in TRAINING_STAGES:
        optim.add_argument(
            "--epoch",
            type=positive_int,
            default=None,
            help="epochs (default: the published ones for the stage and head)",
        )
        optim.add_argument(
            "--lr", type=positive_float, default=1e-3, help="learning rate per process (scaled by world size)"
        )
        if stage != "mediator":
            optim.add_argument(
                "--weight_decay",
                type=non_negative_float,
                default=None,
                help="segment weight decay (default 1e-4, 0 on Cityscapes)",
            )
            optim.add_argument(
                "--grad_clip",
                type=non_negative_float,
                default=None,
                help="gradient-norm clip of the segment parameters, 0 = none (default per stage, "
                "dataset and head, SPEC §5-6)",
            )
        optim.add_argument("--max_steps", type=positive_int, default=None, help="stop each epoch after this many steps")
        optim.add_argument(
            "--drop_last",
            type=str2bool,
            default=True,
            help="yes/no: skip each epoch's last incomplete batch; no trains on it too, as the reference does",
        )
        optim.add_argument(
            "--amp", type=str2bool, default=None, help="yes/no: mixed precision (default: yes on CUDA, no on CPU)"
        )
    if stage != "predict":
        optim.add_argument(
            "--seed",
            type=int,
            default=0,
            help="random seed (offset by rank)" if stage in TRAINING_STAGES else "k-means seed",
        )


def _process_flags(parser, stage):
    dist = parser.add_argument_group("devices")
    if stage in TRAINING_STAGES:
        dist.add_argument(
            "--gpu",
            default="0",
            help="GPU ids, e.g. 0,1,2,3: one process is spawned per id (under torchrun this is ignored)",
        )
        dist.add_argument("--port", default="12355", help="rendezvous port when spawning with --gpu")
        dist.add_argument(
            "--dist_timeout",
            type=positive_float,
            default=10.0,
            help="minutes a process waits in a collective (e.g. for a dead peer) before it stops with an error",
        )
    else:
        dist.add_argument("--gpu", default="0", help="GPU id (evaluation runs in one process)")
    dist.add_argument("--cpu", action="store_true", help="run on CPU even when CUDA is available")
    if stage in TRAINING_STAGES:
        resume = parser.add_argument_group("resume (see docs/resume.md)")
        resume.add_argument(
            "--resume",
            choices=["no", "yes", "auto"],
            default="no",
            help="continue from the resumable state in the run directory: no = start over, "
            "yes = resume (error if there is none), auto = resume when one is found",
        )
        resume.add_argument(
            "--save_every",
            type=non_negative_int,
            default=1000,
            help="save the resumable state every N optimiser steps, 0 = only at epoch ends "
            "(it is always saved at every epoch end)",
        )
    if stage in EVALUATION_STAGES:
        given = parser.add_argument_group("trained heads by path (default: the artifact tree under --out)")
        given.add_argument("--segment", default=None, help="segment weights, e.g. the released segment_tr.pth")
        given.add_argument("--cluster", default=None, help="cluster-probe weights, e.g. the released cluster_tr.pth")
        given.add_argument("--codebook", default=None, help="stage-1 codebook modular.npy (needed by the TR head)")
    out = parser.add_argument_group("output")
    out.add_argument("--out", default="CAUSE", help="artifact root: codebooks, heads, logs and test outputs")
    out.add_argument(
        "--check",
        action="store_true",
        help="only run the pre-flight checks (data, checkpoint, earlier artifacts, disk, devices), "
        "print what they found and exit: 0 when all is well, 2 otherwise; nothing is trained",
    )


def build_parser(description, stage):
    """The parser of ``stage`` (mediator, front_door, fine_tuning, test, predict): only its flags, grouped."""
    parser = argparse.ArgumentParser(description=description.strip().splitlines()[0], formatter_class=_HelpFormatter)
    parser.set_defaults(stage=stage)
    _data_flags(parser, stage)
    _model_flags(parser, stage)
    method = parser.add_argument_group("method (published values by default)")
    for name, kind, default, stages, text in METHOD_FLAGS:
        if stage in stages:
            method.add_argument(f"--{name}", type=kind, default=default, help=text)
    _optimisation_flags(parser, stage)
    _process_flags(parser, stage)
    return parser


class Config(argparse.Namespace):
    """The resolved flags of a run: read-only once built (``dataclasses.replace``-style copies via ``with_``)."""

    def __init__(self, **values):
        super().__init__(**values)
        object.__setattr__(self, "_frozen", True)

    def __setattr__(self, name, value):
        if getattr(self, "_frozen", False):
            raise AttributeError(f"the resolved configuration is read-only (tried to set {name})")
        super().__setattr__(name, value)

    def with_(self, **values):
        return Config(**{**self.as_dict(), **values})

    def as_dict(self):
        return {k: v for k, v in vars(self).items() if k != "_frozen"}


def round_to_patch(resolution, patch_size):
    """Smallest multiple of ``patch_size`` that is >= ``resolution`` (320 -> 322 for patch 14)."""
    return int(math.ceil(resolution / patch_size) * patch_size)


def default_grad_clip(dataset, head, stage="front_door"):
    """Gradient-norm clip of the segment parameters; 0 = no clipping.

    Both stages clip at 1 on Cityscapes and at 0.1 (MLP) / 2 (TR) on COCO-Stuff (SPEC §5-6).
    Stage 3 clips nowhere else, as the reference. Stage 2 of the reference has no value for the
    other datasets (it fails there); deviation: COCO-81/171 take COCO-Stuff's, the rest 1.
    """
    coco = dataset == "cocostuff27" if stage == "fine_tuning" else dataset in COCO_FAMILY
    if coco:
        return COCO_GRAD_CLIP[head]
    if dataset == "cityscapes" or stage != "fine_tuning":
        return 1.0
    return 0.0


def resolve(args, patch_size, n_classes, **extra):
    """The run's :class:`Config`: ``args`` with every ``None`` flag set to its published default.

    ``extra``: values the run adds (e.g. the resolved backbone family, the world size).
    """
    values = {**vars(args), **extra}
    stage, head = values["stage"], values.get("head", "mlp")
    if stage in TRAINING_STAGES and values["epoch"] is None:
        values["epoch"] = STAGE_EPOCHS[stage][head]
    if values["train_resolution"] is None:
        values["train_resolution"] = STAGE_RESOLUTION["fine_tuning" if stage not in TRAINING_STAGES else stage][head]
    values["train_resolution"] = round_to_patch(values["train_resolution"], patch_size)
    if stage in EVALUATION_STAGES:
        test_resolution = values["test_resolution"]
        if test_resolution is None:
            test_resolution = values["train_resolution"] if head == "tr" else TEST_RESOLUTION
        values["test_resolution"] = round_to_patch(test_resolution, patch_size)
    if values.get("weight_decay", 0) is None:
        values["weight_decay"] = 0.0 if values["dataset"] == "cityscapes" else 1e-4
    if values.get("grad_clip", 0) is None:
        values["grad_clip"] = default_grad_clip(values["dataset"], head, stage)
    values["n_classes"] = n_classes
    values["num_queries"] = (values["train_resolution"] // patch_size) ** 2
    return Config(**values)


def save_config(cfg, path):
    """Write the resolved configuration as JSON (atomically)."""
    atomic_write_bytes(path, json.dumps(cfg.as_dict(), indent=2, sort_keys=True, default=str).encode())


STAGE3_NOTES = {
    "reference": "stage 3 as the published CAUSE (--reference_stage3 yes): the supervised linear probe's labels "
    "trained the teacher head",
    "label_free": "stage 3 label-free: no label reached the teacher head",
    "unknown": "stage 3 protocol unknown (the head has no provenance record of its stage 3)",
}


def stage3_protocol(reference_stage3):
    """How stage 3 trained the teacher head, as recorded in summaries and metrics.json."""
    if reference_stage3 is None:
        return "unknown"
    return "reference" if reference_stage3 else "label_free"
