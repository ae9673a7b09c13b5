"""Command-line flags of a tiny stage run on the shared fixtures (see conftest.py)."""

from argparse import Namespace
from pathlib import Path

from loader.netloader import dataset_dir_name


def flags(out, ckpt, split_dirs, head="mlp", extra=(), resolution=64, trained_on=None):
    """``trained_on``: the training split's dirs, for test.py/predict.py on another image folder."""
    images, labels = split_dirs
    trained = ["--train_image_dir", str(trained_on[0])] if trained_on is not None else []
    return ["--dataset", "folder", "--image_dir", str(images), "--label_dir", str(labels), "--n_classes", "6",
            "--ckpt", ckpt, "--out", str(out), "--head", head, "--num_codebook", "16", "--projection_dim", "16",
            "--reduced_dim", "8", "--batch_size", "4", "--num_workers", "0", "--train_resolution", str(resolution),
            "--test_resolution", str(resolution), "--gpu", "0", "--cpu", *trained, *extra]


def dataset_dir(out, image_dir):
    """``<out>/folder-<name>-<hash>``: where the artifacts of runs on the image folder ``image_dir`` go."""
    return Path(out) / dataset_dir_name(Namespace(dataset="folder", image_dir=str(image_dir), data_dir=None))
