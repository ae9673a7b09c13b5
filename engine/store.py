"""The artifact store of a run: where its files live, what they were made from, how they are written.

Artifacts follow the reference's layout under the output root (default ``CAUSE/``)::

    <out>/<dataset>/modularity/<baseline>/<K>/modular.npy      stage 1
    <out>/<dataset>/<baseline>/<K>/segment_<head>.pth           stages 2 and 3
    <out>/<dataset>/<baseline>/<K>/cluster_<head>.pth           stage 3

where ``<baseline>`` is the checkpoint's file stem and ``<dataset>`` the dataset's name, or
``folder-<name>-<hash>`` for ``--dataset folder`` (one directory per image folder). Logs,
configs, resumable states and test outputs of a head go to its run directory
``<out>/<dataset>/<baseline>/<K>/<head>/``; those of stage 1 next to the codebook.

Every artifact has a provenance record next to it (``segment_mlp.pth.json``): its own sha256,
the dataset, the backbone checkpoint, the sha256 of each upstream artifact as it was read, and
the flags it was trained with. The weights files themselves keep the released layout.
A :class:`RunLock` keeps two runs from writing one directory at the same time.
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

from utils.atomic import atomic_np_save, atomic_torch_save, atomic_write_bytes, pid_alive
from utils.errors import InputNotFoundError, InvalidInputError

KINDS = ("codebook", "segment", "cluster")
UPSTREAM = {"codebook": None, "segment": "codebook", "cluster": "segment"}
PRODUCER = {"codebook": "train_mediator.py", "segment": "train_front_door.py", "cluster": "fine_tuning.py"}
LOCK_NAME = "run.lock"


class MissingArtifactError(InputNotFoundError):
    """An earlier stage's output is not there; the message says which script to run."""


class ArtifactMismatchError(InvalidInputError):
    """An artifact does not fit the network it is loaded into (head, width, classes) or this run."""


class CorruptArtifactError(InvalidInputError):
    """An artifact file exists but cannot be read (truncated, empty, not a weights file)."""


class OutputLockedError(InvalidInputError):
    """Another run is writing the same output directory."""


class ProvenanceWarning(UserWarning):
    """An artifact's origin cannot be checked (no provenance record, e.g. a released head)."""


def sidecar_path(path):
    return f"{path}.json"


def file_sha256(path):
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def folder_dir_name(image_dir):
    """``folder-<name>-<hash>``: the artifact folder of a ``--dataset folder`` run on ``image_dir``."""
    folder = os.path.abspath(image_dir)
    digest = hashlib.sha1(folder.encode()).hexdigest()[:8]
    return f"folder-{os.path.basename(folder.rstrip(os.sep)) or 'root'}-{digest}"


def backbone_identity(ckpt, arch):
    """The checkpoint as path, size and a fast hash (sha256 of its size, first and last MiB)."""
    if not ckpt:
        return {"random": arch}
    path = os.path.abspath(ckpt)
    size = os.path.getsize(path)
    digest = hashlib.sha256(str(size).encode())
    with open(path, "rb") as f:
        digest.update(f.read(1 << 20))
        if size > 2 << 20:
            f.seek(size - (1 << 20))
            digest.update(f.read(1 << 20))
    return {"path": path, "size": size, "sha256_ends": digest.hexdigest()}


def _describe_backbone(identity):
    if "random" in identity:
        return f"random {identity['random']}"
    return f"{identity['path']} ({identity['size']} bytes, sha {identity['sha256_ends'][:12]})"


def _same_backbone(recorded, current):
    if "random" in recorded or "random" in current:
        return recorded.get("random") == current.get("random")
    return (recorded.get("size"), recorded.get("sha256_ends")) == (current["size"], current["sha256_ends"])


def _first_line(err):
    text = str(err).strip().splitlines()
    return (text[0] if text else type(err).__name__)[:160]


