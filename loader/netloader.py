"""Build, load and save everything a run is made of: backbone, heads, codebook, artifacts.

Artifacts follow the reference's layout under the output root (default ``CAUSE/``):

    <out>/<dataset>/modularity/<baseline>/<K>/modular.npy      stage 1
    <out>/<dataset>/<baseline>/<K>/segment_<head>.pth           stages 2 and 3
    <out>/<dataset>/<baseline>/<K>/cluster_<head>.pth           stage 3

where ``<baseline>`` is the checkpoint's file stem and ``<dataset>`` the dataset's name, or
``folder-<name>-<hash>`` for ``--dataset folder`` (one directory per image folder). Logs,
configs and test outputs of a head go to ``<out>/<dataset>/<baseline>/<K>/<head>/`` (the run
directory).

Every artifact has a provenance record next to it (``segment_mlp.pth.json``): its own
sha256, the dataset, the backbone checkpoint, the upstream artifact's sha256 and the flags it
was trained with. The weights files themselves keep the released layout.
"""

import hashlib
import io
import json
import os
import socket
import sys
import time
import warnings

import numpy as np
import torch

from models.backbone import checkpoint_stem, load_backbone
from modules.segment import Cluster, SegmentMLP, SegmentTR
from utils.atomic import atomic_write_bytes
from utils.errors import InputNotFoundError, InvalidInputError


class MissingArtifactError(InputNotFoundError):
    """An earlier stage's output is not there; the message says which script to run."""


class ArtifactMismatchError(InvalidInputError):
    """An artifact does not fit the network it is loaded into (head, width, classes)."""


class CorruptArtifactError(InvalidInputError):
    """An artifact file exists but cannot be read (truncated, empty, not a weights file)."""


class OutputLockedError(InvalidInputError):
    """Another run is writing the same output directory."""


class ProvenanceWarning(UserWarning):
    """An artifact's origin cannot be checked (no provenance record, e.g. a released head)."""


STAGE_SCRIPTS = {"codebook": "train_mediator.py", "segment": "train_front_door.py",
                 "cluster": "fine_tuning.py"}
UPSTREAM = {"codebook": None, "segment": "codebook", "cluster": "segment"}
LOCK_NAME = "run.lock"
# Flags recorded in the provenance records (the shapes are checked by the strict loads).
RECORDED_FLAGS = ("stage", "dataset", "n_classes", "head", "num_codebook", "reduced_dim", "projection_dim",
                  "num_queries", "train_resolution", "grid", "epoch", "lr", "seed", "family_resolved", "num_heads",
                  "world_size", "reference_stage3")


def baseline_name(args):
    return checkpoint_stem(args.ckpt or None, args.arch)


def folder_images(args):
    """The absolute image folder a ``--dataset folder`` run trains on (``--train_image_dir`` for test.py)."""
    folder = getattr(args, "train_image_dir", None) or args.image_dir or args.data_dir
    return os.path.abspath(folder)


def dataset_dir_name(args):
    """``<dataset>`` of the artifact layout: the name, or ``folder-<name>-<hash>`` per image folder."""
    if args.dataset != "folder":
        return args.dataset
    folder = folder_images(args)
    digest = hashlib.sha1(folder.encode()).hexdigest()[:8]
    return f"folder-{os.path.basename(folder.rstrip(os.sep)) or 'root'}-{digest}"


def dataset_root(args):
    return os.path.join(args.out, dataset_dir_name(args))


def codebook_path(args):
    return os.path.join(dataset_root(args), "modularity", baseline_name(args), str(args.num_codebook),
                        "modular.npy")


def artifact_dir(args):
    return os.path.join(dataset_root(args), baseline_name(args), str(args.num_codebook))


def segment_path(args):
    return os.path.join(artifact_dir(args), f"segment_{args.head}.pth")


def cluster_path(args):
    return os.path.join(artifact_dir(args), f"cluster_{args.head}.pth")


ARTIFACT_PATHS = {"codebook": codebook_path, "segment": segment_path, "cluster": cluster_path}


def artifact_path(args, kind):
    """Where this run reads the ``kind`` artifact: the path given by ``--segment/--cluster/--codebook``
    (test.py, predict.py), else the artifact tree."""
    return getattr(args, kind, None) or ARTIFACT_PATHS[kind](args)


def output_dir(args):
    """The directory a stage writes its logs into: the mediator's for stage 1, the head's run directory else."""
    if args.stage == "mediator":
        return os.path.dirname(codebook_path(args))
    return os.path.join(artifact_dir(args), args.head)


