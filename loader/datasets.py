"""Datasets: the STEGO-layout benchmarks, their pre-computed training crops, user folders, toy.

One registry serves every script::

    dataset = build_dataset("cocostuff27", "/data", "val", 320)
    dataset[0] == {"ind": 0, "img": float32[3, 320, 320] (normalised), "label": int64[320, 320]}

Labels are class ids ``0 <= c < n_classes`` with ``-1`` = ignore. For the benchmarks,
``split="train"`` reads the crops written by ``crop_dataset.py`` (the reference trains on
them); ``crops=False`` reads the original training images instead. Every problem with the
data on disk raises :class:`DatasetError` or :class:`DatasetNotFoundError` with a one-line
message naming the path and what was expected, so scripts can print it and exit.
"""

import hashlib
import os
import warnings
from dataclasses import dataclass

import numpy as np
from PIL import Image
from torch.utils.data import Dataset

from loader.labels import (
    LABEL_TABLES,
    DatasetError,
    DatasetNotFoundError,
    LabelDecoder,
    cityscapes_decoder,
    class_id_decoder,
    coco_decoder,
    cropped_decoder,
    load_sample,
)
from loader.toy import TOY_CLASS_NAMES, ensure_toy
from loader.transforms import IMAGENET_MEAN, IMAGENET_STD, SegmentationTransform

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".webp")


@dataclass(frozen=True)
class DatasetInfo:
    """What the scripts need to know about a dataset, in one place.

    ``crop_ratios`` are the crop sizes (fractions of the image height and width) of one
    crop set; ``crop_dir`` is where ``crop_dataset.py`` writes it and training reads it,
    relative to ``--data_dir`` (the directory names of the reference implementation).
    ``resize`` is the evaluation geometry of :mod:`loader.transforms`.
    """

    name: str
    n_classes: int | None
    class_names: tuple[str, ...]
    resize: str
    layout: str
    crop_type: str | None = None
    crop_ratios: tuple[float, ...] = ()
    crop_dir: str | None = None


CROP_TYPES = ("five", "double", "super")

_COCO_LAYOUT = (
    "<data_dir>/cocostuff/images/{train2017,val2017}/<id>.jpg, "
    "<data_dir>/cocostuff/annotations/{train2017,val2017}/<id>.png and "
    "<data_dir>/cocostuff/curated/{train2017,val2017}/Coco164kFull_Stuff_Coarse*.txt"
)
_CITYSCAPES_LAYOUT = (
    "<data_dir>/cityscapes/leftImg8bit/<split>/<city>/<name>_leftImg8bit.png and "
    "<data_dir>/cityscapes/gtFine/<split>/<city>/<name>_gtFine_labelIds.png"
)
_VOC_LAYOUT = (
    "<data_dir>/pascalvoc/VOCdevkit/VOC2012/{JPEGImages/<id>.jpg, SegmentationClass/<id>.png, "
    "ImageSets/Segmentation/{train,val}.txt}"
)
_TOY_LAYOUT = "<data_dir>/toy/{train,val}/{images,labels}/<name>.png (generated on first use)"
_FOLDER_LAYOUT = (
    "image_dir/<name>.{jpg,jpeg,png,bmp,webp} and optionally label_dir/<name>.png holding class ids (255 = ignore)"
)


def crop_ratios(crop_type: str, crop_ratio: float = 0.5) -> tuple[float, ...]:
    """The crop sizes of a crop type as the reference defines them (``crop_ratio``: ``five`` only)."""
    if crop_type == "five":
        return (float(crop_ratio),)
    if crop_type == "double":
        return (0.5, 0.8)
    if crop_type == "super":
        return (0.3, 0.4, 0.5, 0.6, 0.7)
    raise DatasetError(f"unknown crop type {crop_type!r}; expected one of {', '.join(CROP_TYPES)}")


# (folder under --data_dir, name prefix) of each benchmark's crop sets, as the reference reads them
_CROP_NAMING = {
    "cocostuff27": ("cocostuff", "cocostuff"),
    "coco81": ("cocostuff", "coco81"),
    "coco171": ("cocostuff", "coco171"),
    "cityscapes": ("cityscapes", "cityscapes"),
    "pascalvoc": ("pascalvoc", "pascalvoc"),
}


