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


def load_codebook(args, dim, path=None):
    """The stage-1 mediator as a float32 tensor [K, D], from ``path`` or the artifact tree."""
    given = path is not None
    path = path if given else codebook_path(args)
    if not os.path.isfile(path):
        if given:
            raise MissingArtifactError(f"codebook file not found: {path}")
        raise MissingArtifactError(f"codebook {path} not found: run {STAGE_SCRIPTS['codebook']} first "
                                   f"with the same --dataset/--ckpt/--num_codebook/--out")
    try:
        codebook = torch.from_numpy(np.load(path)).float()
    except (OSError, ValueError) as err:
        raise ArtifactMismatchError(f"cannot read codebook {path}: {err}") from None
    if tuple(codebook.shape) != (args.num_codebook, dim):
        raise ArtifactMismatchError(f"codebook {path} has shape {tuple(codebook.shape)}, expected "
                                    f"({args.num_codebook}, {dim}) for this backbone (--num_codebook {args.num_codebook})")
    return codebook


def _load_state(path, kind, given=False):
    if not os.path.isfile(path):
        if given:
            raise MissingArtifactError(f"{kind} weights file not found: {path}")
        raise MissingArtifactError(f"{kind} weights {path} not found: run {STAGE_SCRIPTS[kind]} first "
                                   f"with the same --dataset/--ckpt/--head/--out")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # torch raises many types for a file that is not a checkpoint
        raise ArtifactMismatchError(f"cannot read {kind} weights {path}: {str(err).splitlines()[0][:200]}") from None
    if isinstance(state, dict) and "state_dict" in state and isinstance(state["state_dict"], dict):
        state = state["state_dict"]
    if not isinstance(state, dict):
        raise ArtifactMismatchError(f"{path} holds a {type(state).__name__}, expected a {kind} state dict")
    return {k[len("module."):] if k.startswith("module.") else k: v for k, v in state.items()}


def _shape(state, key):
    value = state.get(key)
    return tuple(value.shape) if isinstance(value, torch.Tensor) else None


def describe_segment(state):
    """What a segment state dict holds, read from its tensor shapes.

    Returns ``{"head", "width", "reduced_dim", "n_classes", "num_queries"}``: ``head.tr.*``
    keys mean the TR head (``head.query_pos`` [Q, D] gives the queries), ``head.f1.weight``
    [r, D, 1, 1] the MLP head; ``linear.f.weight`` [C, r, 1, 1] the classes. Unknown
    values are None.
    """
    is_tr = any(k.startswith("head.tr.") for k in state)
    f1 = _shape(state, "head.tr.f1.weight" if is_tr else "head.f1.weight")
    linear = _shape(state, "linear.f.weight")
    queries = _shape(state, "head.query_pos")
    return {"head": "tr" if is_tr else ("mlp" if f1 is not None else None),
            "width": f1[1] if f1 and len(f1) > 1 else None,
            "reduced_dim": f1[0] if f1 else None,
            "n_classes": linear[0] if linear else None,
            "num_queries": queries[0] if queries else None}


def describe_cluster(state):
    """``{"num_codebook", "width", "n_classes", "reduced_dim"}`` of a cluster state dict."""
    codebook, probe = _shape(state, "codebook"), _shape(state, "cluster_probe")
    return {"num_codebook": codebook[0] if codebook and len(codebook) == 2 else None,
            "width": codebook[1] if codebook and len(codebook) == 2 else None,
            "n_classes": probe[0] if probe and len(probe) == 2 else None,
            "reduced_dim": probe[1] if probe and len(probe) == 2 else None}


_FLAG_OF = {"head": "--head", "width": "the backbone (--ckpt/--arch)", "reduced_dim": "--reduced_dim",
            "n_classes": "--n_classes/--dataset", "num_queries": "--train_resolution",
            "num_codebook": "--num_codebook"}


def _summary(values):
    return ", ".join(f"{k}={v}" for k, v in values.items() if v is not None)


def check_fits(path, held, expected):
    """One-line ArtifactMismatchError when what a file holds differs from what the flags build."""
    wrong = [k for k, v in expected.items() if held.get(k) is not None and held[k] != v]
    if held.get("head", "") is None or wrong:
        fields = wrong or list(expected)
        flags = ", ".join(dict.fromkeys(_FLAG_OF[k] for k in fields if k in _FLAG_OF))
        raise ArtifactMismatchError(f"{path} holds {_summary(held) or 'no known CAUSE head'}; expected "
                                    f"{_summary({k: expected[k] for k in fields})} (check {flags})")


def expected_segment(args, dim):
    expected = {"head": args.head, "width": dim, "reduced_dim": args.reduced_dim, "n_classes": args.n_classes}
    if args.head == "tr":
        expected["num_queries"] = args.num_queries
    return expected


def load_into(module, path, kind, given=False, expected=None, describe=None):
    """Strict load of a released-layout state dict, with a one-line error on mismatch.

    With ``expected`` (and ``describe``, the state dict's reader), the file's head type and
    shapes are checked first and a difference names both sides.
    """
    state = _load_state(path, kind, given)
    if expected is not None:
        check_fits(path, describe(state), expected)
    try:
        module.load_state_dict(state, strict=True)
    except RuntimeError as err:
        first = str(err).strip().splitlines()
        detail = " ".join(line.strip() for line in first[:3])
        raise ArtifactMismatchError(f"{path} does not fit the {type(module).__name__} built from these flags "
                                    f"(head/backbone/--reduced_dim/--n_classes mismatch?): {detail[:400]}") from None
    return module


def load_trained(args, dim, device, segment_file=None, cluster_file=None, codebook_file=None):
    """The stage-2/3 segment (eval mode, codebook attached for TR) and stage-3 cluster of a run.

    ``segment_file``, ``cluster_file``, ``codebook_file``: plain paths (e.g. the released
    ``segment_tr.pth``, ``cluster_tr.pth``, ``modular.npy``) used instead of the artifact tree.
    The codebook is only needed by the TR head.
    """
    segment = load_into(build_segment(args, dim), segment_file or segment_path(args), "segment",
                        given=segment_file is not None, expected=expected_segment(args, dim),
                        describe=describe_segment).to(device).eval()
    if args.head == "tr":
        segment.set_codebook(load_codebook(args, dim, codebook_file).to(device))
    cluster_expected = {"num_codebook": args.num_codebook, "width": dim, "n_classes": args.n_classes,
                        "reduced_dim": args.reduced_dim}
    cluster = load_into(build_cluster(args, dim), cluster_file or cluster_path(args), "cluster",
                        given=cluster_file is not None, expected=cluster_expected,
                        describe=describe_cluster).to(device)
    return segment, cluster


def trainable(module):
    return [p for p in module.parameters() if p.requires_grad]


def add_artifact_flags(parser):
    """``--segment``, ``--cluster``, ``--codebook``: trained heads by path instead of the artifact tree."""
    group = parser.add_argument_group("trained heads by path (default: the artifact tree under --out)")
    group.add_argument("--segment", default=None, help="segment weights, e.g. the released segment_tr.pth")
    group.add_argument("--cluster", default=None, help="cluster-probe weights, e.g. the released cluster_tr.pth")
    group.add_argument("--codebook", default=None, help="stage-1 codebook modular.npy (needed by the TR head)")
    return group


def load_trained_from_flags(args, dim, device):
    """:func:`load_trained` with the paths of :func:`add_artifact_flags`."""
    return load_trained(args, dim, device, segment_file=args.segment, cluster_file=args.cluster,
                        codebook_file=args.codebook)
