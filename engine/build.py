"""The networks of a run, built in one place from the resolved configuration, and trained ones loaded.

Every artifact read is checked against what the flags build before its strict load: a mismatch is one line.
"""

import os

import torch

from engine.store import PRODUCER, ArtifactMismatchError
from loader.datasets import build_dataset
from models.backbone import load_backbone
from models.files import checkpoint_files
from modules.segment import SEGMENT_HEADS, Cluster

# What a wrong value in each field of a file points at.
# fmt: off
_FLAG_OF = {"head": "--head", "width": "the backbone (--ckpt/--arch)", "reduced_dim": "--reduced_dim",
            "projection_dim": "--projection_dim", "n_classes": "--n_classes/--dataset",
            "num_queries": "--train_resolution", "num_codebook": "--num_codebook"}
# fmt: on


def build_backbone(cfg, device):
    backbone = load_backbone(cfg.ckpt or None, family=cfg.family, arch=cfg.arch, num_heads=cfg.num_heads, norm=cfg.norm)
    return backbone.to(device)


def build_split(cfg, split, resolution, backbone):
    """``split`` of the run's dataset at ``resolution``, normalised as ``backbone`` expects its input."""
    mean, std, dirs = backbone.mean, backbone.std, {"image_dir": cfg.image_dir, "label_dir": cfg.label_dir}
    return build_dataset(cfg.dataset, cfg.data_dir, split, resolution, mean, std, cfg.n_classes, **dirs)


def feature_cache_key(cfg, backbone):
    """Everything that determines the training tokens of one item, as a JSON-able dict."""
    files = [os.path.abspath(path) for path in checkpoint_files(cfg.ckpt)] if cfg.ckpt else []
    dtype = torch.float16 if cfg.amp and not cfg.cpu and torch.cuda.is_available() else torch.float32
    return {
        "ckpt": files,
        "ckpt_stat": [(os.path.getsize(f), os.path.getmtime(f)) for f in files],
        "arch": backbone.arch or (None if files else cfg.arch),
        "family": backbone.family,
        "num_heads": backbone.num_heads,
        "dataset": cfg.dataset,
        "data_dir": os.path.abspath(cfg.data_dir),
        "image_dir": cfg.image_dir,
        "split": "train",
        "resolution": cfg.train_resolution,
        "mean": list(backbone.mean),
        "std": list(backbone.std),
        "dtype": str(dtype),
    }


def build_segment(cfg, dim, codebook=None):
    """The head ``cfg.head`` for backbone width ``dim``; ``codebook`` [K, D] is attached when the head reads one."""
    segment = SEGMENT_HEADS[cfg.head].create(dim, cfg.reduced_dim, cfg.projection_dim, cfg.n_classes, cfg.num_queries)
    if codebook is not None:
        segment.set_codebook(codebook)
    return segment


def build_cluster(cfg, dim):
    return Cluster(dim, cfg.reduced_dim, cfg.num_codebook, cfg.n_classes)


def _shape(state, key):
    value = state.get(key)
    return tuple(value.shape) if isinstance(value, torch.Tensor) else None


def describe_segment(state):
    """``{"head", "width", "reduced_dim", "projection_dim", "n_classes", "num_queries"}`` of a segment state dict.

    Read from its shapes: ``head.tr.*`` keys mean the TR head (``head.query_pos`` [Q, D]), ``head.f1.weight``
    [r, D, 1, 1] the MLP head, ``linear.f.weight`` [C, r, 1, 1] the classes. Unknown values are None.
    """
    is_tr = any(k.startswith("head.tr.") for k in state)
    f1 = _shape(state, "head.tr.f1.weight" if is_tr else "head.f1.weight")
    linear = _shape(state, "linear.f.weight")
    queries = _shape(state, "head.query_pos")
    projection = _shape(state, "projection_head.f.weight")
    return {
        "head": "tr" if is_tr else ("mlp" if f1 is not None else None),
        "width": f1[1] if f1 and len(f1) > 1 else None,
        "reduced_dim": f1[0] if f1 else None,
        "projection_dim": projection[0] if projection else None,
        "n_classes": linear[0] if linear else None,
        "num_queries": queries[0] if queries else None,
    }