def _crop_dir(name: str, crop_type: str, crop_ratio: float = 0.5) -> str:
    crop_ratios(crop_type, crop_ratio)
    data_subdir, prefix = _CROP_NAMING[name]
    # The reference names the multi-ratio sets with ratio 0: "coco81_double_crop_0".
    ratio = str(float(crop_ratio)) if crop_type == "five" else "0"
    return os.path.join(data_subdir, "cropped", f"{prefix}_{crop_type}_crop_{ratio}")


def _benchmark(name, class_names, resize, layout, crop_type):
    return DatasetInfo(
        name=name,
        n_classes=len(class_names),
        class_names=tuple(class_names),
        resize=resize,
        layout=layout,
        crop_type=crop_type,
        crop_ratios=crop_ratios(crop_type),
        crop_dir=_crop_dir(name, crop_type),
    )


_CLASS_NAMES = LABEL_TABLES["class_names"]
_REGISTRY = {
    "cocostuff27": _benchmark("cocostuff27", _CLASS_NAMES["cocostuff27"], "center", _COCO_LAYOUT, "five"),
    "coco81": _benchmark("coco81", _CLASS_NAMES["coco81"], "center", _COCO_LAYOUT, "double"),
    "coco171": _benchmark("coco171", _CLASS_NAMES["coco171"], "center", _COCO_LAYOUT, "double"),
    "cityscapes": _benchmark("cityscapes", _CLASS_NAMES["cityscapes"], "center", _CITYSCAPES_LAYOUT, "five"),
    "pascalvoc": _benchmark("pascalvoc", _CLASS_NAMES["pascalvoc"], "square", _VOC_LAYOUT, "super"),
    "toy": DatasetInfo(
        name="toy", n_classes=len(TOY_CLASS_NAMES), class_names=TOY_CLASS_NAMES, resize="center", layout=_TOY_LAYOUT
    ),
    "folder": DatasetInfo(name="folder", n_classes=None, class_names=(), resize="center", layout=_FOLDER_LAYOUT),
}

DATASETS = tuple(_REGISTRY)
BENCHMARKS = ("cocostuff27", "coco81", "coco171", "cityscapes", "pascalvoc")

# Image lists of the reference: COCO-Stuff-27 is evaluated on the STEGO/IIC curated val list
# and trained on the full curated list; COCO-81/171 use the full curated list for both.
_COCO_LISTS = {
    ("cocostuff27", "train"): "Coco164kFull_Stuff_Coarse.txt",
    ("cocostuff27", "val"): "Coco164kFull_Stuff_Coarse_7.txt",
    ("coco81", "train"): "Coco164kFull_Stuff_Coarse.txt",
    ("coco81", "val"): "Coco164kFull_Stuff_Coarse.txt",
    ("coco171", "train"): "Coco164kFull_Stuff_Coarse.txt",
    ("coco171", "val"): "Coco164kFull_Stuff_Coarse.txt",
}


def dataset_info(name: str) -> DatasetInfo:
    """The registry entry of ``name`` (one of :data:`DATASETS`)."""
    if name not in _REGISTRY:
        raise DatasetError(f"unknown dataset {name!r}; expected one of {', '.join(DATASETS)}")
    return _REGISTRY[name]


def cropped_dir(name: str, root: str, crop_type: str | None = None, crop_ratio: float | None = None) -> str:
    """Directory of a benchmark's crop set under ``root`` (the registry's set by default)."""
    info = dataset_info(name)
    if info.crop_dir is None:
        raise DatasetError(f"dataset {name!r} has no pre-computed crops; only {', '.join(BENCHMARKS)} do")
    crop_type = crop_type or info.crop_type
    return os.path.join(root, _crop_dir(name, crop_type, 0.5 if crop_ratio is None else crop_ratio))


def crop_command(
    name: str, root: str, crop_type: str | None = None, crop_ratio: float | None = None, split: str = "train"
) -> str:
    """The ``crop_dataset.py`` command line that writes a crop set."""
    command = f"python crop_dataset.py --dataset {name} --data_dir {root}"
    if crop_type is not None:
        command += f" --crop_type {crop_type}"
    if crop_ratio is not None:
        command += f" --crop_ratio {crop_ratio}"
    if split != "train":
        command += f" --split {split}"
    return command


