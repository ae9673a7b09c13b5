"""Pre-compute the training crops of a benchmark dataset (five / double / super crops, as the CAUSE reference).

    python crop_dataset.py --dataset cocostuff27 --data_dir /data

Every training image gives the crops of size ``(int(H * r), int(W * r))`` for each ratio ``r`` of the crop type
(SPEC §8) at the five positions of torchvision's ``five_crop``, plus the same five on the horizontally flipped image for
the ten-crop types (double: 0.5 and 0.8; super: 0.3 to 0.7). Crop ``j`` of image ``i`` is written as
``<i * n_crops + j>.jpg`` and ``.png`` (class id + 1, 0 = ignore) under
``<data_dir>/<dataset folder>/cropped/<name>_<type>_crop_<ratio>/{img,label}/<split>/``. Files are written atomically
and existing ones are skipped, so an interrupted run resumes and any number of workers writes the same files.
"""

import argparse
import os
import signal
import sys
from contextlib import nullcontext
from dataclasses import dataclass
from multiprocessing import Pool

import numpy as np
from tqdm import tqdm

from loader import datasets
from loader.labels import DATA_ERRORS, DatasetError, LabelDecoder, load_sample
from utils.atomic import atomic_save_image

CROP_TYPE_HELP = (
    "five: 5 crops at --crop_ratio; double: ten-crop at 0.5 and 0.8; super: ten-crop at 0.3..0.7 (default: the "
    "dataset's, five for cocostuff27/cityscapes, double for coco81/coco171, super for pascalvoc)"
)


def crop_boxes(height: int, width: int, ratios: tuple[float, ...], ten: bool) -> list[tuple[int, int, int, int, bool]]:
    """(top, left, crop height, crop width, flipped) of every crop, in output order; ``flipped`` boxes are
    positions on the horizontally flipped image."""
    boxes = []
    for ratio in ratios:
        h, w = int(height * ratio), int(width * ratio)
        center = (int(round((height - h) / 2.0)), int(round((width - w) / 2.0)))
        positions = [(0, 0), (0, width - w), (height - h, 0), (height - h, width - w), center]
        for flipped in (False, True) if ten else (False,):
            boxes.extend((top, left, h, w, flipped) for top, left in positions)
    return boxes


def crop_array(array: np.ndarray, box: tuple[int, int, int, int, bool]) -> np.ndarray:
    """array: [H, W, ...] -> the crop [h, w, ...] of ``box`` (see :func:`crop_boxes`)."""
    top, left, h, w, flipped = box
    return np.ascontiguousarray((array[:, ::-1] if flipped else array)[top : top + h, left : left + w])


@dataclass(frozen=True)
class CropWriter:
    """Writes the crops of one source image; picklable, so a process pool can run it."""

    decoder: LabelDecoder
    ratios: tuple[float, ...]
    ten: bool
    image_dir: str
    label_dir: str

    @property
    def crops_per_image(self) -> int:
        return len(self.ratios) * (10 if self.ten else 5)

    def paths(self, i: int) -> tuple[str, str]:
        return os.path.join(self.image_dir, f"{i}.jpg"), os.path.join(self.label_dir, f"{i}.png")

    def __call__(self, job: tuple[int, str, str]) -> int:
        """job: (image index, image path, label path) -> number of crops written."""
        index, image_path, label_path = job
        first = index * self.crops_per_image
        todo = [k for k in range(self.crops_per_image) if not all(map(os.path.exists, self.paths(first + k)))]
        if not todo:
            return 0
        image, label = load_sample(image_path, label_path, self.decoder)
        pixels, stored = np.asarray(image), (label + 1).astype(np.uint8)
        boxes = crop_boxes(image.height, image.width, self.ratios, self.ten)
        if min(min(box[2:4]) for box in boxes) < 1:
            size = f"{image.width}x{image.height}"
            raise DatasetError(f"image {image_path} ({size}) is too small to crop at ratio {min(self.ratios)}")
        for k in todo:
            image_file, label_file = self.paths(first + k)
            atomic_save_image(crop_array(pixels, boxes[k]), image_file, "JPEG")
            atomic_save_image(crop_array(stored, boxes[k]), label_file, "PNG")
        return len(todo)


