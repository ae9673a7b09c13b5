"""Segment your own images, whole and at their own size, with a trained CAUSE head.

    python predict.py --dataset cocostuff27 --ckpt checkpoint/dino_vitbase8_pretrain.pth --head tr \
        --inputs "photos/*.jpg" --output predictions/ [--metrics CAUSE/.../tr/metrics.json] [--ids_only]

Each picture is segmented by ``engine.segmenter.CauseSegmenter.predict``: square windows of the window size (the TR
head's training resolution, ``--test_resolution`` for the MLP head) with ``--overlap`` and flip TTA, then the dense CRF
at the picture's size or on a copy of at most ``--crf_max_megapixels``. The CRF of a picture runs in ``--crf_workers``
processes while the network segments the next one.

Per input ``x.jpg`` (a glob over several folders mirrors them): ``x.jpg.png`` (class or cluster ids, uint8, 255 = none),
``x.jpg.color.png``, ``x.jpg.overlay.png``, and ``legend.png``; ``--ids_only`` writes the id maps alone. With
``--metrics`` (test.py's metrics.json) clusters become their matched classes. Never writes into an input folder or over
an existing file (unless ``--overwrite``). An unreadable picture is skipped with a warning; the exit code is then 4.
"""

import collections
import json
import os
import sys
from contextlib import nullcontext

import numpy as np
import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset
from tqdm import tqdm

from engine import cli
from engine.build import load_trained
from engine.config import build_parser, count, fraction, positive, str2bool
from engine.segmenter import CauseSegmenter
from loader.images import list_images, open_rgb, output_stems
from utils.crf import CRFPool
from utils.errors import EXIT_SKIPPED_INPUTS, InputNotFoundError, InvalidInputError, one_line
from utils.visualize import colorize, dataset_colormap, overlay, save_legend, save_png

NONE = 255
SUFFIXES = (".png", ".color.png", ".overlay.png")
LEGEND = "legend.png"


def parser():
    p = build_parser(__doc__, stage="predict")
    g = p.add_argument_group("prediction")
    g.add_argument("--inputs", required=True, help="an image file, a folder of images, or a glob (quote it)")
    g.add_argument("--output", default="predictions", help="folder for the predicted maps (not an input folder)")
    g.add_argument("--crf", type=str2bool, default=True, help="yes/no: dense-CRF post-processing")
    g.add_argument("--crf_workers", type=count, default=None, help="CRF processes (default: CPU count; 0 = serial)")
    g.add_argument("--crf_max_megapixels", type=positive, default=1.0, help="the CRF runs on a copy this small")
    g.add_argument("--overlap", type=fraction, default=0.5, help="overlap of neighbouring windows, below 1")
    g.add_argument("--metrics", default=None, help="metrics.json from test.py: map clusters to matched classes")
    g.add_argument("--ids_only", action="store_true", help="write the id maps only (pseudo-labels of a folder)")
    g.add_argument("--overwrite", action="store_true", help="replace output files that already exist")
    return p


def load_matching(path, key):
    """(assignment [C] cluster -> class, class names) from test.py's metrics.json."""
    try:
        with open(path) as f:
            result = json.load(f)
    except OSError as err:
        raise InputNotFoundError(f"--metrics {path}: {err.strerror}") from None
    except json.JSONDecodeError:
        raise InvalidInputError(f"--metrics {path} is not a metrics.json written by test.py") from None
    if key not in result or "assignment" not in result[key]:
        raise InvalidInputError(f"{path} has no '{key}' assignment; run test.py first")
    return torch.tensor(result[key]["assignment"]), list(result.get("class_names", []))