def incomplete_marker(crop_root: str, split: str) -> str:
    """File that exists while ``crop_dataset.py`` is writing ``split`` of a crop set."""
    return os.path.join(crop_root, f"{split}.incomplete")


def _on_disk(layout: str, root: str) -> str:
    return layout.replace("<data_dir>", root)


def _require_dir(path: str, what: str, layout: str):
    if not os.path.isdir(path):
        raise DatasetNotFoundError(f"{what} not found: {path} is missing; expected {layout}")


def _read_list(path: str, layout: str) -> list[str]:
    if not os.path.isfile(path):
        raise DatasetNotFoundError(f"image list not found: {path}; expected {layout}")
    with open(path) as f:
        return [line.strip() for line in f if line.strip()]


class SegmentationDataset(Dataset):
    """Pairs of (image file, label file or None) read through a label decoder.

    ``load(i)`` gives the full-resolution PIL image and decoded label (used by
    ``crop_dataset.py``); indexing applies ``transform`` and returns the item dict.
    """

    def __init__(
        self,
        name: str,
        samples: list[tuple[str, str | None]],
        decoder: LabelDecoder | None,
        n_classes: int | None,
        class_names: tuple[str, ...],
        transform: SegmentationTransform | None = None,
    ):
        self.name = name
        self.samples = samples
        self.decoder = decoder
        self.n_classes = n_classes
        self.class_names = class_names
        self.transform = transform

    @property
    def image_paths(self) -> list[str]:
        return [image for image, _ in self.samples]

    @property
    def labelled(self) -> bool:
        return any(label is not None for _, label in self.samples)

    def manifest(self) -> dict:
        """The identity of the files by content: a hash of their paths (below their common folder), sizes
        and modification times, and their count."""
        files = [path for pair in self.samples for path in pair if path is not None]
        root, digest = os.path.commonpath(files) if files else "", hashlib.sha256()
        for path in files:
            stat = os.stat(path)
            digest.update(f"{os.path.relpath(path, root)}\0{stat.st_size}\0{stat.st_mtime_ns}\n".encode())
        return {"manifest": digest.hexdigest(), "files": len(files)}

    def __len__(self):
        return len(self.samples)

    def load(self, index: int) -> tuple[Image.Image, np.ndarray | None]:
        """-> (RGB PIL image, int64 [H, W] class ids with -1 = ignore, or None)."""
        image_path, label_path = self.samples[index]
        return load_sample(image_path, label_path, self.decoder)

    def __getitem__(self, index: int) -> dict:
        if self.transform is None:
            raise RuntimeError("this dataset was built without a transform; use load(index)")
        image, label = self.load(index)
        img, label = self.transform(image, label)
        return {"ind": index, "img": img, "label": label}


def _coco_samples(name: str, root: str, split: str) -> list[tuple[str, str]]:
    if split not in ("train", "val"):
        raise DatasetError(f"unknown split {split!r} for {name}; expected train or val")
    base = os.path.join(root, "cocostuff")
    layout = _on_disk(_COCO_LAYOUT, root)
    _require_dir(base, "COCO-Stuff", layout)
    folder = f"{split}2017"
    for sub in ("images", "annotations"):
        _require_dir(os.path.join(base, sub, folder), f"COCO-Stuff {sub}", layout)
    ids = _read_list(os.path.join(base, "curated", folder, _COCO_LISTS[(name, split)]), layout)
    return [
        (os.path.join(base, "images", folder, f"{i}.jpg"), os.path.join(base, "annotations", folder, f"{i}.png"))
        for i in ids
    ]


def _cityscapes_samples(root: str, split: str) -> list[tuple[str, str]]:
    base = os.path.join(root, "cityscapes")
    image_root = os.path.join(base, "leftImg8bit", split)
    label_root = os.path.join(base, "gtFine", split)
    layout = _on_disk(_CITYSCAPES_LAYOUT, root)
    _require_dir(image_root, f"Cityscapes {split} images", layout)
    _require_dir(label_root, f"Cityscapes {split} fine labels", layout)
    samples = []
    # sorted, unlike torchvision's listing order, so crop indices do not depend on the file system
    for city in sorted(os.listdir(image_root)):
        city_dir = os.path.join(image_root, city)
        if not os.path.isdir(city_dir):
            continue
        for file in sorted(os.listdir(city_dir)):
            if not file.endswith("_leftImg8bit.png"):
                continue
            stem = file[: -len("_leftImg8bit.png")]
            samples.append(
                (os.path.join(city_dir, file), os.path.join(label_root, city, f"{stem}_gtFine_labelIds.png"))
            )
    if not samples:
        raise DatasetNotFoundError(f"no Cityscapes images in {image_root}; expected {layout}")
    return samples


