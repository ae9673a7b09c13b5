"""Segment your own images, whole and at their own size, with a trained CAUSE head.

    python predict.py --dataset cocostuff27 --ckpt checkpoint/dino_vitbase8_pretrain.pth --head tr \
        --inputs "photos/*.jpg" --output predictions/ [--metrics CAUSE/.../tr/metrics.json]

Scheme: each picture (EXIF orientation applied) is resized to a short side of the window size
(the TR head's training resolution, whose patch grid is its query grid; ``--test_resolution``
for the MLP head) and covered by square windows of that size with ``--overlap``; every window
is segmented with flip TTA, the cluster scores of overlapping windows are averaged, then
brought back to the picture's own size. The optional dense CRF runs at the picture's size, or
on a copy scaled down to ``--crf_max_megapixels`` (default 1) whose labels are then enlarged
(nearest): its time and memory grow with pixels x classes (about 30 s and 2 GB per megapixel
with 27 classes on one CPU core), so a 12-MP photo at full size would need minutes and ~16 GB.

Per input ``x.jpg`` (names keep the extension; a glob over several folders mirrors them):
``x.jpg.png`` (class or cluster ids, uint8, 255 = none), ``x.jpg.color.png`` and
``x.jpg.overlay.png``; plus ``legend.png``. With ``--metrics`` (test.py's metrics.json) the
clusters become their Hungarian-matched classes. Never writes into an input folder or over an
existing file (unless ``--overwrite``). An unreadable picture is skipped with a warning; the
exit code is then 4.
"""

import json
import os
import sys

import numpy as np
import torch
from PIL import Image
from tqdm import tqdm

from engine import cli
from engine.build import load_trained
from engine.config import build_parser, str2bool
from loader.images import list_images, open_rgb, output_stems
from loader.transforms import image_to_tensor
from modules.inference import (
    crf_size,
    flip_tta_features,
    resize_short_side,
    sliding_window_scores,
    upsample,
    upsample_argmax,
)
from utils.crf import dense_crf
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
    g.add_argument(
        "--crf_max_megapixels",
        type=float,
        default=1.0,
        help="the CRF runs on a copy scaled down to this many megapixels when the picture is larger",
    )
    g.add_argument("--overlap", type=float, default=0.5, help="overlap of neighbouring windows, in [0, 1)")
    g.add_argument("--metrics", default=None, help="metrics.json from test.py: map clusters to matched classes")
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


def window_size(cfg, segment):
    """A head with a fixed grid (TR) sees its training resolution; the MLP head --test_resolution."""
    return cfg.train_resolution if segment.fixed_grid else cfg.test_resolution


def check_output(args, files, stems):
    """Refuse (one line) to write into an input folder or over existing files; -> output paths per input."""
    out = os.path.realpath(args.output)
    input_dirs = {os.path.realpath(os.path.dirname(f)) for f in files}
    if os.path.isdir(args.inputs):
        input_dirs.add(os.path.realpath(args.inputs))
    if out in input_dirs:
        raise InvalidInputError(
            f"--output {args.output} is an input folder; predict.py never writes beside your images: "
            f"choose another --output"
        )
    targets = [[os.path.join(args.output, stem + suffix) for suffix in SUFFIXES] for stem in stems]
    existing = [t for group in targets for t in group if os.path.lexists(t)]
    legend = os.path.join(args.output, LEGEND)
    if os.path.lexists(legend):
        existing.append(legend)
    if existing and not args.overwrite:
        raise InvalidInputError(
            f"{len(existing)} output file(s) already exist, e.g. {existing[0]}; pass --overwrite to "
            f"replace them or choose another --output"
        )
    return targets


def predict_image(image, args, backbone, segment, cluster, device):
    """One displayed RGB PIL image -> int64 [H, W] cluster ids at its own size, on the CPU."""
    window = window_size(args, segment)
    stride = max(1, round(window * (1.0 - args.overlap)))
    img = image_to_tensor(image, backbone.mean, backbone.std).to(device)[None]
    small = resize_short_side(img, window)[0]

    def cluster_scores(windows):
        u, _ = flip_tta_features(backbone, segment.head_ema, windows)
        return cluster.scores(upsample(u.float(), windows.shape[-2:]))

    scores = sliding_window_scores(small, window, stride, cluster_scores, args.batch_size)
    size = (image.height, image.width)
    if not args.crf:
        return upsample_argmax(scores, size).cpu()
    scores = scores.cpu()
    crf_h, crf_w = crf_size(*size, int(args.crf_max_megapixels * 1e6))
    pixels = np.asarray(image if (crf_h, crf_w) == size else image.resize((crf_w, crf_h), Image.Resampling.BILINEAR))
    labels = dense_crf(pixels, torch.log_softmax(scores * args.crf_alpha, dim=0)).argmax(0)
    if (crf_h, crf_w) != size:
        labels = torch.nn.functional.interpolate(labels[None, None].float(), size=size, mode="nearest")[0, 0].long()
    return labels


def main(args):
    """Segments every input; returns the list of skipped files."""
    run = cli.prepare(args, splits=())
    backbone, device = run.backbone, run.device
    args = run.cfg
    if not 0.0 <= args.overlap < 1.0:
        raise InvalidInputError(f"--overlap must be in [0, 1), got {args.overlap}")
    if args.n_classes >= NONE:
        raise InvalidInputError(f"{args.n_classes} classes do not fit the uint8 maps (255 = none)")
    files = list_images(args.inputs)
    stems = output_stems(files)
    targets = check_output(args, files, stems)
    segment, cluster = load_trained(args, run.store, backbone.embed_dim, device)
    if args.metrics:
        assignment, names = load_matching(args.metrics, "cluster_crf" if args.crf else "cluster")
        names = names or [f"class {c}" for c in range(args.n_classes)]
        title = "matched classes"
    else:
        assignment, names = None, [f"cluster {c}" for c in range(args.n_classes)]
        title = "clusters (pass --metrics to name them)"
    cmap = dataset_colormap(args.dataset, args.n_classes)
    skipped = []
    with torch.no_grad():
        for path, (ids_path, color_path, overlay_path) in tqdm(
            list(zip(files, targets)), desc="[predict]", dynamic_ncols=True, unit="image"
        ):
            try:
                image = open_rgb(path)
            except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as err:
                tqdm.write(f"warning: skipped {path}: {one_line(err) or type(err).__name__}", file=sys.stderr)
                skipped.append(path)
                continue
            pred = predict_image(image, args, backbone, segment, cluster, device)
            if assignment is not None:
                pred = assignment[pred]
            ids = pred.numpy().astype(np.uint8)
            colored = colorize(ids, cmap)
            save_png(ids_path, ids)
            save_png(color_path, colored)
            save_png(overlay_path, overlay(np.asarray(image), colored), compress_level=1)  # a photo: zlib gains little
    save_legend(os.path.join(args.output, LEGEND), names, cmap, title=title)
    written = len(files) - len(skipped)
    print(
        f"{written} of {len(files)} images segmented into {args.output}"
        + (f"; {len(skipped)} unreadable file(s) skipped" if skipped else "")
    )
    return skipped


def cli_main(args):
    if main(args):
        sys.exit(EXIT_SKIPPED_INPUTS)


if __name__ == "__main__":
    cli.run(cli_main, parser(), single_process=True, lock=False)