def describe_cluster(state):
    """``{"num_codebook", "width", "n_classes", "reduced_dim"}`` of a cluster state dict."""
    codebook, probe = _shape(state, "codebook"), _shape(state, "cluster_probe")
    num_codebook, width = codebook if codebook and len(codebook) == 2 else (None, None)
    n_classes, reduced_dim = probe if probe and len(probe) == 2 else (None, None)
    return {"num_codebook": num_codebook, "width": width, "n_classes": n_classes, "reduced_dim": reduced_dim}


def _expected(kind, cfg, dim):
    """What :func:`describe_segment` / :func:`describe_cluster` must find for the module these flags build."""
    if kind == "cluster":
        sizes = {"n_classes": cfg.n_classes, "reduced_dim": cfg.reduced_dim}
        return {"num_codebook": cfg.num_codebook, "width": dim, **sizes}
    sizes = {"reduced_dim": cfg.reduced_dim, "projection_dim": cfg.projection_dim, "n_classes": cfg.n_classes}
    queries = {"num_queries": cfg.num_queries} if SEGMENT_HEADS[cfg.head].fixed_grid else {}
    return {"head": cfg.head, "width": dim, **sizes, **queries}


def _summary(values):
    return ", ".join(f"{k}={v}" for k, v in values.items() if v is not None)


def load_into(module, state, path):
    """Strict load of a released-layout state dict, with a one-line error on mismatch."""
    try:
        module.load_state_dict(state, strict=True)
    except RuntimeError as err:
        detail = " ".join(line.strip() for line in str(err).strip().splitlines()[:3])
        what = f"the {type(module).__name__} built from these flags (head/backbone/--reduced_dim/--n_classes mismatch?)"
        raise ArtifactMismatchError(f"{path} does not fit {what}: {detail[:400]}") from None
    return module


def read_artifact(store, kind, cfg, dim):
    """``kind``'s state dict from the store, checked against what these flags build (one line if not)."""
    state, path = store.state(kind), store.path(kind)
    if kind == "cluster" and set(state) != {"codebook", "cluster_probe"}:
        holds = f"holds {sorted(state)[:4]}, not codebook and cluster_probe"
        raise ArtifactMismatchError(f"{path} {holds}: rerun {PRODUCER['cluster']}")
    held, expected = (describe_segment if kind == "segment" else describe_cluster)(state), _expected(kind, cfg, dim)
    wrong = [k for k, v in expected.items() if held.get(k) is not None and held[k] != v]
    if held.get("head", "") is None or wrong:
        fields = wrong or list(expected)
        flags = ", ".join(dict.fromkeys(_FLAG_OF[k] for k in fields))
        holds, wanted = _summary(held) or "no known CAUSE head", _summary({k: expected[k] for k in fields})
        raise ArtifactMismatchError(f"{path} holds {holds}; expected {wanted} (check {flags})")
    return state


def read_codebook(store, cfg, dim):
    """The stage-1 mediator as a float32 tensor [K, D], checked against ``--num_codebook`` and the width."""
    codebook = torch.from_numpy(store.codebook())
    if tuple(codebook.shape) != (cfg.num_codebook, dim):
        path, fix = store.path("codebook"), f"rerun {PRODUCER['codebook']} --overwrite"
        shapes = f"is {list(codebook.shape)} but this run needs [{cfg.num_codebook}, {dim}]"
        raise ArtifactMismatchError(f"codebook {path} {shapes} (--num_codebook, backbone width): {fix}")
    return codebook


def load_trained(cfg, store, dim, device):
    """The stage-2/3 segment (eval mode, codebook attached when its head reads one) and the stage-3 cluster."""
    codebook = read_codebook(store, cfg, dim).to(device) if SEGMENT_HEADS[cfg.head].needs_codebook else None
    segment = load_into(build_segment(cfg, dim), read_artifact(store, "segment", cfg, dim), store.path("segment"))
    segment = segment.to(device).eval()
    if codebook is not None:
        segment.set_codebook(codebook)
    cluster = load_into(build_cluster(cfg, dim), read_artifact(store, "cluster", cfg, dim), store.path("cluster"))
    return segment, cluster.to(device)
