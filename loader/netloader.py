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


def atomic_torch_save(obj, path):
    """``torch.save`` through a temporary file and a rename; returns the file's sha256."""
    buffer = io.BytesIO()
    torch.save(obj, buffer)
    data = buffer.getvalue()
    atomic_write_bytes(path, data)
    return hashlib.sha256(data).hexdigest()


def atomic_np_save(array, path):
    """``np.save`` through a temporary file and a rename; returns the file's sha256."""
    buffer = io.BytesIO()
    np.save(buffer, array)
    data = buffer.getvalue()
    atomic_write_bytes(path, data)
    return hashlib.sha256(data).hexdigest()


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
    path = ARTIFACT_PATHS[kind](args)
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
        up_path = ARTIFACT_PATHS[upstream["kind"]](args)
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


def read_codebook(path):
    """The stage-1 mediator file as a float32 array [K, D]; a missing or unreadable file is one line."""
    if not os.path.isfile(path):
        raise MissingArtifactError(f"codebook {path} not found: run {STAGE_SCRIPTS['codebook']} first "
                                   f"with the same --dataset/--ckpt/--num_codebook/--out")
    try:
        codebook = np.load(path, allow_pickle=False)
    except (OSError, ValueError, EOFError) as err:
        raise CorruptArtifactError(f"codebook {path} is not a readable .npy file ({_first_line(err)}): "
                                   f"rerun {STAGE_SCRIPTS['codebook']} --overwrite") from None
    if codebook.ndim != 2 or not np.issubdtype(codebook.dtype, np.floating):
        raise CorruptArtifactError(f"codebook {path} holds a {codebook.dtype} array of shape {codebook.shape}, "
                                   f"not a [K, D] float codebook: rerun {STAGE_SCRIPTS['codebook']} --overwrite")
    return codebook.astype(np.float32, copy=False)


def load_codebook(args, dim):
    """The stage-1 mediator as a float32 tensor [K, D]."""
    path = codebook_path(args)
    codebook = torch.from_numpy(read_codebook(path))
    if tuple(codebook.shape) != (args.num_codebook, dim):
        raise ArtifactMismatchError(f"codebook {path} has shape {tuple(codebook.shape)}, expected "
                                    f"({args.num_codebook}, {dim}) for this backbone")
    return codebook


def _first_line(err):
    text = str(err).strip().splitlines()
    return (text[0] if text else type(err).__name__)[:160]


def read_state(path, kind):
    """A released-layout state dict from ``path`` (``module.`` prefixes removed); bad files are one line."""
    if not os.path.isfile(path):
        raise MissingArtifactError(f"{kind} weights {path} not found: run {STAGE_SCRIPTS[kind]} first "
                                   f"with the same --dataset/--ckpt/--head/--out")
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


def load_into(module, path, kind):
    """Strict load of a released-layout state dict, with a one-line error on mismatch."""
    state = read_state(path, kind)
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
