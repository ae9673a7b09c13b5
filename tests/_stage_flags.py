"""Command-line flags of a tiny stage run on the shared fixtures (see conftest.py)."""

import importlib
from pathlib import Path

from engine.cli import artifact_store
from engine.store import folder_dir_name


def flags(out, ckpt, split_dirs, head="mlp", extra=(), resolution=64, trained_on=None):
    """Every flag a tiny run of any stage may need; :func:`for_script` keeps those of one script.

    ``trained_on``: the training split's dirs, for test.py/predict.py on another image folder.
    """
    images, labels = split_dirs
    trained = ["--train_image_dir", str(trained_on[0])] if trained_on is not None else []
    return [
        "--dataset",
        "folder",
        "--image_dir",
        str(images),
        "--label_dir",
        str(labels),
        "--n_classes",
        "6",
        "--ckpt",
        ckpt,
        "--out",
        str(out),
        "--head",
        head,
        "--num_codebook",
        "16",
        "--projection_dim",
        "16",
        "--reduced_dim",
        "8",
        "--batch_size",
        "4",
        "--num_workers",
        "0",
        "--train_resolution",
        str(resolution),
        "--test_resolution",
        str(resolution),
        "--gpu",
        "0",
        "--cpu",
        *trained,
        *extra,
    ]


def for_script(script, argv):
    """``argv`` without the options ``script`` (a module or a file name) does not take, and their values."""
    module = importlib.import_module(Path(script).stem) if isinstance(script, str) else script
    known = module.parser()._option_string_actions
    kept, i = [], 0
    argv = [str(a) for a in argv]
    while i < len(argv):
        option = argv[i].split("=")[0]
        if argv[i].startswith("--") and option not in known:
            takes_value = "=" not in argv[i] and i + 1 < len(argv) and not argv[i + 1].startswith("--")
            i += 2 if takes_value else 1
            continue
        kept.append(argv[i])
        i += 1
    return kept


def parse(script, argv):
    """``script``'s parsed flags for ``argv`` (filtered by :func:`for_script`)."""
    return script.parser().parse_args(for_script(script, argv))


def store_of(script, argv):
    """The artifact store ``script`` reads and writes for ``argv`` (no dataset/backbone identity)."""
    return artifact_store(parse(script, argv))


def dataset_dir(out, image_dir):
    """``<out>/folder-<name>-<hash>``: where the artifacts of runs on the image folder ``image_dir`` go."""
    return Path(out) / folder_dir_name(image_dir)
