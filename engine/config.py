"""The command line of the stage scripts, and its resolution into one read-only configuration.

:data:`FLAGS` declares every flag once, with the stages that take it. Flags left at ``None`` get SPEC's published
defaults (which depend on the dataset, head and patch size) from :func:`resolve`, once the backbone is known.
"""

import argparse
import json
import math
import os

from utils.atomic import atomic_write_bytes

HEAD_ALIASES = {"mlp": "mlp", "cnn": "mlp", "tr": "tr", "detr": "tr"}
FAMILIES = ("dino", "dinov2", "dinov3", "ibot", "msn", "mae", "mocov3", "unicom", "timm")
TRAINING, EVALUATION = ("mediator", "front_door", "fine_tuning"), ("test", "predict")
# Published settings per stage and head (SPEC §4-6).
EPOCHS = {"mediator": {"mlp": 1, "tr": 1}, "front_door": {"mlp": 2, "tr": 2}, "fine_tuning": {"mlp": 1, "tr": 5}}
TRAIN_RESOLUTION = {
    "mediator": {"mlp": 320, "tr": 320},
    "front_door": {"mlp": 224, "tr": 320},
    "fine_tuning": {"mlp": 224, "tr": 320},
}
COCO_GRAD_CLIP = {"mlp": 0.1, "tr": 2.0}
TEST_RESOLUTION = 320
BOOLEANS = dict.fromkeys(("yes", "true", "t", "y", "1"), True) | dict.fromkeys(("no", "false", "f", "n", "0"), False)


def str2bool(value):
    """argparse type for yes/no flags (``--grid yes``), as the reference spells them."""
    if str(value).lower() not in BOOLEANS:
        raise argparse.ArgumentTypeError(f"expected yes/no, got {value!r}")
    return BOOLEANS[str(value).lower()]


def _number(kind, low, strict, high=math.inf):
    """argparse type: a finite ``kind`` in [low, high] (above ``low`` when ``strict``)."""
    what = f"{'an integer' if kind is int else 'a finite number'} {'>' if strict else '>='} {low}"
    what += f" and <= {high}" if high < math.inf else ""

    def parse(value):
        try:
            number = kind(value)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {what}, got {value!r}") from None
        if not (math.isfinite(number) and low <= number <= high) or (strict and number == low):
            raise argparse.ArgumentTypeError(f"expected {what}, got {value}")
        return number

    return parse


positive_int, count = _number(int, 0, True), _number(int, 0, False)
positive, non_negative, fraction = _number(float, 0.0, True), _number(float, 0.0, False), _number(float, 0, False, 1)


def head_type(value):
    """argparse type for ``--head``: ``mlp``/``tr`` and the reference's ``cnn``/``detr``."""
    if value.lower() not in HEAD_ALIASES:
        raise argparse.ArgumentTypeError(f"--head must be one of mlp, tr (aliases cnn, detr), got {value!r}")
    return HEAD_ALIASES[value.lower()]