def run_dir(args):
    """Where a head's logs, configs and test outputs go (created on demand)."""
    path = os.path.join(artifact_dir(args), args.head)
    os.makedirs(path, exist_ok=True)
    return path


def mediator_dir(args):
    path = os.path.dirname(codebook_path(args))
    os.makedirs(path, exist_ok=True)
    return path


def _atomic_save(write, path):
    """``write(file)`` into memory, then the bytes written atomically; returns the file's sha256."""
    buffer = io.BytesIO()
    write(buffer)
    data = buffer.getvalue()
    atomic_write_bytes(path, data)
    return hashlib.sha256(data).hexdigest()


def atomic_torch_save(obj, path):
    """``torch.save`` through a temporary file and a rename; returns the file's sha256."""
    return _atomic_save(lambda file: torch.save(obj, file), path)


def atomic_np_save(array, path):
    """``np.save`` through a temporary file and a rename; returns the file's sha256."""
    return _atomic_save(lambda file: np.save(file, array), path)


def sidecar_path(path):
    return f"{path}.json"


def file_sha256(path):
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def backbone_identity(args):
    """The checkpoint as path, size and a fast hash (sha256 of its size, first and last MiB)."""
    if not args.ckpt:
        return {"random": args.arch}
    path = os.path.abspath(args.ckpt)
    size = os.path.getsize(path)
    digest = hashlib.sha256(str(size).encode())
    with open(path, "rb") as f:
        digest.update(f.read(1 << 20))
        if size > 2 << 20:
            f.seek(size - (1 << 20))
            digest.update(f.read(1 << 20))
    return {"path": path, "size": size, "sha256_ends": digest.hexdigest()}


def dataset_identity(args):
    if args.dataset == "folder":
        return {"name": "folder", "image_dir": folder_images(args)}
    return {"name": args.dataset}


def provenance(args, kind):
    """What the ``kind`` artifact of this run is trained from; its upstream artifact is hashed as it is now."""
    record = {"kind": kind, "dataset": dataset_identity(args), "backbone": backbone_identity(args),
              "flags": {key: getattr(args, key) for key in RECORDED_FLAGS if hasattr(args, key)},
              "created": time.strftime("%Y-%m-%d %H:%M:%S")}
    upstream = UPSTREAM[kind]
    if upstream is not None:
        path = ARTIFACT_PATHS[upstream](args)
        record["upstream"] = {"kind": upstream, "file": os.path.basename(path), "sha256": file_sha256(path)}
    return record


def save_artifact(obj, path, record):
    """Save a state dict (``.pth``) or array (``.npy``) atomically, then its provenance record next to it.

    ``record`` comes from :func:`provenance`; the file's own sha256 is added. Returns the sha256.
    """
    sha = atomic_np_save(obj, path) if path.endswith(".npy") else atomic_torch_save(obj, path)
    record = {**record, "file": os.path.basename(path), "sha256": sha}
    atomic_write_bytes(sidecar_path(path), json.dumps(record, indent=2, default=str).encode())
    return sha


def _describe_backbone(identity):
    if "random" in identity:
        return f"random {identity['random']}"
    return f"{identity['path']} ({identity['size']} bytes, sha {identity['sha256_ends'][:12]})"


def _same_backbone(recorded, current):
    if "random" in recorded or "random" in current:
        return recorded.get("random") == current.get("random")
    return (recorded.get("size"), recorded.get("sha256_ends")) == (current["size"], current["sha256_ends"])


def read_provenance(path):
    """The provenance record of the artifact at ``path``, or None (with a warning) when it cannot be checked."""
    name = os.path.basename(path)
    record_path = sidecar_path(path)
    if not os.path.isfile(record_path):
        warnings.warn(f"{name} has no provenance record ({os.path.basename(record_path)}), e.g. a released "
                      f"artifact: used without checking what it was trained from", ProvenanceWarning)
        return None
    try:
        with open(record_path) as f:
            record = json.load(f)
    except (OSError, ValueError):
        warnings.warn(f"{record_path} is unreadable: {name} is used without checking what it was trained from",
                      ProvenanceWarning)
        return None
    if not isinstance(record, dict) or record.get("sha256") != file_sha256(path):
        warnings.warn(f"{name} was replaced after {os.path.basename(record_path)} was written: used without "
                      f"checking what it was trained from", ProvenanceWarning)
        return None
    return record


