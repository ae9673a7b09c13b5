"""Segment your own images with a trained CAUSE run (flip TTA, optional CRF).

    python predict.py --dataset cocostuff27 --ckpt checkpoint/dino_vitbase8_pretrain.pth --head tr \
        --inputs my_photos/ --output predictions/

Writes, per image, ``<stem>.png`` (cluster ids as 8-bit values) and ``<stem>_color.png``. With
``--metrics`` (a ``metrics.json`` written by test.py) clusters are renamed to the matched classes.
"""

import json
import os

import numpy as np
import torch
from PIL import Image

from loader.datasets import build_dataset
from loader.netloader import load_trained
from modules.objectives import flip_tta_features, upsample
from utils import cli
from utils.config import build_parser, str2bool
from utils.crf import CRFPool, unnormalize_to_uint8
from utils.errors import InputNotFoundError, InvalidInputError
from utils.engine import make_loader
from utils.visualize import colorize, dataset_colormap


def parser():
    p = build_parser(__doc__.strip().splitlines()[0], stage="test")
    g = p.add_argument_group("prediction")
    g.add_argument("--inputs", required=True, help="folder of images to segment")
    g.add_argument("--output", default="predictions", help="folder for the predicted maps")
    g.add_argument("--crf", type=str2bool, default=True, help="yes/no: dense-CRF post-processing")
    g.add_argument("--metrics", default=None, help="metrics.json from test.py: map clusters to matched classes")
    return p


def load_assignment(path, key):
    with open(path) as f:
        result = json.load(f)
    if key not in result or "assignment" not in result[key]:
        raise InvalidInputError(f"{path} has no '{key}' assignment; run test.py first")
    return torch.tensor(result[key]["assignment"])


def main(args):
    info, backbone = cli.prepare(args, splits=())
    device = info.device
    if not info.is_main:
        return
    info = cli.single_process(info)
    if not os.path.isdir(args.inputs):
        raise InputNotFoundError(f"--inputs {args.inputs} is not a folder of images")
    segment, cluster = load_trained(args, backbone.embed_dim, device)
    images = build_dataset("folder", args.data_dir, "val", args.test_resolution, mean=backbone.mean,
                           std=backbone.std, n_classes=args.n_classes, image_dir=args.inputs)
    loader, _ = make_loader(images, info, args.batch_size, args.num_workers, shuffle=False, drop_last=False)
    assignment = load_assignment(args.metrics, "cluster_crf" if args.crf else "cluster") if args.metrics else None
    cmap = dataset_colormap(args.dataset, args.n_classes)
    os.makedirs(args.output, exist_ok=True)
    stems = [os.path.splitext(os.path.basename(p))[0] for p in images.image_paths]
    pool = CRFPool() if args.crf else None
    try:
        with torch.no_grad():
            for batch in loader:
                img = batch["img"].to(device)
                u, _ = flip_tta_features(backbone, segment.head_ema, img)
                scores = cluster.scores(upsample(u.float(), img.shape[-2:]))
                if pool is not None:
                    uint8 = unnormalize_to_uint8(img.float().cpu(), backbone.mean, backbone.std)
                    pred = pool(uint8, torch.log_softmax(scores * 3.0, dim=1).cpu()).argmax(1)
                else:
                    pred = scores.argmax(1).cpu()
                if assignment is not None:
                    pred = assignment[pred]
                for ind, p in zip(batch["ind"].tolist(), pred):
                    p = p.numpy().astype(np.uint8)
                    Image.fromarray(p).save(os.path.join(args.output, f"{stems[ind]}.png"))
                    Image.fromarray(colorize(p, cmap)).save(os.path.join(args.output, f"{stems[ind]}_color.png"))
    finally:
        if pool is not None:
            pool.close()
    print(f"{len(images)} predictions written to {args.output}")


if __name__ == "__main__":
    cli.run(main, parser(), single_process=True, lock=False)
