"""Datasets: the STEGO-layout benchmarks, their pre-computed training crops, user folders, toy.

One registry serves every script::

    dataset = build_dataset("cocostuff27", "/data", "val", 320)
    dataset[0] == {"ind": 0, "img": float32[3, 320, 320] (normalised), "label": int64[320, 320]}

Labels are class ids ``0 <= c < n_classes`` with ``-1`` = ignore. A benchmark's ``split="train"`` reads the crops
of ``crop_dataset.py`` (the reference trains on them), with ``crops=False`` the original images. Problems with the
data on disk raise :class:`DatasetError` or :class:`DatasetNotFoundError` with a one-line message naming the path.
"""

import hashlib
import os
from dataclasses import dataclass

import numpy as np
from PIL import Image
from torch.utils.data import Dataset

from loader.images import warn_broken_links
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
from loader.transforms import SegmentationTransform
from models.normalisation import IMAGENET_MEAN, IMAGENET_STD

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".webp")


@dataclass(frozen=True)
class DatasetInfo:
    """What the scripts need to know about a dataset: ``crop_ratios`` are the crop sizes (fractions of the image
    height and width) of its crop set in ``crop_dir`` (under ``--data_dir``, named as by the reference); ``resize``
    is the evaluation geometry of :mod:`loader.transforms`."""

    name: str
    n_classes: int | None
    class_names: tuple[str, ...]
    resize: str
    layout: str
    crop_type: str | None = None
    crop_ratios: tuple[float, ...] = ()
    crop_dir: str | None = None


_CROP_RATIOS = {"double": (0.5, 0.8), "super": (0.3, 0.4, 0.5, 0.6, 0.7)}  # "five": --crop_ratio
CROP_TYPES = ("five", *_CROP_RATIOS)

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
_FOLDER_LAYOUT = "image_dir/<name>.{jpg,jpeg,png,bmp,webp}, optionally label_dir/<name>.png of class ids (255 = ignore)"

# name: (evaluation resize, layout, registry crop type, folder under --data_dir, crop-set name prefix); the
# folder and prefix of the crop sets are the reference's
_BENCHMARKS = {
    "cocostuff27": ("center", _COCO_LAYOUT, "five", "cocostuff", "cocostuff"),
    "coco81": ("center", _COCO_LAYOUT, "double", "cocostuff", "coco81"),
    "coco171": ("center", _COCO_LAYOUT, "double", "cocostuff", "coco171"),
    "cityscapes": ("center", _CITYSCAPES_LAYOUT, "five", "cityscapes", "cityscapes"),
    "pascalvoc": ("square", _VOC_LAYOUT, "super", "pascalvoc", "pascalvoc"),
}
BENCHMARKS = tuple(_BENCHMARKS)


def crop_ratios(crop_type: str, crop_ratio: float = 0.5) -> tuple[float, ...]:
    """The crop sizes of a crop type as the reference defines them (``crop_ratio``: ``five`` only)."""
    if crop_type not in CROP_TYPES:
        raise DatasetError(f"unknown crop type {crop_type!r}; expected one of {', '.join(CROP_TYPES)}")
    return (float(crop_ratio),) if crop_type == "five" else _CROP_RATIOS[crop_type]


def _crop_dir(name: str, crop_type: str, crop_ratio: float = 0.5) -> str:
    crop_ratios(crop_type, crop_ratio)
    data_subdir, prefix = _BENCHMARKS[name][3:]
    # The reference names the multi-ratio sets with ratio 0: "coco81_double_crop_0".
    ratio = str(float(crop_ratio)) if crop_type == "five" else "0"
    return os.path.join(data_subdir, "cropped", f"{prefix}_{crop_type}_crop_{ratio}")


def _benchmark(name: str, resize: str, layout: str, crop: str) -> DatasetInfo:
    names = tuple(LABEL_TABLES["class_names"][name])
    return DatasetInfo(name, len(names), names, resize, layout, crop, crop_ratios(crop), _crop_dir(name, crop))


_REGISTRY = {name: _benchmark(name, *row[:3]) for name, row in _BENCHMARKS.items()}
_REGISTRY["toy"] = DatasetInfo("toy", len(TOY_CLASS_NAMES), TOY_CLASS_NAMES, "center", _TOY_LAYOUT)
_REGISTRY["folder"] = DatasetInfo("folder", None, (), "center", _FOLDER_LAYOUT)
DATASETS = tuple(_REGISTRY)


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
    return os.path.join(root, _crop_dir(name, crop_type or info.crop_type, 0.5 if crop_ratio is None else crop_ratio))