def ignore_sigint():
    """Pool initializer: Ctrl-C reaches the whole process group; only the parent reports it."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)


def crop_dataset(dataset, data_dir, crop_type=None, crop_ratio=0.5, split="train", num_workers=0, progress=True):
    """Writes the crop set; -> (its directory, crops written now, crops in total)."""
    info = datasets.dataset_info(dataset)
    if dataset not in datasets.BENCHMARKS:
        raise DatasetError(f"only the benchmarks ({', '.join(datasets.BENCHMARKS)}) have training crops, not {dataset}")
    crop_type = crop_type or info.crop_type
    if crop_type != "five" and crop_ratio != 0.5:
        raise DatasetError(f"--crop_ratio only applies to --crop_type five; {crop_type} crops at fixed ratios")
    ratios = datasets.crop_ratios(crop_type, crop_ratio)
    if not all(0 < r <= 1 for r in ratios):
        raise DatasetError(f"crop ratio must be in (0, 1], got {crop_ratio}")
    source = datasets.source_dataset(dataset, data_dir, split)
    crop_root = datasets.cropped_dir(dataset, data_dir, crop_type, crop_ratio)
    folders = [os.path.join(crop_root, kind, split) for kind in ("img", "label")]
    writer = CropWriter(source.decoder, ratios, crop_type != "five", *folders)
    for folder in folders:
        os.makedirs(folder, exist_ok=True)
    marker = datasets.incomplete_marker(crop_root, split)
    with open(marker, "w") as f:
        f.write("crop_dataset.py is writing this split, or was interrupted; rerun it to finish\n")
    jobs = [(i, image, label) for i, (image, label) in enumerate(source.samples)]
    written = 0
    bar = tqdm(total=len(jobs), desc=f"{dataset} {crop_type} crops", unit="img", disable=not progress)
    with Pool(num_workers, initializer=ignore_sigint) if num_workers > 0 else nullcontext() as pool:
        for count in pool.imap_unordered(writer, jobs, chunksize=4) if pool else map(writer, jobs):
            written += count
            bar.update()
    bar.close()  # not on an error: its one line stays the last one
    os.remove(marker)
    return crop_root, written, len(jobs) * writer.crops_per_image


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add, workers = parser.add_argument, min(4, os.cpu_count() or 1)
    add("--dataset", required=True, choices=datasets.BENCHMARKS, help="benchmark to crop")
    add("--data_dir", required=True, help="dataset root: cocostuff/, cityscapes/ or pascalvoc/ (see README, Datasets)")
    add("--crop_type", default=None, choices=datasets.CROP_TYPES, help=CROP_TYPE_HELP)
    add("--crop_ratio", default=0.5, type=float, help="crop size / image size, per side (five only; default 0.5)")
    add("--split", default="train", help="split to crop (default train, what training reads)")
    add("--num_workers", default=workers, type=int, help="worker processes (0: crop in-process); default min(4, CPUs)")
    return parser


def parse_args(argv=None):
    return build_parser().parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    try:
        crop_root, written, total = crop_dataset(
            args.dataset, args.data_dir, args.crop_type, args.crop_ratio, args.split, args.num_workers
        )
    except (*DATA_ERRORS, OSError) as err:
        print(f"crop_dataset.py: error: {err}", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt:
        message = "interrupted; the crops written so far are complete, rerun the same command to finish"
        print(f"crop_dataset.py: {message}", file=sys.stderr)
        sys.exit(130)
    print(f"{total} crops in {crop_root} ({written} written now, {total - written} already there)")


if __name__ == "__main__":
    main()