def check_output(cfg, files, stems):
    """Refuse (one line) to write into an input folder or over existing files; -> output paths per input."""
    input_dirs = {os.path.realpath(os.path.dirname(f)) for f in files}
    if os.path.isdir(cfg.inputs):
        input_dirs.add(os.path.realpath(cfg.inputs))
    if os.path.realpath(cfg.output) in input_dirs:
        raise InvalidInputError(f"--output {cfg.output} is an input folder; predict.py never writes beside your images")
    suffixes = SUFFIXES[:1] if cfg.ids_only else SUFFIXES
    targets = [[os.path.join(cfg.output, stem + suffix) for suffix in suffixes] for stem in stems]
    existing = [t for group in targets + [[os.path.join(cfg.output, LEGEND)]] for t in group if os.path.lexists(t)]
    if existing and not cfg.overwrite:
        message = f"{len(existing)} output file(s) already exist, e.g. {existing[0]}; pass --overwrite to replace them"
        raise InvalidInputError(message)
    return targets


class Pictures(Dataset):
    """The input pictures, decoded in the DataLoader's workers: (index, displayed RGB image, or why not)."""

    def __init__(self, files):
        self.files = files

    def __len__(self):
        return len(self.files)

    def __getitem__(self, index):
        try:
            return index, open_rgb(self.files[index])
        except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as err:
            return index, one_line(err) or type(err).__name__


def main(args):
    """Segments every input; returns the list of skipped files."""
    run = cli.prepare(args, splits=())
    cfg = run.cfg
    if cfg.n_classes >= NONE:
        raise InvalidInputError(f"{cfg.n_classes} classes do not fit the uint8 maps (255 = none)")
    files = list_images(cfg.inputs)
    targets = check_output(cfg, files, output_stems(files))
    segment, cluster = load_trained(cfg, run.store, run.backbone.embed_dim, run.device)
    classes = load_matching(cfg.metrics, "cluster_crf" if cfg.crf else "cluster") if cfg.metrics else None
    window = cfg.train_resolution if segment.fixed_grid else cfg.test_resolution
    segmenter = CauseSegmenter(run.backbone, segment, cluster, window, cfg.crf_alpha, classes)
    names = (classes and classes[1]) or [f"{'class' if classes else 'cluster'} {c}" for c in range(cfg.n_classes)]
    cmap, skipped = dataset_colormap(cfg.dataset, cfg.n_classes), []

    def write(index, image, job):
        ids = job.result()
        ids = (ids if classes is None else classes[0][ids]).numpy().astype(np.uint8)
        save_png(targets[index][0], ids)
        if not cfg.ids_only:
            colored = colorize(ids, cmap)
            save_png(targets[index][1], colored)
            save_png(
                targets[index][2], overlay(np.asarray(image), colored), compress_level=1
            )  # a photo: zlib gains little

    pictures = DataLoader(Pictures(files), batch_size=None, num_workers=cfg.num_workers)
    pending = collections.deque()  # pictures whose CRF runs in the pool while the next one is segmented
    with torch.no_grad(), CRFPool(num_workers=cfg.crf_workers) if cfg.crf else nullcontext() as pool:
        for index, image in tqdm(pictures, desc="[predict]", dynamic_ncols=True, unit="image"):
            if isinstance(image, str):
                tqdm.write(f"warning: skipped {files[index]}: {image}", file=sys.stderr)
                skipped.append(files[index])
                continue
            scores = segmenter.picture_scores(image, cfg.overlap, cfg.batch_size)
            pending.append((index, image, segmenter.labels_job(image, scores, cfg.crf, cfg.crf_max_megapixels, pool)))
            if len(pending) > max(1, pool.num_workers if pool else 0):
                write(*pending.popleft())
        while pending:
            write(*pending.popleft())
    if not cfg.ids_only:
        title = "matched classes" if classes else "clusters (pass --metrics to name them)"
        save_legend(os.path.join(cfg.output, LEGEND), names, cmap, title=title)
    print(f"{len(files) - len(skipped)} of {len(files)} images segmented into {cfg.output}")
    return skipped


def cli_main(args):
    if main(args):
        sys.exit(EXIT_SKIPPED_INPUTS)


if __name__ == "__main__":
    cli.run(cli_main, parser(), single_process=True, lock=False)