def crop_command(name: str, root: str, crop_type: str | None = None, crop_ratio=None, split: str = "train") -> str:
    """The ``crop_dataset.py`` command line that writes a crop set."""
    flags = {"crop_type": crop_type, "crop_ratio": crop_ratio, "split": None if split == "train" else split}
    given = "".join(f" --{flag} {value}" for flag, value in flags.items() if value is not None)
    return f"python crop_dataset.py --dataset {name} --data_dir {root}{given}"


def incomplete_marker(crop_root: str, split: str) -> str:
    """File that exists while ``crop_dataset.py`` is writing ``split`` of a crop set."""
    return os.path.join(crop_root, f"{split}.incomplete")


def _require_dir(path: str, what: str, layout: str):
    if not os.path.isdir(path):
        raise DatasetNotFoundError(f"{what} not found: {path} is missing; expected {layout}")


@dataclass(eq=False, repr=False)
class SegmentationDataset(Dataset):
    """Pairs of (image file, label file or None) read through a label decoder: ``load(i)`` gives the full-resolution
    PIL image and decoded label (``crop_dataset.py``); indexing applies ``transform`` and returns the item dict."""

    name: str
    samples: list[tuple[str, str | None]]
    decoder: LabelDecoder | None
    n_classes: int | None
    class_names: tuple[str, ...]
    transform: SegmentationTransform | None = None

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
        return load_sample(*self.samples[index], self.decoder)

    def __getitem__(self, index: int) -> dict:
        if self.transform is None:
            raise RuntimeError("this dataset was built without a transform; use load(index)")
        img, label = self.transform(*self.load(index))
        return {"ind": index, "img": img, "label": label}


def _listed_samples(base, what, layout, folders, list_file):
    """(images/<id>.jpg, labels/<id>.png) of the ids in ``base/list_file``; ``folders``: {what: path below base}."""
    _require_dir(base, what, layout)
    for folder, path in folders.items():
        _require_dir(os.path.join(base, path), folder, layout)
    list_path = os.path.join(base, list_file)
    if not os.path.isfile(list_path):
        raise DatasetNotFoundError(f"image list not found: {list_path}; expected {layout}")
    with open(list_path) as f:
        ids = [line.strip() for line in f if line.strip()]
    images, labels = (os.path.join(base, path) for path in folders.values())
    return [(os.path.join(images, f"{i}.jpg"), os.path.join(labels, f"{i}.png")) for i in ids]


def _coco_samples(name: str, root: str, split: str) -> list[tuple[str, str]]:
    if split not in ("train", "val"):
        raise DatasetError(f"unknown split {split!r} for {name}; expected train or val")
    base, folder, layout = os.path.join(root, "cocostuff"), f"{split}2017", _COCO_LAYOUT.replace("<data_dir>", root)
    # The reference evaluates COCO-Stuff-27 on the STEGO/IIC curated val list (_7) and trains it on the full
    # curated list; COCO-81/171 use the full list for both.
    curated = "Coco164kFull_Stuff_Coarse" + ("_7" if (name, split) == ("cocostuff27", "val") else "") + ".txt"
    folders = {f"COCO-Stuff {sub}": os.path.join(sub, folder) for sub in ("images", "annotations")}
    return _listed_samples(base, "COCO-Stuff", layout, folders, os.path.join("curated", folder, curated))


def _cityscapes_samples(root: str, split: str) -> list[tuple[str, str]]:
    base, layout = os.path.join(root, "cityscapes"), _CITYSCAPES_LAYOUT.replace("<data_dir>", root)
    image_root, label_root = os.path.join(base, "leftImg8bit", split), os.path.join(base, "gtFine", split)
    _require_dir(image_root, f"Cityscapes {split} images", layout)
    _require_dir(label_root, f"Cityscapes {split} fine labels", layout)
    samples, tail = [], "_leftImg8bit.png"
    # sorted, unlike torchvision's listing order, so crop indices do not depend on the file system
    for city in sorted(os.listdir(image_root)):
        images, labels = os.path.join(image_root, city), os.path.join(label_root, city)
        files = sorted(os.listdir(images)) if os.path.isdir(images) else []
        stems = [f[: -len(tail)] for f in files if f.endswith(tail)]
        samples += [(os.path.join(images, s + tail), os.path.join(labels, f"{s}_gtFine_labelIds.png")) for s in stems]
    if not samples:
        raise DatasetNotFoundError(f"no Cityscapes images in {image_root}; expected {layout}")
    return samples


