"""The first training items and their backbone tokens, as each side reads them (``parity.py`` compares).

Under ``run_reference.py``:  dump_inputs.py OUT.pt DATA_DIR CKPT  (the authors' loader and backbone)
Directly:                    dump_inputs.py --project OUT.pt DATA_DIR CKPT  (the project's)
"""

import argparse
import os
import sys

import torch

ITEMS = 4
RES = 320


def reference(out, ckpt_dir_args):
    from loader.dataloader import dataloader
    from loader.netloader import network_loader

    args = argparse.Namespace(**ckpt_dir_args)
    train_loader, _, _ = dataloader(args, no_ddp_train_shuffle=False)
    batch = next(iter(train_loader))
    net = network_loader(args)
    with torch.no_grad():
        tokens = net(batch["img"])[:, 1:, :]
    torch.save({"img": batch["img"], "label": batch["label"], "tokens": tokens}, out)


def project(out, data_dir, ckpt):
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    sys.path.insert(0, root)
    from loader.datasets import build_dataset
    from models.backbone import load_backbone

    backbone = load_backbone(ckpt)
    dataset = build_dataset("toy", data_dir, "train", RES, mean=backbone.mean, std=backbone.std)
    items = [dataset[i] for i in range(ITEMS)]
    img = torch.stack([item["img"] for item in items])
    label = torch.stack([item["label"] for item in items])
    with torch.no_grad():
        tokens = backbone(img)
    torch.save({"img": img, "label": label, "tokens": tokens}, out)


if __name__ == "__main__":
    if sys.argv[1] == "--project":
        project(*sys.argv[2:5])
    else:
        out, data_dir, ckpt = sys.argv[1:4]
        dim = int(torch.load(ckpt, map_location="cpu", weights_only=True)["cls_token"].shape[-1])
        reference(
            out,
            {
                "dataset": "toy",
                "data_dir": data_dir,
                "ckpt": ckpt,
                "train_resolution": RES,
                "test_resolution": RES,
                "batch_size": ITEMS,
                "num_workers": 0,
                "distributed": False,
                "dim": dim,
            },
        )
