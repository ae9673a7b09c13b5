"""The artifact store of a run: where its files live, what they were made from, how they are written.

Artifacts follow the reference's layout under the output root (default ``CAUSE/``)::

    <out>/<dataset>/modularity/<baseline>/<K>/modular.npy      stage 1 (its logs next to it)
    <out>/<dataset>/<baseline>/<K>/segment_<head>.pth           stages 2 and 3
    <out>/<dataset>/<baseline>/<K>/cluster_<head>.pth           stage 3
    <out>/<dataset>/<baseline>/<K>/<head>/                      the head's logs, configs, states, tests

``<baseline>`` is the checkpoint's stem, ``<dataset>`` the dataset's name (``folder-<name>-<hash>`` for ``--dataset
folder``). Each artifact has a provenance record beside it (``segment_mlp.pth.json``): its sha256, dataset (with a
manifest of its files), backbone, flags and the sha256 of its upstream artifact as it was read.
"""

import hashlib
import io
import json
import os
import socket
import sys
import threading
import time
import warnings

import numpy as np
import torch

from utils.atomic import atomic_np_save, atomic_torch_save, atomic_write_bytes, pid_alive
from utils.errors import InputNotFoundError, InvalidInputError

UPSTREAM = {"codebook": None, "segment": "codebook", "cluster": "segment"}
PRODUCER = {"codebook": "train_mediator.py", "segment": "train_front_door.py", "cluster": "fine_tuning.py"}
LOCK_NAME = "run.lock"


class MissingArtifactError(InputNotFoundError):
    """An earlier stage's output is not there; the message says which script to run."""


class ArtifactMismatchError(InvalidInputError):
    """An artifact does not fit the network it is loaded into, or this run."""


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


def backbone_identity(files, arch):
    """The checkpoint's files (one, or a Hugging Face folder's) as paths, sizes and a hash of their ends."""
    if not files:
        return {"random": arch}
    digest, size = hashlib.sha256(), 0
    for path in files:
        size += os.path.getsize(path)
        with open(path, "rb") as f:
            digest.update(f.read(1 << 20))
            f.seek(max(0, os.path.getsize(path) - (1 << 20)))
            digest.update(f.read())
    return {"path": os.path.abspath(files[0]), "size": size, "sha256_ends": digest.hexdigest()}


def _differs(what, recorded, current):
    """Backbones: files' sizes and hashes; datasets: names, folders and (when both sides have one) file manifests."""
    if what == "backbone":
        keys = {"random", "size", "sha256_ends"}
    elif "manifest" in recorded and "manifest" in current:
        keys = (set(recorded) | set(current)) - {"files"}
    else:
        keys = {"name", "image_dir"}
    return any(recorded.get(k) != current.get(k) for k in keys)


def _describe(what, identity):
    if what == "backbone" and "random" in identity:
        return f"random {identity['random']}"
    if what == "backbone":
        return f"{identity['path']} ({identity['size']} bytes, sha {identity['sha256_ends'][:12]})"
    folder = f" in {identity['image_dir']}" if identity.get("image_dir") else ""
    manifest = f" (manifest {identity['manifest'][:12]}, {identity['files']} files)" if "manifest" in identity else ""
    return f"{identity['name']}{folder}{manifest}"