def _voc_samples(root: str, split: str) -> list[tuple[str, str]]:
    base, layout = os.path.join(root, "pascalvoc", "VOCdevkit", "VOC2012"), _VOC_LAYOUT.replace("<data_dir>", root)
    folders = {f"Pascal VOC {sub}": sub for sub in ("JPEGImages", "SegmentationClass")}
    return _listed_samples(
        base, "Pascal VOC 2012", layout, folders, os.path.join("ImageSets", "Segmentation", f"{split}.txt")
    )


def _numbered_files(directory: str, extension: str) -> set[int]:
    stems = [os.path.splitext(file) for file in os.listdir(directory)]
    return {int(stem) for stem, ext in stems if ext == extension and stem.isdigit()}


def _cropped_samples(name: str, root: str, split: str, crop_type: str | None, crop_ratio) -> list[tuple[str, str]]:
    crop_root = cropped_dir(name, root, crop_type, crop_ratio)
    command = crop_command(name, root, crop_type, crop_ratio, split)
    image_dir, label_dir = os.path.join(crop_root, "img", split), os.path.join(crop_root, "label", split)
    if not (os.path.isdir(image_dir) and os.path.isdir(label_dir)):
        where = f"{crop_root}/{{img,label}}/{split}"
        raise DatasetNotFoundError(f"training crops of {name} not found in {where}; run first: {command}")
    if os.path.exists(incomplete_marker(crop_root, split)):
        problem = f"the crops in {crop_root} were interrupted while being written"
        raise DatasetError(f"{problem}; finish them (it resumes): {command}")
    images, labels = _numbered_files(image_dir, ".jpg"), _numbered_files(label_dir, ".png")
    expected = set(range(len(images)))
    if not images or images != expected or labels != expected:
        odd = (expected - images) | (expected - labels) | (labels - expected)
        found = f"{len(images)} images, {len(labels)} labels" + (f", e.g. index {min(odd)}" if odd else "")
        raise DatasetError(f"the crops in {crop_root} are incomplete ({found}); finish them: {command}")
    return [(os.path.join(image_dir, f"{i}.jpg"), os.path.join(label_dir, f"{i}.png")) for i in range(len(images))]


def folder_samples(image_dir: str, label_dir: str | None = None) -> list[tuple[str, str | None]]:
    """Images of a directory (sorted by name) paired with ``label_dir/<stem>.png`` if given; broken links are
    left out with a warning that names them."""
    _require_dir(image_dir, "image folder", _FOLDER_LAYOUT)
    names = sorted(f for f in os.listdir(image_dir) if f.lower().endswith(IMAGE_EXTENSIONS))
    warn_broken_links([os.path.join(image_dir, f) for f in names], f"in {image_dir}")
    files = [f for f in names if os.path.isfile(os.path.join(image_dir, f))]
    if not files:
        raise DatasetNotFoundError(f"no images ({', '.join(IMAGE_EXTENSIONS)}) in {image_dir}")
    if label_dir is None:
        return [(os.path.join(image_dir, f), None) for f in files]
    _require_dir(label_dir, "label folder", _FOLDER_LAYOUT)
    samples = [(os.path.join(image_dir, f), os.path.join(label_dir, os.path.splitext(f)[0] + ".png")) for f in files]
    for image, label in samples:
        if not os.path.isfile(label):
            raise DatasetNotFoundError(f"label file not found: {label} (the label of {image})")
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
    return SegmentationDataset(name, *_source_samples(name, root, split), info.n_classes, info.class_names)


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
    """The dataset ``name`` (one of :data:`DATASETS`): items ``{"ind": int, "img": float32[3, res, res],
    "label": int64[res, res]}``.

    root: the ``--data_dir`` (layout: :class:`DatasetInfo`.layout). split: "train" or "val" ("test" too for
    Cityscapes); a benchmark's "train" reads the crop set of ``crop_type`` / ``crop_ratio`` (registry default)
    unless ``crops=False``. mean, std: the backbone's normalisation. n_classes: required by ``folder`` with
    labels, else must match the registry. image_dir, label_dir: the ``folder`` images (``root`` if None) and
    optional label PNGs (unlabelled items are all -1).
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
        toy_split = os.path.join(ensure_toy(root), split)
        samples = folder_samples(os.path.join(toy_split, "images"), os.path.join(toy_split, "labels"))
        decoder = class_id_decoder(info.n_classes)
    elif (split == "train") if crops is None else crops:
        samples = _cropped_samples(name, root, split, crop_type, crop_ratio)
        decoder = cropped_decoder(info.n_classes)
    else:
        samples, decoder = _source_samples(name, root, split)
    return SegmentationDataset(name, samples, decoder, info.n_classes, info.class_names, transform)