def _voc_samples(root: str, split: str) -> list[tuple[str, str]]:
    base = os.path.join(root, "pascalvoc", "VOCdevkit", "VOC2012")
    layout = _on_disk(_VOC_LAYOUT, root)
    _require_dir(base, "Pascal VOC 2012", layout)
    for sub in ("JPEGImages", "SegmentationClass"):
        _require_dir(os.path.join(base, sub), f"Pascal VOC {sub}", layout)
    ids = _read_list(os.path.join(base, "ImageSets", "Segmentation", f"{split}.txt"), layout)
    return [
        (os.path.join(base, "JPEGImages", f"{i}.jpg"), os.path.join(base, "SegmentationClass", f"{i}.png")) for i in ids
    ]


def _numbered_files(directory: str, extension: str) -> set[int]:
    names = set()
    for file in os.listdir(directory):
        stem, ext = os.path.splitext(file)
        if ext == extension and stem.isdigit():
            names.add(int(stem))
    return names


def _cropped_samples(
    name: str, root: str, split: str, crop_type: str | None, crop_ratio: float | None
) -> list[tuple[str, str]]:
    crop_root = cropped_dir(name, root, crop_type, crop_ratio)
    command = crop_command(name, root, crop_type, crop_ratio, split)
    image_dir = os.path.join(crop_root, "img", split)
    label_dir = os.path.join(crop_root, "label", split)
    if not (os.path.isdir(image_dir) and os.path.isdir(label_dir)):
        raise DatasetNotFoundError(
            f"training crops of {name} not found in {crop_root}/{{img,label}}/{split}; run first: {command}"
        )
    if os.path.exists(incomplete_marker(crop_root, split)):
        raise DatasetError(
            f"the crops in {crop_root} were interrupted while being written; finish them (it resumes): {command}"
        )
    images = _numbered_files(image_dir, ".jpg")
    labels = _numbered_files(label_dir, ".png")
    count = len(images)
    expected = set(range(count))
    if count == 0 or images != expected or labels != expected:
        missing = sorted((expected - images) | (expected - labels) | (labels - expected))[:3]
        raise DatasetError(
            f"the crops in {crop_root} are incomplete ({len(images)} images, {len(labels)} labels"
            f"{', e.g. index ' + str(missing[0]) if missing else ''}); finish them: {command}"
        )
    return [(os.path.join(image_dir, f"{i}.jpg"), os.path.join(label_dir, f"{i}.png")) for i in range(count)]


def broken_links(directory: str, names: list[str]) -> list[str]:
    """The entries of ``names`` that are symbolic links to nothing (dangling, or a loop)."""
    return [
        n
        for n in names
        if os.path.islink(os.path.join(directory, n)) and not os.path.exists(os.path.join(directory, n))
    ]


def folder_samples(image_dir: str, label_dir: str | None = None) -> list[tuple[str, str | None]]:
    """Images of a directory (sorted by name) paired with ``label_dir/<stem>.png`` if given.

    Broken links among the images are left out with a warning that counts and names them.
    """
    _require_dir(image_dir, "image folder", _FOLDER_LAYOUT)
    names = sorted(f for f in os.listdir(image_dir) if f.lower().endswith(IMAGE_EXTENSIONS))
    broken = broken_links(image_dir, names)
    if broken:
        warnings.warn(f"{len(broken)} broken link(s) in {image_dir} left out, e.g. {broken[0]} (dangling or a loop)")
    files = [f for f in names if os.path.isfile(os.path.join(image_dir, f))]
    if not files:
        raise DatasetNotFoundError(f"no images ({', '.join(IMAGE_EXTENSIONS)}) in {image_dir}")
    if label_dir is None:
        return [(os.path.join(image_dir, f), None) for f in files]
    _require_dir(label_dir, "label folder", _FOLDER_LAYOUT)
    samples = []
    for file in files:
        label = os.path.join(label_dir, os.path.splitext(file)[0] + ".png")
        if not os.path.isfile(label):
            raise DatasetNotFoundError(f"label file not found: {label} (the label of {os.path.join(image_dir, file)})")
        samples.append((os.path.join(image_dir, file), label))
    return samples