def provenance_problems(args, kind):
    """One line per way the existing ``kind`` artifact does not fit this run (see :func:`provenance`)."""
    path = artifact_path(args, kind)
    record = read_provenance(path)
    if record is None:
        return []
    name, script = os.path.basename(path), STAGE_SCRIPTS[kind]
    problems = []
    current = backbone_identity(args)
    recorded = record.get("backbone")
    if recorded is not None and not _same_backbone(recorded, current):
        problems.append(f"{name} was trained with backbone {_describe_backbone(recorded)} but this run uses "
                        f"{_describe_backbone(current)}: rerun {script}")
    if "dataset" in record and record["dataset"] != dataset_identity(args):
        problems.append(f"{name} was trained on dataset {record.get('dataset')} but this run uses "
                        f"{dataset_identity(args)}: rerun {script}")
    upstream = record.get("upstream")
    if upstream is not None:
        up_path = artifact_path(args, upstream["kind"])
        if os.path.isfile(up_path):
            now = file_sha256(up_path)
            if now != upstream["sha256"]:
                problems.append(f"{name} was trained on {upstream['kind']} sha {upstream['sha256'][:12]} but "
                                f"{os.path.basename(up_path)} is now sha {now[:12]}: rerun {script}")
    return problems


def _pid_alive(pid):
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _describe_holder(holder):
    return (f"pid {holder.get('pid')} on {holder.get('host')}, started {holder.get('started')} "
            f"({holder.get('command', '?')})")


class RunLock:
    """Exclusive use of an output directory by one run: a ``run.lock`` file naming its holder.

    A lock whose process is gone (same host, dead pid) is taken over with a warning; any
    other held lock is a one-line refusal. Use as a context manager, or call
    :meth:`acquire` / :meth:`release`.
    """

    def __init__(self, directory):
        self.directory = directory
        self.path = os.path.join(directory, LOCK_NAME)
        self.held = False

    def _holder(self):
        try:
            with open(self.path) as f:
                return json.load(f)
        except (OSError, ValueError):
            return {}

    def acquire(self):
        try:
            os.makedirs(self.directory, exist_ok=True)
        except OSError as err:
            raise InvalidInputError(f"cannot create the output folder {self.directory}: "
                                    f"{err.strerror or err}") from None
        me = {"pid": os.getpid(), "host": socket.gethostname(), "started": time.strftime("%Y-%m-%d %H:%M:%S"),
              "command": " ".join([os.path.basename(sys.argv[0]), *sys.argv[1:]])[:300]}
        tmp = f"{self.path}.tmp{os.getpid()}"
        atomic_write_bytes(tmp, json.dumps(me).encode())
        try:
            for _ in range(2):
                try:
                    os.link(tmp, self.path)  # creates the lock with its content, or fails if it is held
                    self.held = True
                    return self
                except FileExistsError:
                    holder = self._holder()
                    stale = holder.get("host") == me["host"] and not _pid_alive(int(holder.get("pid", -1)))
                    if not stale:
                        raise OutputLockedError(
                            f"{self.directory} is in use by another run: {_describe_holder(holder)}; wait for it "
                            f"or use another --out (delete {self.path} if that run is gone)") from None
                    warnings.warn(f"taking over the stale lock {self.path} of a run that is gone "
                                  f"({_describe_holder(holder)})")
                    os.remove(self.path)
            raise OutputLockedError(f"{self.directory} is in use by another run that started at the same time")
        finally:
            os.remove(tmp)

    def release(self):
        if self.held and self._holder().get("pid") == os.getpid():
            os.remove(self.path)
        self.held = False

    def __enter__(self):
        return self.acquire()

    def __exit__(self, *exc):
        self.release()
        return False


def build_backbone(args, device):
    net = load_backbone(args.ckpt or None, family=args.family, arch=args.arch, num_heads=args.num_heads)
    return net.to(device)


def build_segment(args, dim):
    if args.head == "mlp":
        return SegmentMLP(dim, args.reduced_dim, args.projection_dim, args.n_classes)
    return SegmentTR(dim, args.reduced_dim, args.projection_dim, args.n_classes, args.num_queries)


def build_cluster(args, dim):
    return Cluster(dim, args.reduced_dim, args.num_codebook, args.n_classes)