class ArtifactStore:
    """The codebook, segment and cluster files of one configuration, read and written with provenance.

    ``root``: ``<out>/<dataset dir>``; ``head``: mlp or tr (None for stage 1); ``given``: kind -> a path replacing the
    tree's (``--segment`` ...); ``identity``: this run's dataset and backbone, recorded with what it saves and compared
    with the records of what it reads. Files read are hashed as read (``loaded``), so a record names the bytes used.
    """

    def __init__(self, root, baseline, num_codebook, head=None, given=None, identity=None):
        self.root, self.baseline, self.num_codebook, self.head = root, baseline, num_codebook, head
        self.given = {k: v for k, v in (given or {}).items() if v}
        self.identity = identity or {}
        self.loaded = {}

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

    def read_bytes(self, kind):
        """The file's bytes; their sha256 is what this run used of ``kind``."""
        path = self.path(kind)
        if not os.path.isfile(path):
            if kind in self.given:
                raise MissingArtifactError(f"{kind} file not found: {path}")
            same = f"--dataset/--ckpt/{'--num_codebook' if kind == 'codebook' else '--head'}/--out"
            raise MissingArtifactError(f"{kind} {path} not found: run {PRODUCER[kind]} first with the same {same}")
        with open(path, "rb") as f:
            data = f.read()
        self.loaded[kind] = hashlib.sha256(data).hexdigest()
        return data

    def codebook(self):
        """The stage-1 mediator as a float32 array [K, D]; a missing or unreadable file is one line."""
        path, data = self.path("codebook"), self.read_bytes("codebook")
        fix = f"rerun {PRODUCER['codebook']} --overwrite"
        try:
            codebook = np.load(io.BytesIO(data), allow_pickle=False)
        except (OSError, ValueError, EOFError):
            raise CorruptArtifactError(f"codebook {path} is not a readable .npy file: {fix}") from None
        if codebook.ndim != 2 or not np.issubdtype(codebook.dtype, np.floating):
            what = f"a {codebook.dtype} array of shape {codebook.shape}"
            raise CorruptArtifactError(f"codebook {path} holds {what}, not a [K, D] float codebook: {fix}")
        return codebook.astype(np.float32, copy=False)

    def state(self, kind):
        """A released-layout state dict (``module.`` prefixes removed); a bad file is one line."""
        path, data, fix = self.path(kind), self.read_bytes(kind), f"rerun {PRODUCER[kind]}"
        if not data.startswith((b"PK", b"\x80")):
            try:
                what = f"is a text file ({data[:40].decode().strip()!r}...), not PyTorch weights"
            except UnicodeDecodeError:
                what = f"is not a PyTorch file (it begins with {data[:8]!r})"
            raise CorruptArtifactError(f"{kind} weights {path} {what if data else 'is empty'}: {fix}")
        try:
            state = torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
        except Exception:  # any failure to unpickle a file the user pointed at is a bad file, not a bug
            raise CorruptArtifactError(f"{kind} weights {path} is a truncated or damaged PyTorch file: {fix}") from None
        if isinstance(state, dict) and isinstance(state.get("state_dict"), dict):
            state = state["state_dict"]
        if not isinstance(state, dict) or not all(isinstance(k, str) and torch.is_tensor(v) for k, v in state.items()):
            raise CorruptArtifactError(f"{kind} weights {path} hold no state dict of tensors: {fix}")
        return {k.removeprefix("module."): v for k, v in state.items()}

    def save(self, kind, obj, flags):
        """Save ``obj`` (the codebook's array, else a state dict) atomically, then its record; return its sha256.

        The record names the upstream artifact by the sha256 of the bytes this run read (or wrote) of it.
        """
        path = self.tree_path(kind)
        sha = atomic_np_save(obj, path) if kind == "codebook" else atomic_torch_save(obj, path)
        record = {"kind": kind, "file": os.path.basename(path), "sha256": sha, **self.identity, "flags": flags}
        record["created"] = time.strftime("%Y-%m-%d %H:%M:%S")
        upstream = UPSTREAM[kind]
        if upstream in self.loaded:
            name = os.path.basename(self.path(upstream))
            record["upstream"] = {"kind": upstream, "file": name, "sha256": self.loaded[upstream]}
        atomic_write_bytes(sidecar_path(path), json.dumps(record, indent=2, default=str).encode())
        self.loaded[kind] = sha
        return sha

    def record(self, kind):
        """The provenance record of ``kind``'s file, or None (with a warning) when it cannot be checked."""
        path = self.path(kind)
        name, record_path = os.path.basename(path), sidecar_path(path)
        unchecked = "used without checking what it was trained from"
        if not os.path.isfile(record_path):
            why = f"has no provenance record ({os.path.basename(record_path)}), e.g. a released artifact"
            warnings.warn(f"{name} {why}: {unchecked}", ProvenanceWarning)
            return None
        try:
            with open(record_path) as f:
                record = json.load(f)
        except (OSError, ValueError):
            warnings.warn(f"{record_path} is unreadable: {name} is {unchecked}", ProvenanceWarning)
            return None
        if not isinstance(record, dict) or record.get("sha256") != file_sha256(path):
            why = f"was replaced after {os.path.basename(record_path)} was written"
            warnings.warn(f"{name} {why}: {unchecked}", ProvenanceWarning)
            return None
        return record

    def problems(self, kind):
        """One line per way the existing ``kind`` artifact does not fit this run (backbone, data, upstream)."""
        record = self.record(kind)
        if record is None:
            return []
        name, script, problems = os.path.basename(self.path(kind)), PRODUCER[kind], []
        for what, verb in (("backbone", "with"), ("dataset", "on")):
            recorded, current = record.get(what), self.identity.get(what)
            if recorded is not None and current is not None and _differs(what, recorded, current):
                was, now = _describe(what, recorded), _describe(what, current)
                problems.append(f"{name} was trained {verb} {what} {was} but this run uses {now}: rerun {script}")
        upstream = record.get("upstream")
        up_path = self.path(upstream["kind"]) if upstream is not None else None
        if up_path and os.path.isfile(up_path) and file_sha256(up_path) != upstream["sha256"]:
            was, now = f"{upstream['kind']} sha {upstream['sha256'][:12]}", file_sha256(up_path)[:12]
            problems.append(
                f"{name} was trained on {was} but {os.path.basename(up_path)} is now sha {now}: rerun {script}"
            )
        return problems