ALL, EVAL, TRAIN, HEADS_TRAINED = TRAINING + EVALUATION, EVALUATION, TRAINING, ("front_door", "fine_tuning")
HEADS = HEADS_TRAINED + EVAL
# (group, flag, type, default, stages, help); a type of None is an on/off switch. The method's
# constants (SPEC §3-7) are flags of the stages that use them, with the published values.
# fmt: off
FLAGS = (
    ("data", "--dataset", str, "toy", ALL, "cocostuff27, cityscapes, pascalvoc, coco81, coco171, folder, toy"),
    ("data", "--data_dir", str, "data", ALL, "root folder of the datasets (the toy data is generated there)"),
    ("data", "--image_dir", str, None, ALL, "--dataset folder: the folder of images"),
    ("data", "--label_dir", str, None, ALL, "--dataset folder: optional folder of label PNGs (class ids)"),
    ("data", "--train_image_dir", str, None, EVAL, "--dataset folder: the image folder the heads were trained on"),
    ("data", "--n_classes", positive_int, None, ALL, "classes (from the dataset registry; needed for folder)"),
    ("data", "--batch_size", positive_int, 16, ALL, "images per process"),
    ("data", "--num_workers", count, min(4, os.cpu_count() or 1), ALL, "data-loading workers per process"),
    ("data", "--train_resolution", positive_int, None, ALL, "training crop size (default: published, patch multiple)"),
    ("data", "--test_resolution", positive_int, None, EVAL, "evaluation size (default 320; TR: its training size)"),
    ("data", "--feature_cache", str, None, TRAIN, "folder caching the frozen backbone's training tokens"),
    ("backbone", "--ckpt", str, "", ALL, "official self-supervised checkpoint file; empty = random --arch"),
    ("backbone", "--family", str, None, ALL, f"checkpoint family: {', '.join(FAMILIES)} (default: detected)"),
    ("backbone", "--arch", str, "vit_tiny_patch16_224", ALL, "timm ViT name: random weights, or a timm file's"),
    ("backbone", "--num_heads", positive_int, None, ALL, "backbone attention heads (12: the reference's DINO ViT-S)"),
    ("backbone", "--norm", str, None, ALL, "input normalisation: imagenet, sat, clip or 6 numbers (default: weights')"),
    ("head", "--head", head_type, "mlp", HEADS, "segmentation head: mlp or tr (aliases cnn, detr)"),
    ("head", "--num_codebook", positive_int, 2048, ALL, "concepts in the mediator codebook (K)"),
    ("head", "--reduced_dim", positive_int, 90, HEADS, "segment feature width (r)"),
    ("head", "--projection_dim", positive_int, 2048, HEADS, "projection head width (E)"),
    ("head", "--grid", str2bool, True, TRAIN, "yes/no: stochastic 4x4 grid sampling"),
    ("method", "--modularity_temp", positive, 0.1, ("mediator", "fine_tuning"), "tanh(S S^T / temp) (SPEC §3)"),
    ("method", "--contrastive_temp", positive, 0.07, ("front_door",), "contrastive loss temperature (SPEC §5)"),
    ("method", "--pos_thresh", float, 0.3, ("front_door",), "codebook cosine above which tokens are positives"),
    ("method", "--neg_thresh", float, 0.1, ("front_door",), "codebook cosine below which tokens are negatives"),
    ("method", "--bank_capacity", positive_int, 100, ("front_door",), "teacher projections kept per concept"),
    ("method", "--bank_keep_ratio", fraction, 0.5, ("front_door",), "share of a concept's tokens one update stores"),
    ("method", "--ema_momentum", fraction, 0.99, ("front_door",), "teacher <- m * teacher + (1 - m) * student"),
    ("method", "--reference_stage3", str2bool, True, ("fine_tuning",), "yes: the probe's labels train the head"),
    ("method", "--crf_alpha", positive, 3.0, EVAL, "CRF unary: log_softmax(crf_alpha * cosine scores) (SPEC §7)"),
    ("optimisation", "--epoch", positive_int, None, TRAIN, "epochs (default: the published ones)"),
    ("optimisation", "--lr", positive, 1e-3, TRAIN, "learning rate per process (scaled by the world size)"),
    ("optimisation", "--weight_decay", non_negative, None, HEADS_TRAINED, "segment weight decay (1e-4; Cityscapes 0)"),
    ("optimisation", "--grad_clip", non_negative, None, HEADS_TRAINED, "segment gradient-norm clip, 0 = none"),
    ("optimisation", "--max_steps", positive_int, None, TRAIN, "stop each epoch after this many steps"),
    ("optimisation", "--drop_last", str2bool, True, TRAIN, "yes/no: skip the last incomplete batch (reference: no)"),
    ("optimisation", "--amp", str2bool, None, TRAIN, "yes/no: mixed precision (default: yes on CUDA)"),
    ("optimisation", "--seed", int, 0, TRAIN + ("test",), "random seed (offset by rank; test.py: k-means)"),
    ("devices", "--gpu", str, "0", ALL, "GPU ids, e.g. 0,1,2,3: one process each (evaluation: the first)"),
    ("devices", "--port", str, "12355", TRAIN, "rendezvous port of the processes --gpu spawns"),
    ("devices", "--dist_timeout", positive, 10.0, TRAIN, "minutes a process waits in a collective"),
    ("devices", "--cpu", None, False, ALL, "run on the CPU even when CUDA is available"),
    ("resume", "--resume", str, "no", TRAIN, "no / yes / auto: continue from the run's resumable state"),
    ("resume", "--save_every", count, 1000, TRAIN, "save the resumable state every N steps (0: epoch ends only)"),
    ("heads by path", "--segment", str, None, EVAL, "segment weights, e.g. the released segment_tr.pth"),
    ("heads by path", "--cluster", str, None, EVAL, "cluster-probe weights, e.g. the released cluster_tr.pth"),
    ("heads by path", "--codebook", str, None, EVAL, "stage-1 codebook modular.npy (read by the TR head)"),
    ("output", "--out", str, "CAUSE", ALL, "artifact root: codebooks, heads, logs and test outputs"),
    ("output", "--lock_timeout", positive, 10.0, ALL, "minutes after which a silent run's lock is taken over"),
    ("output", "--check", None, False, ALL, "only run the pre-flight checks, print what they found and exit"),
)
# fmt: on
CHOICES = {"--resume": ("no", "yes", "auto"), "--family": FAMILIES}


