"""Run one stage-1 step through the real plumbing and dump the loss and gradient (rank 0).

Used by tests/test_pipeline.py, once as a single process and once under torchrun with two
gloo processes on the same global batch. Arguments: ckpt, image_dir, label_dir, batch, out.
"""

import json
import sys

import torch

from engine.loop import Trainer
from loader.batches import make_loader
from loader.datasets import build_dataset
from models.backbone import load_backbone
from modules.objectives import mediator_loss
from modules.segment import init_codebook
from utils.distributed import all_reduce_mean, leave, setup


def main(ckpt, image_dir, label_dir, batch_size, out):
    info = setup("0", use_cpu=True)
    backbone = load_backbone(ckpt)
    data = build_dataset(
        "folder",
        None,
        "train",
        64,
        mean=backbone.mean,
        std=backbone.std,
        n_classes=6,
        image_dir=image_dir,
        label_dir=label_dir,
    )
    loader, _ = make_loader(data, info, int(batch_size), 0, shuffle=False, drop_last=True)
    torch.manual_seed(0)
    codebook = torch.nn.Parameter(init_codebook(16, backbone.embed_dim))
    optimizer = torch.optim.Adam([codebook], lr=1e-3 * info.world_size)
    stage = Trainer("mediator", info, "/tmp", epochs=1, max_steps=None, save_every=0, amp=False, flags={}, shared={})
    img = next(iter(loader))["img"]
    loss = mediator_loss(codebook, backbone(img), grid=False)
    stage.step(loss, [optimizer], [codebook])
    mean_loss = all_reduce_mean(loss.item(), info)
    if info.is_main:
        with open(out, "w") as f:
            json.dump({"loss": mean_loss, "grad": codebook.grad.tolist(), "world": info.world_size}, f)
    leave()


if __name__ == "__main__":
    main(*sys.argv[1:])