def _missing(path, kind, given):
    """The one-line error for a missing artifact: a path the user gave, or a stage not run yet."""
    if given:
        return MissingArtifactError(f"{kind} file not found: {path}")
    flags = "--num_codebook" if kind == "codebook" else "--head"
    return MissingArtifactError(f"{kind} {path} not found: run {STAGE_SCRIPTS[kind]} first "
                                f"with the same --dataset/--ckpt/{flags}/--out")


def read_codebook(path, given=False):
    """The stage-1 mediator file as a float32 array [K, D]; a missing or unreadable file is one line.

    ``given``: the user named the file (e.g. a released ``modular.npy``), so a missing one is not
    a stage to run first.
    """
    if not os.path.isfile(path):
        raise _missing(path, "codebook", given)
    try:
        codebook = np.load(path, allow_pickle=False)
    except (OSError, ValueError, EOFError) as err:
        raise CorruptArtifactError(f"codebook {path} is not a readable .npy file ({_first_line(err)}): "
                                   f"rerun {STAGE_SCRIPTS['codebook']} --overwrite") from None
    if codebook.ndim != 2 or not np.issubdtype(codebook.dtype, np.floating):
        raise CorruptArtifactError(f"codebook {path} holds a {codebook.dtype} array of shape {codebook.shape}, "
                                   f"not a [K, D] float codebook: rerun {STAGE_SCRIPTS['codebook']} --overwrite")
    return codebook.astype(np.float32, copy=False)


def load_codebook(args, dim, path=None):
    """The stage-1 mediator as a float32 tensor [K, D], from ``path`` or the artifact tree."""
    given = path is not None
    path = path if given else codebook_path(args)
    codebook = torch.from_numpy(read_codebook(path, given))
    if tuple(codebook.shape) != (args.num_codebook, dim):
        raise ArtifactMismatchError(f"codebook {path} has shape {tuple(codebook.shape)}, expected "
                                    f"({args.num_codebook}, {dim}) for this backbone (--num_codebook {args.num_codebook})")
    return codebook


def _first_line(err):
    text = str(err).strip().splitlines()
    return (text[0] if text else type(err).__name__)[:160]


def read_state(path, kind, given=False):
    """A released-layout state dict from ``path`` (``module.`` prefixes removed); bad files are one line."""
    if not os.path.isfile(path):
        raise _missing(path, kind, given)
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # any failure to unpickle a file the user pointed at is a bad file, not a bug
        size = os.path.getsize(path)
        what = "is empty" if size == 0 else f"is not a readable PyTorch file ({_first_line(err)})"
        raise CorruptArtifactError(f"{kind} weights {path} {what}: rerun {STAGE_SCRIPTS[kind]}") from None
    if isinstance(state, dict) and "state_dict" in state and isinstance(state["state_dict"], dict):
        state = state["state_dict"]
    if not isinstance(state, dict) or not all(isinstance(k, str) and torch.is_tensor(v) for k, v in state.items()):
        raise CorruptArtifactError(f"{kind} weights {path} hold no state dict of tensors: rerun {STAGE_SCRIPTS[kind]}")
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
    projection = _shape(state, "projection_head.f.weight")
    return {"head": "tr" if is_tr else ("mlp" if f1 is not None else None),
            "width": f1[1] if f1 and len(f1) > 1 else None,
            "reduced_dim": f1[0] if f1 else None,
            "projection_dim": projection[0] if projection else None,
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
            "projection_dim": "--projection_dim",
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
    """What :func:`describe_segment` must find in a segment file for the module these flags build."""
    expected = {"head": args.head, "width": dim, "reduced_dim": args.reduced_dim,
                "projection_dim": args.projection_dim, "n_classes": args.n_classes}
    if args.head == "tr":
        expected["num_queries"] = args.num_queries
    return expected


def expected_cluster(args, dim):
    """What :func:`describe_cluster` must find in a cluster file for the module these flags build."""
    return {"num_codebook": args.num_codebook, "width": dim, "n_classes": args.n_classes,
            "reduced_dim": args.reduced_dim}


def load_into(module, path, kind, given=False, expected=None, describe=None):
    """Strict load of a released-layout state dict, with a one-line error on mismatch.

    With ``expected`` (and ``describe``, the state dict's reader), the file's head type and
    shapes are checked first and a difference names both sides.
    """
    state = read_state(path, kind, given)
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
    cluster = load_into(build_cluster(args, dim), cluster_file or cluster_path(args), "cluster",
                        given=cluster_file is not None, expected=expected_cluster(args, dim),
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