class _HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Shows a flag's default unless it is None or a switch's."""

    def _get_help_string(self, action):
        return action.help if action.default in (None, False) else super()._get_help_string(action)


def build_parser(description, stage):
    """The parser of ``stage`` (mediator, front_door, fine_tuning, test, predict): only its flags, grouped."""
    parser = argparse.ArgumentParser(description=description.strip().splitlines()[0], formatter_class=_HelpFormatter)
    parser.set_defaults(stage=stage)
    groups = {}
    for group, flag, kind, default, stages, text in FLAGS:
        if stage not in stages:
            continue
        where = groups.setdefault(group, parser.add_argument_group(group))
        if kind is None:
            where.add_argument(flag, action="store_true", help=text)
        else:
            where.add_argument(flag, type=kind, default=default, choices=CHOICES.get(flag), help=text)
    return parser


class Config(argparse.Namespace):
    """The resolved flags of a run, read-only once built."""

    def __init__(self, **values):
        super().__init__(**values)
        object.__setattr__(self, "_frozen", True)

    def __setattr__(self, name, value):
        if getattr(self, "_frozen", False):
            raise AttributeError(f"the resolved configuration is read-only (tried to set {name})")
        super().__setattr__(name, value)

    def as_dict(self):
        return {k: v for k, v in vars(self).items() if k != "_frozen"}


def round_to_patch(resolution, patch_size):
    """Smallest multiple of ``patch_size`` that is >= ``resolution`` (320 -> 322 for patch 14)."""
    return int(math.ceil(resolution / patch_size) * patch_size)


def default_grad_clip(dataset, head, stage="front_door"):
    """Gradient-norm clip of the segment; 0 = none (SPEC §5-6).

    Both stages clip at 1 on Cityscapes and 0.1 (MLP) / 2 (TR) on COCO-Stuff; stage 3 nowhere else, as the reference.
    Its stage 2 has no value for other datasets (it fails there); deviation: COCO-81/171 take COCO-Stuff's, others 1.
    """
    if dataset == "cocostuff27" or (stage != "fine_tuning" and dataset in ("coco81", "coco171")):
        return COCO_GRAD_CLIP[head]
    return 1.0 if dataset == "cityscapes" or stage != "fine_tuning" else 0.0


def resolve(args, patch_size, n_classes, **extra):
    """The run's :class:`Config`: ``args`` and ``extra`` (e.g. the world size), ``None`` flags set to their defaults."""
    values = {**vars(args), **extra}
    stage, head = values["stage"], values.get("head", "mlp")
    if stage in TRAINING and values["epoch"] is None:
        values["epoch"] = EPOCHS[stage][head]
    resolution = values["train_resolution"] or TRAIN_RESOLUTION.get(stage, TRAIN_RESOLUTION["fine_tuning"])[head]
    values["train_resolution"] = round_to_patch(resolution, patch_size)
    if stage in EVALUATION:
        test = values["test_resolution"] or (values["train_resolution"] if head == "tr" else TEST_RESOLUTION)
        values["test_resolution"] = round_to_patch(test, patch_size)
    if values.get("weight_decay", 0) is None:
        values["weight_decay"] = 0.0 if values["dataset"] == "cityscapes" else 1e-4
    if values.get("grad_clip", 0) is None:
        values["grad_clip"] = default_grad_clip(values["dataset"], head, stage)
    values["n_classes"] = n_classes
    values["num_queries"] = (values["train_resolution"] // patch_size) ** 2
    return Config(**values)


def save_config(cfg, path):
    atomic_write_bytes(path, json.dumps(cfg.as_dict(), indent=2, sort_keys=True, default=str).encode())


STAGE3_NOTES = {
    "reference": "stage 3 as the published CAUSE (--reference_stage3 yes): the linear probe's labels trained the head",
    "label_free": "stage 3 label-free: no label reached the teacher head",
    "unknown": "stage 3 protocol unknown (the head has no provenance record of its stage 3)",
}


def stage3_protocol(reference_stage3):
    """How stage 3 trained the teacher head, as recorded in summaries and metrics.json."""
    return "unknown" if reference_stage3 is None else ("reference" if reference_stage3 else "label_free")