class RunLock:
    """Exclusive use of an output directory by one run: a ``run.lock`` naming its holder, with a heartbeat.

    The heartbeat is rewritten every ``stale_after / 4`` s. A lock whose process is gone (same host, dead pid) or
    whose heartbeat is older than ``stale_after`` s is taken over with a warning; any other is a one-line refusal.
    """

    def __init__(self, directory, stale_after=600.0):
        self.directory, self.stale_after = directory, stale_after
        self.path = os.path.join(directory, LOCK_NAME)
        self.held, self._stop = False, threading.Event()

    def _holder(self):
        try:
            with open(self.path) as f:
                return json.load(f)
        except (OSError, ValueError):
            return {}

    def _stale(self, holder, host):
        """Why the holder is gone ('' when it may be alive)."""
        if holder.get("host") == host and not pid_alive(int(holder.get("pid", -1))):
            return "that is gone"
        silent = time.time() - float(holder.get("heartbeat", 0))
        if silent <= self.stale_after:
            return ""
        return f"silent for {silent / 60:.1f} min (--lock_timeout {self.stale_after / 60:g})"

    def acquire(self):
        try:
            os.makedirs(self.directory, exist_ok=True)
        except OSError as err:
            raise InvalidInputError(
                f"cannot create the output folder {self.directory}: {err.strerror or err}"
            ) from None
        command = " ".join([os.path.basename(sys.argv[0]), *sys.argv[1:]])[:300]
        started = time.strftime("%Y-%m-%d %H:%M:%S")
        self.me = {"pid": os.getpid(), "host": socket.gethostname(), "started": started, "command": command}
        self.me["heartbeat"] = time.time()
        tmp = f"{self.path}.tmp{os.getpid()}"
        atomic_write_bytes(tmp, json.dumps(self.me).encode())
        try:
            for _ in range(2):
                try:
                    os.link(tmp, self.path)  # creates the lock with its content, or fails if it is held
                    self.held = True
                    threading.Thread(target=self._beat, daemon=True).start()
                    return self
                except FileExistsError:
                    holder = self._holder()
                    who = f"pid {holder.get('pid')} on {holder.get('host')}, started {holder.get('started')}"
                    who += f" ({holder.get('command', '?')})"
                    gone = self._stale(holder, self.me["host"])
                    if not gone:
                        fix = f"wait for it or use another --out (delete {self.path} if that run is gone)"
                        raise OutputLockedError(f"{self.directory} is in use by another run: {who}; {fix}") from None
                    warnings.warn(f"taking over the stale lock {self.path} of a run {gone} ({who})")
                    os.remove(self.path)
            raise OutputLockedError(f"{self.directory} is in use by another run that started at the same time")
        finally:
            os.remove(tmp)

    def _beat(self):
        while not self._stop.wait(self.stale_after / 4):
            if self._holder().get("pid") == self.me["pid"]:
                atomic_write_bytes(self.path, json.dumps({**self.me, "heartbeat": time.time()}).encode())

    def release(self):
        self._stop.set()
        if self.held and self._holder().get("pid") == os.getpid():
            os.remove(self.path)
        self.held = False

    def __enter__(self):
        return self.acquire()

    def __exit__(self, *exc):
        self.release()
        return False