def _source_samples(name: str, root: str, split: str) -> tuple[list, LabelDecoder]:
    if name in ("cocostuff27", "coco81", "coco171"):
        return _coco_samples(name, root, split), coco_decoder(name)
    if name == "cityscapes":
        return _cityscapes_samples(root, split), cityscapes_decoder()
    if name == "pascalvoc":
        return _voc_samples(root, split), class_id_decoder(21)
    raise DatasetError(f"dataset {name!r} is not a benchmark; expected one of {', '.join(BENCHMARKS)}")


def _check_root(root):
    if root is None or not os.path.isdir(root):
        raise DatasetNotFoundError(f"data directory not found: {root}")


def source_dataset(name: str, root: str, split: str) -> SegmentationDataset:
    """A benchmark's original images of ``split`` at full resolution, for ``load(i)``."""
    _check_root(root)
    info = dataset_info(name)
    samples, decoder = _source_samples(name, root, split)
    return SegmentationDataset(name, samples, decoder, info.n_classes, info.class_names)


def build_dataset(
    name: str,
    root: str | None,
    split: str,
    resolution: int,
    mean=IMAGENET_MEAN,
    std=IMAGENET_STD,
    n_classes: int | None = None,
    *,
    image_dir: str | None = None,
    label_dir: str | None = None,
    crops: bool | None = None,
    crop_type: str | None = None,
    crop_ratio: float | None = None,
) -> SegmentationDataset:
    """The dataset ``name`` (see :data:`DATASETS`) whose items are
    ``{"ind": int, "img": float32[3, res, res], "label": int64[res, res]}``.

    root: the ``--data_dir`` holding the STEGO layout (see :class:`DatasetInfo`.layout).
    split: "train" or "val" ("test" too for Cityscapes); for a benchmark, "train" reads the
        crop set chosen by ``crop_type`` / ``crop_ratio`` (registry default) unless
        ``crops=False``.
    mean, std: the backbone's input normalisation.
    n_classes: required by ``folder`` with labels; must match the registry otherwise.
    image_dir, label_dir: the ``folder`` dataset's images and optional label PNGs (``root``
        is the image folder if ``image_dir`` is None); unlabelled items are all -1.
    """
    info = dataset_info(name)
    if info.n_classes is not None and n_classes is not None and n_classes != info.n_classes:
        raise DatasetError(f"dataset {name} has {info.n_classes} classes, not {n_classes}")
    transform = SegmentationTransform(resolution, info.resize, mean, std)
    if name == "folder":
        samples = folder_samples(image_dir if image_dir is not None else root, label_dir)
        if label_dir is not None and n_classes is None:
            raise DatasetError("a folder dataset with labels needs n_classes (--n_classes)")
        decoder = class_id_decoder(n_classes) if label_dir is not None else None
        names = tuple(f"class {i}" for i in range(n_classes)) if n_classes else ()
        return SegmentationDataset(name, samples, decoder, n_classes, names, transform)
    _check_root(root)
    if name == "toy":
        if split not in ("train", "val"):
            raise DatasetError(f"unknown split {split!r} for toy; expected train or val")
        toy_root = ensure_toy(root)
        samples = folder_samples(os.path.join(toy_root, split, "images"), os.path.join(toy_root, split, "labels"))
        return SegmentationDataset(
            name, samples, class_id_decoder(info.n_classes), info.n_classes, info.class_names, transform
        )
    use_crops = (split == "train") if crops is None else crops
    if use_crops:
        samples = _cropped_samples(name, root, split, crop_type, crop_ratio)
        decoder = cropped_decoder(info.n_classes)
    else:
        samples, decoder = _source_samples(name, root, split)
    return SegmentationDataset(name, samples, decoder, info.n_classes, info.class_names, transform)