class ArtifactStore:
    """The codebook, segment and cluster files of one configuration, read and written with provenance.

    ``root``: ``<out>/<dataset dir>``; ``baseline``: the backbone's name; ``head``: mlp or tr
    (None for stage 1); ``given``: kind -> a path that replaces the tree's (``--segment`` ...);
    ``identity``: the dataset and backbone this run uses, recorded with every artifact it saves
    and compared with the records of those it reads. Every file read through the store is
    hashed as read, so a record names exactly the upstream bytes that were used.
    """

    def __init__(self, root, baseline, num_codebook, head=None, given=None, identity=None):
        self.root = root
        self.baseline = baseline
        self.num_codebook = num_codebook
        self.head = head
        self.given = {k: v for k, v in (given or {}).items() if v}
        self.identity = identity or {}
        self.loaded = {}

    # -- where ---------------------------------------------------------------------------

    @property
    def mediator_dir(self):
        return os.path.join(self.root, "modularity", self.baseline, str(self.num_codebook))

    @property
    def artifact_dir(self):
        return os.path.join(self.root, self.baseline, str(self.num_codebook))

    @property
    def run_dir(self):
        """The head's logs, configs, resumable states and test outputs."""
        return os.path.join(self.artifact_dir, self.head)

    def tree_path(self, kind):
        if kind == "codebook":
            return os.path.join(self.mediator_dir, "modular.npy")
        return os.path.join(self.artifact_dir, f"{kind}_{self.head}.pth")

    def path(self, kind):
        """Where this run reads ``kind``: the path given by ``--segment/--cluster/--codebook``, else the tree."""
        return self.given.get(kind) or self.tree_path(kind)

    def output_dir(self, stage):
        """The directory a stage writes: the mediator's for stage 1, the head's run directory else."""
        return self.mediator_dir if stage == "mediator" else self.run_dir

    # -- reading -------------------------------------------------------------------------

    def _missing(self, kind):
        path = self.path(kind)
        if kind in self.given:
            return MissingArtifactError(f"{kind} file not found: {path}")
        flags = "--num_codebook" if kind == "codebook" else "--head"
        return MissingArtifactError(
            f"{kind} {path} not found: run {PRODUCER[kind]} first with the same --dataset/--ckpt/{flags}/--out"
        )

    def read_bytes(self, kind):
        """The file's bytes; their sha256 is remembered as what this run used of ``kind``."""
        path = self.path(kind)
        if not os.path.isfile(path):
            raise self._missing(kind)
        with open(path, "rb") as f:
            data = f.read()
        self.loaded[kind] = hashlib.sha256(data).hexdigest()
        return data

    def codebook(self):
        """The stage-1 mediator as a float32 array [K, D]; a missing or unreadable file is one line."""
        path = self.path("codebook")
        data = self.read_bytes("codebook")
        try:
            codebook = np.load(io.BytesIO(data), allow_pickle=False)
        except (OSError, ValueError, EOFError) as err:
            raise CorruptArtifactError(
                f"codebook {path} is not a readable .npy file ({_first_line(err)}): "
                f"rerun {PRODUCER['codebook']} --overwrite"
            ) from None
        if codebook.ndim != 2 or not np.issubdtype(codebook.dtype, np.floating):
            raise CorruptArtifactError(
                f"codebook {path} holds a {codebook.dtype} array of shape {codebook.shape}, "
                f"not a [K, D] float codebook: rerun {PRODUCER['codebook']} --overwrite"
            )
        return codebook.astype(np.float32, copy=False)

    def state(self, kind):
        """A released-layout state dict (``module.`` prefixes removed); a bad file is one line."""
        path = self.path(kind)
        data = self.read_bytes(kind)
        try:
            state = torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
        except Exception as err:  # any failure to unpickle a file the user pointed at is a bad file, not a bug
            what = "is empty" if not data else f"is not a readable PyTorch file ({_first_line(err)})"
            raise CorruptArtifactError(f"{kind} weights {path} {what}: rerun {PRODUCER[kind]}") from None
        if isinstance(state, dict) and isinstance(state.get("state_dict"), dict):
            state = state["state_dict"]
        if not isinstance(state, dict) or not all(isinstance(k, str) and torch.is_tensor(v) for k, v in state.items()):
            raise CorruptArtifactError(f"{kind} weights {path} hold no state dict of tensors: rerun {PRODUCER[kind]}")
        return {k[len("module.") :] if k.startswith("module.") else k: v for k, v in state.items()}

    # -- writing -------------------------------------------------------------------------

    def save(self, kind, obj, flags):
        """Save ``obj`` (an array for the codebook, a state dict else) atomically, then its provenance record.

        The record names the upstream artifact by the sha256 of the bytes this run read of it (or
        wrote: stage 3's cluster names the segment saved with it). Returns the file's sha256.
        """
        path = self.tree_path(kind)
        sha = atomic_np_save(obj, path) if kind == "codebook" else atomic_torch_save(obj, path)
        record = {
            "kind": kind,
            "file": os.path.basename(path),
            "sha256": sha,
            **self.identity,
            "flags": flags,
            "created": time.strftime("%Y-%m-%d %H:%M:%S"),
        }
        upstream = UPSTREAM[kind]
        if upstream is not None and upstream in self.loaded:
            record["upstream"] = {
                "kind": upstream,
                "file": os.path.basename(self.path(upstream)),
                "sha256": self.loaded[upstream],
            }
        atomic_write_bytes(sidecar_path(path), json.dumps(record, indent=2, default=str).encode())
        self.loaded[kind] = sha  # what this run now holds of ``kind`` (stage 3's cluster pairs with its segment)
        return sha

    # -- provenance ----------------------------------------------------------------------

    def record(self, kind):
        """The provenance record of ``kind``'s file, or None (with a warning) when it cannot be checked."""
        path = self.path(kind)
        name = os.path.basename(path)
        record_path = sidecar_path(path)
        if not os.path.isfile(record_path):
            warnings.warn(
                f"{name} has no provenance record ({os.path.basename(record_path)}), e.g. a released "
                f"artifact: used without checking what it was trained from",
                ProvenanceWarning,
            )
            return None
        try:
            with open(record_path) as f:
                record = json.load(f)
        except (OSError, ValueError):
            warnings.warn(
                f"{record_path} is unreadable: {name} is used without checking what it was trained from",
                ProvenanceWarning,
            )
            return None
        if not isinstance(record, dict) or record.get("sha256") != file_sha256(path):
            warnings.warn(
                f"{name} was replaced after {os.path.basename(record_path)} was written: used without "
                f"checking what it was trained from",
                ProvenanceWarning,
            )
            return None
        return record

    def problems(self, kind):
        """One line per way the existing ``kind`` artifact does not fit this run (backbone, data, upstream)."""
        record = self.record(kind)
        if record is None:
            return []
        name, script = os.path.basename(self.path(kind)), PRODUCER[kind]
        problems = []
        recorded, current = record.get("backbone"), self.identity.get("backbone")
        if recorded is not None and current is not None and not _same_backbone(recorded, current):
            problems.append(
                f"{name} was trained with backbone {_describe_backbone(recorded)} but this run uses "
                f"{_describe_backbone(current)}: rerun {script}"
            )
        if "dataset" in record and "dataset" in self.identity and record["dataset"] != self.identity["dataset"]:
            problems.append(
                f"{name} was trained on dataset {record['dataset']} but this run uses "
                f"{self.identity['dataset']}: rerun {script}"
            )
        upstream = record.get("upstream")
        if upstream is not None:
            up_path = self.path(upstream["kind"])
            if os.path.isfile(up_path):
                now = file_sha256(up_path)
                if now != upstream["sha256"]:
                    problems.append(
                        f"{name} was trained on {upstream['kind']} sha {upstream['sha256'][:12]} but "
                        f"{os.path.basename(up_path)} is now sha {now[:12]}: rerun {script}"
                    )
        return problems


def _describe_holder(holder):
    return (
        f"pid {holder.get('pid')} on {holder.get('host')}, started {holder.get('started')} "
        f"({holder.get('command', '?')})"
    )


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
            raise InvalidInputError(
                f"cannot create the output folder {self.directory}: {err.strerror or err}"
            ) from None
        me = {
            "pid": os.getpid(),
            "host": socket.gethostname(),
            "started": time.strftime("%Y-%m-%d %H:%M:%S"),
            "command": " ".join([os.path.basename(sys.argv[0]), *sys.argv[1:]])[:300],
        }
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
                    stale = holder.get("host") == me["host"] and not pid_alive(int(holder.get("pid", -1)))
                    if not stale:
                        raise OutputLockedError(
                            f"{self.directory} is in use by another run: {_describe_holder(holder)}; wait for it "
                            f"or use another --out (delete {self.path} if that run is gone)"
                        ) from None
                    warnings.warn(
                        f"taking over the stale lock {self.path} of a run that is gone ({_describe_holder(holder)})"
                    )
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
