"""Build, load and save everything a run is made of: backbone, heads, codebook, artifacts.

Artifacts follow the reference's layout under the output root (default ``CAUSE/``):

    <out>/<dataset>/modularity/<baseline>/<K>/modular.npy      stage 1
    <out>/<dataset>/<baseline>/<K>/segment_<head>.pth           stages 2 and 3
    <out>/<dataset>/<baseline>/<K>/cluster_<head>.pth           stage 3

where ``<baseline>`` is the checkpoint's file stem. Logs, configs and test outputs of a head
go to ``<out>/<dataset>/<baseline>/<K>/<head>/`` (the run directory).
"""

import os

import numpy as np
import torch

from models.backbone import checkpoint_stem, load_backbone
from modules.segment import Cluster, SegmentMLP, SegmentTR
from utils.errors import InputNotFoundError, InvalidInputError


class MissingArtifactError(InputNotFoundError):
    """An earlier stage's output is not there; the message says which script to run."""


class ArtifactMismatchError(InvalidInputError):
    """An artifact does not fit the network it is loaded into (head, width, classes)."""


STAGE_SCRIPTS = {"codebook": "train_mediator.py", "segment": "train_front_door.py",
                 "cluster": "fine_tuning.py"}


def baseline_name(args):
    return checkpoint_stem(args.ckpt or None, args.arch)


def codebook_path(args):
    return os.path.join(args.out, args.dataset, "modularity", baseline_name(args),
                        str(args.num_codebook), "modular.npy")


def artifact_dir(args):
    return os.path.join(args.out, args.dataset, baseline_name(args), str(args.num_codebook))


def segment_path(args):
    return os.path.join(artifact_dir(args), f"segment_{args.head}.pth")


def cluster_path(args):
    return os.path.join(artifact_dir(args), f"cluster_{args.head}.pth")


def run_dir(args):
    """Where a head's logs, configs and test outputs go (created on demand)."""
    path = os.path.join(artifact_dir(args), args.head)
    os.makedirs(path, exist_ok=True)
    return path


def mediator_dir(args):
    path = os.path.dirname(codebook_path(args))
    os.makedirs(path, exist_ok=True)
    return path


def _tmp_name(path):
    return f"{path}.tmp{os.getpid()}"


def _atomic_write(path, write):
    """Call ``write(tmp)`` on a temporary file next to ``path``, then rename it over ``path``.

    An interruption (error, Ctrl-C) leaves no file at ``path`` and no temporary file behind.
    """
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    tmp = _tmp_name(path)
    try:
        write(tmp)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def atomic_torch_save(obj, path):
    _atomic_write(path, lambda tmp: torch.save(obj, tmp))


def atomic_np_save(array, path):
    def write(tmp):
        with open(tmp, "wb") as f:
            np.save(f, array)

    _atomic_write(path, write)


def build_backbone(args, device):
    net = load_backbone(args.ckpt or None, family=args.family, arch=args.arch, num_heads=args.num_heads)
    return net.to(device)


def build_segment(args, dim):
    if args.head == "mlp":
        return SegmentMLP(dim, args.reduced_dim, args.projection_dim, args.n_classes)
    return SegmentTR(dim, args.reduced_dim, args.projection_dim, args.n_classes, args.num_queries)


def build_cluster(args, dim):
    return Cluster(dim, args.reduced_dim, args.num_codebook, args.n_classes)


def load_codebook(args, dim):
    """The stage-1 mediator as a float32 tensor [K, D]."""
    path = codebook_path(args)
    if not os.path.isfile(path):
        raise MissingArtifactError(f"codebook {path} not found: run {STAGE_SCRIPTS['codebook']} first "
                                   f"with the same --dataset/--ckpt/--num_codebook/--out")
    codebook = torch.from_numpy(np.load(path)).float()
    if tuple(codebook.shape) != (args.num_codebook, dim):
        raise ArtifactMismatchError(f"codebook {path} has shape {tuple(codebook.shape)}, expected "
                                    f"({args.num_codebook}, {dim}) for this backbone")
    return codebook


def _load_state(path, kind):
    if not os.path.isfile(path):
        raise MissingArtifactError(f"{kind} weights {path} not found: run {STAGE_SCRIPTS[kind]} first "
                                   f"with the same --dataset/--ckpt/--head/--out")
    state = torch.load(path, map_location="cpu", weights_only=True)
    if isinstance(state, dict) and "state_dict" in state and isinstance(state["state_dict"], dict):
        state = state["state_dict"]
    return {k[len("module."):] if k.startswith("module.") else k: v for k, v in state.items()}


def load_into(module, path, kind):
    """Strict load of a released-layout state dict, with a one-line error on mismatch."""
    state = _load_state(path, kind)
    try:
        module.load_state_dict(state, strict=True)
    except RuntimeError as err:
        first = str(err).strip().splitlines()
        detail = " ".join(line.strip() for line in first[:3])
        raise ArtifactMismatchError(f"{path} does not fit the {type(module).__name__} built from these flags "
                                    f"(head/backbone/--reduced_dim/--n_classes mismatch?): {detail[:400]}") from None
    return module


def load_trained(args, dim, device):
    """The stage-2/3 segment (eval mode, codebook attached for TR) and stage-3 cluster of a run."""
    codebook = load_codebook(args, dim)
    segment = load_into(build_segment(args, dim), segment_path(args), "segment").to(device).eval()
    if args.head == "tr":
        segment.set_codebook(codebook.to(device))
    cluster = load_into(build_cluster(args, dim), cluster_path(args), "cluster").to(device)
    return segment, cluster


def trainable(module):
    return [p for p in module.parameters() if p.requires_grad]
