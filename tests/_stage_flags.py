"""Command-line flags of a tiny stage run on the shared fixtures (see conftest.py)."""


def flags(out, ckpt, split_dirs, head="mlp", extra=(), resolution=64):
    images, labels = split_dirs
    return ["--dataset", "folder", "--image_dir", str(images), "--label_dir", str(labels), "--n_classes", "6",
            "--ckpt", ckpt, "--out", str(out), "--head", head, "--num_codebook", "16", "--projection_dim", "16",
            "--reduced_dim", "8", "--batch_size", "4", "--num_workers", "0", "--train_resolution", str(resolution),
            "--test_resolution", str(resolution), "--gpu", "0", "--cpu", *extra]
