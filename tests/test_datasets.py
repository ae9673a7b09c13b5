import os

import numpy as np
import pytest
import torch
from PIL import Image
from torchvision import transforms as T
from torchvision.transforms import InterpolationMode

import loader.datasets as datasets
from loader.datasets import BENCHMARKS, DATASETS, build_dataset, cropped_dir, dataset_info, incomplete_marker
from loader.labels import DatasetError, DatasetNotFoundError
from loader.toy import ensure_toy

COCO_VAL_IDS = ["000000000139", "000000000285", "000000000632"]
COCO_TRAIN_IDS = ["000000000009", "000000000025"]
CITY_VAL = [
    ("frankfurt", "frankfurt_000000_000294"),
    ("frankfurt", "frankfurt_000000_000576"),
    ("lindau", "lindau_000000_000019"),
]
VOC_VAL_IDS = ["2007_000033", "2007_000042"]


def _rgb(height, width, seed):
    return np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8)


def _write(array, path, **kw):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    Image.fromarray(array).save(path, **kw)


def _stripes(values, height, width):
    """A label whose columns cycle through ``values``: uint8 [height, width]."""
    return np.asarray(values, dtype=np.uint8)[np.arange(width) % len(values)][None].repeat(height, 0)


def make_coco(root, values=(0, 255, 156, 91, 148, 11)):
    base = os.path.join(root, "cocostuff")
    for split, ids in (("val2017", COCO_VAL_IDS), ("train2017", COCO_TRAIN_IDS)):
        for n, image_id in enumerate(ids):
            _write(_rgb(48, 64, n), os.path.join(base, "images", split, f"{image_id}.jpg"))
            _write(_stripes(values, 48, 64), os.path.join(base, "annotations", split, f"{image_id}.png"))
        os.makedirs(os.path.join(base, "curated", split), exist_ok=True)
        with open(os.path.join(base, "curated", split, "Coco164kFull_Stuff_Coarse.txt"), "w") as f:
            f.write("\n".join(ids) + "\n")
    with open(os.path.join(base, "curated", "val2017", "Coco164kFull_Stuff_Coarse_7.txt"), "w") as f:
        f.write("\n".join(COCO_VAL_IDS[:2]) + "\n")
    return base


def make_cityscapes(root, values=(7, 6, 33, 0, 26, 255)):
    base = os.path.join(root, "cityscapes")
    for n, (city, stem) in enumerate(CITY_VAL):
        _write(_rgb(40, 80, n), os.path.join(base, "leftImg8bit", "val", city, f"{stem}_leftImg8bit.png"))
        _write(_stripes(values, 40, 80), os.path.join(base, "gtFine", "val", city, f"{stem}_gtFine_labelIds.png"))
        _write(_stripes((1,), 40, 80), os.path.join(base, "gtFine", "val", city, f"{stem}_gtFine_instanceIds.png"))
    return base


def make_voc(root, split="val", ids=VOC_VAL_IDS, values=(0, 15, 255, 20)):
    base = os.path.join(root, "pascalvoc", "VOCdevkit", "VOC2012")
    for n, image_id in enumerate(ids):
        _write(_rgb(30, 44, n), os.path.join(base, "JPEGImages", f"{image_id}.jpg"))
        label = Image.fromarray(_stripes(values, 30, 44), mode="L").convert("P")
        os.makedirs(os.path.join(base, "SegmentationClass"), exist_ok=True)
        label.save(os.path.join(base, "SegmentationClass", f"{image_id}.png"))
    os.makedirs(os.path.join(base, "ImageSets", "Segmentation"), exist_ok=True)
    with open(os.path.join(base, "ImageSets", "Segmentation", f"{split}.txt"), "w") as f:
        f.write("\n".join(ids) + "\n")
    return base


def _reference_label(path, res, table, square=False):
    """The reference's label pipeline written out: resize the raw PIL label, then map."""
    steps = [T.Resize((res, res) if square else res, interpolation=InterpolationMode.NEAREST)]
    if not square:
        steps.append(T.CenterCrop(res))
    raw = np.array(T.Compose(steps)(Image.open(path)))
    return torch.from_numpy(np.vectorize(table.__getitem__)(raw).astype(np.int64))


def test_registry():
    assert set(BENCHMARKS) <= set(DATASETS) and {"toy", "folder"} <= set(DATASETS)
    expected = {"cocostuff27": 27, "coco81": 81, "coco171": 171, "cityscapes": 27, "pascalvoc": 21, "toy": 6}
    for name, n in expected.items():
        info = dataset_info(name)
        assert info.n_classes == n and len(info.class_names) == n and len(set(info.class_names)) == n
    assert dataset_info("cocostuff27").class_names[9] == "person"
    assert dataset_info("cocostuff27").class_names[23] == "sky"
    assert dataset_info("cityscapes").class_names[0] == "road"
    assert dataset_info("cityscapes").class_names[26] == "bicycle"
    assert dataset_info("pascalvoc").class_names[15] == "person"
    assert dataset_info("coco81").class_names[:2] == ("background", "person")
    assert dataset_info("coco171").class_names[170] == "wood"
    assert dataset_info("pascalvoc").resize == "square" and dataset_info("cityscapes").resize == "center"
    assert dataset_info("folder").n_classes is None
    with pytest.raises(DatasetError, match="unknown dataset 'coco'"):
        dataset_info("coco")


def test_crop_set_names_are_the_reference_ones(tmp_path):
    root = str(tmp_path)
    assert cropped_dir("cocostuff27", root) == os.path.join(root, "cocostuff", "cropped", "cocostuff_five_crop_0.5")
    assert cropped_dir("cityscapes", root) == os.path.join(root, "cityscapes", "cropped", "cityscapes_five_crop_0.5")
    assert cropped_dir("coco81", root) == os.path.join(root, "cocostuff", "cropped", "coco81_double_crop_0")
    assert cropped_dir("coco171", root) == os.path.join(root, "cocostuff", "cropped", "coco171_double_crop_0")
    assert cropped_dir("pascalvoc", root) == os.path.join(root, "pascalvoc", "cropped", "pascalvoc_super_crop_0")
    assert cropped_dir("cocostuff27", root, "five", 0.3).endswith("cocostuff_five_crop_0.3")
    assert dataset_info("coco81").crop_ratios == (0.5, 0.8)
    assert dataset_info("pascalvoc").crop_ratios == (0.3, 0.4, 0.5, 0.6, 0.7)
    assert dataset_info("cityscapes").crop_type == "five"


def test_cocostuff27_val(tmp_path):
    base = make_coco(tmp_path)
    dataset = build_dataset("cocostuff27", str(tmp_path), "val", 320)
    assert len(dataset) == 2  # the curated _7 list, not the full one
    item = dataset[1]
    assert item["ind"] == 1 and item["img"].shape == (3, 320, 320) and item["img"].dtype == torch.float32
    assert item["label"].shape == (320, 320) and item["label"].dtype == torch.int64
    table = {0: 9, 255: -1, 156: 23, 91: 17, 148: 21, 11: 8}
    expected = _reference_label(os.path.join(base, "annotations", "val2017", f"{COCO_VAL_IDS[1]}.png"), 320, table)
    assert torch.equal(item["label"], expected)
    assert set(item["label"].unique().tolist()) == {9, -1, 23, 17, 21, 8}
    assert len(build_dataset("cocostuff27", str(tmp_path), "train", 64, crops=False)) == 2


@pytest.mark.parametrize(
    "name,table",
    [
        ("coco81", {0: 1, 255: -1, 156: 0, 91: 0, 148: 0, 11: -1}),
        ("coco171", {0: 0, 255: -1, 156: 145, 91: 80, 148: 137, 11: -1}),
    ],
)
def test_coco81_and_171_use_the_full_list(tmp_path, name, table):
    base = make_coco(tmp_path)
    dataset = build_dataset(name, str(tmp_path), "val", 40)
    assert len(dataset) == 3 and dataset.n_classes == dataset_info(name).n_classes
    expected = _reference_label(os.path.join(base, "annotations", "val2017", f"{COCO_VAL_IDS[2]}.png"), 40, table)
    assert torch.equal(dataset[2]["label"], expected)


def test_cityscapes_val(tmp_path):
    base = make_cityscapes(tmp_path)
    dataset = build_dataset("cityscapes", str(tmp_path), "val", 320)
    assert len(dataset) == 3
    assert dataset.image_paths[2].endswith(os.path.join("lindau", "lindau_000000_000019_leftImg8bit.png"))
    item = dataset[0]
    assert item["img"].shape == (3, 320, 320)
    table = {7: 0, 6: -1, 33: 26, 0: -1, 26: 19, 255: -1}
    city, stem = CITY_VAL[0]
    expected = _reference_label(os.path.join(base, "gtFine", "val", city, f"{stem}_gtFine_labelIds.png"), 320, table)
    assert torch.equal(item["label"], expected)


def test_pascalvoc_val_is_resized_square(tmp_path):
    base = make_voc(tmp_path)
    dataset = build_dataset("pascalvoc", str(tmp_path), "val", 320)
    assert len(dataset) == 2
    item = dataset[0]
    assert item["img"].shape == (3, 320, 320)
    table = {0: 0, 15: 15, 255: -1, 20: 20}
    path = os.path.join(base, "SegmentationClass", f"{VOC_VAL_IDS[0]}.png")
    assert torch.equal(item["label"], _reference_label(path, 320, table, square=True))


def test_image_normalisation_follows_mean_and_std(tmp_path):
    make_voc(tmp_path)
    mean, std = (0.48145466, 0.4578275, 0.40821073), (0.26862954, 0.26130258, 0.27577711)
    img = build_dataset("pascalvoc", str(tmp_path), "val", 30, mean=mean, std=std)[0]["img"]
    raw = T.ToTensor()(
        T.Resize((30, 30), interpolation=InterpolationMode.NEAREST)(
            Image.open(os.path.join(tmp_path, "pascalvoc", "VOCdevkit", "VOC2012", "JPEGImages", "2007_000033.jpg"))
        )
    )
    torch.testing.assert_close(img, T.Normalize(mean, std)(raw))


def test_folder_with_and_without_labels(tmp_path):
    image_dir, label_dir = tmp_path / "imgs", tmp_path / "labels"
    for n, name in enumerate(["b.jpg", "a.png", "c.JPEG"]):
        _write(_rgb(20, 30, n), str(image_dir / name))
        _write(_stripes((0, 1, 2, 255), 20, 30), str(label_dir / (os.path.splitext(name)[0] + ".png")))
    (image_dir / "notes.txt").write_text("not an image")
    dataset = build_dataset("folder", None, "val", 16, image_dir=str(image_dir), label_dir=str(label_dir), n_classes=3)
    assert [os.path.basename(f) for f in dataset.image_paths] == ["a.png", "b.jpg", "c.JPEG"]
    item = dataset[0]
    assert item["img"].shape == (3, 16, 16)
    assert set(item["label"].unique().tolist()) == {0, 1, 2, -1}
    unlabelled = build_dataset("folder", str(image_dir), "val", 16)
    assert len(unlabelled) == 3 and bool((unlabelled[2]["label"] == -1).all())
    with pytest.raises(DatasetError, match="needs n_classes"):
        build_dataset("folder", None, "val", 16, image_dir=str(image_dir), label_dir=str(label_dir))
    with pytest.raises(DatasetError, match=r"values outside the dataset's range: 2 \(expected class ids 0..1 or 255\)"):
        build_dataset("folder", None, "val", 16, image_dir=str(image_dir), label_dir=str(label_dir), n_classes=2)[0]


def test_toy_reads_through_the_folder_loader(tmp_path, monkeypatch):
    def tiny_toy(root):
        return ensure_toy(root, seed=0, n_train=3, n_val=2, size=40)

    monkeypatch.setattr(datasets, "ensure_toy", tiny_toy)
    dataset = build_dataset("toy", str(tmp_path), "val", 32)
    assert len(dataset) == 2 and dataset.n_classes == 6
    assert dataset.class_names == dataset_info("toy").class_names
    item = dataset[1]
    assert item["img"].shape == (3, 32, 32)
    path = str(tmp_path / "toy" / "val" / "labels" / "00001.png")
    assert torch.equal(item["label"], _reference_label(path, 32, {c: c for c in range(6)}))
    raw = np.array(Image.open(path))
    assert torch.equal(build_dataset("toy", str(tmp_path), "val", 40)[1]["label"], torch.from_numpy(raw).long())
    assert len(build_dataset("toy", str(tmp_path), "train", 32)) == 3


def test_train_split_reads_crops_and_names_the_command(tmp_path):
    make_coco(tmp_path)
    root = str(tmp_path)
    with pytest.raises(DatasetNotFoundError) as err:
        build_dataset("cocostuff27", root, "train", 64)
    assert f"python crop_dataset.py --dataset cocostuff27 --data_dir {root}" in str(err.value)
    crop_root = cropped_dir("cocostuff27", root)
    for i in range(3):
        _write(_rgb(24, 32, i), os.path.join(crop_root, "img", "train", f"{i}.jpg"))
        _write(_stripes((0, 1, 27), 24, 32), os.path.join(crop_root, "label", "train", f"{i}.png"))
    dataset = build_dataset("cocostuff27", root, "train", 24)
    assert len(dataset) == 3
    assert set(dataset[2]["label"].unique().tolist()) == {-1, 0, 26}

    os.remove(os.path.join(crop_root, "label", "train", "1.png"))
    with pytest.raises(DatasetError, match="incomplete .*crop_dataset.py --dataset cocostuff27"):
        build_dataset("cocostuff27", root, "train", 24)
    with open(incomplete_marker(crop_root, "train"), "w"):
        pass
    with pytest.raises(DatasetError, match="interrupted"):
        build_dataset("cocostuff27", root, "train", 24)


def test_crop_label_out_of_range(tmp_path):
    crop_root = cropped_dir("pascalvoc", str(tmp_path))
    _write(_rgb(8, 8, 0), os.path.join(crop_root, "img", "train", "0.jpg"))
    _write(_stripes((0, 22), 8, 8), os.path.join(crop_root, "label", "train", "0.png"))
    with pytest.raises(DatasetError, match="0.png holds values outside .*: 22"):
        build_dataset("pascalvoc", str(tmp_path), "train", 8)[0]


def test_missing_root_and_split_folders(tmp_path):
    missing = str(tmp_path / "nowhere")
    with pytest.raises(DatasetNotFoundError, match=f"data directory not found: {missing}"):
        build_dataset("cocostuff27", missing, "val", 32)
    with pytest.raises(DatasetNotFoundError) as err:
        build_dataset("cocostuff27", str(tmp_path), "val", 32)
    assert os.path.join(str(tmp_path), "cocostuff") in str(err.value) and "expected" in str(err.value)
    make_cityscapes(tmp_path)
    with pytest.raises(DatasetNotFoundError) as err:
        build_dataset("cityscapes", str(tmp_path), "train", 32, crops=False)
    message = str(err.value)
    assert os.path.join("cityscapes", "leftImg8bit", "train") in message and "gtFine_labelIds.png" in message
    assert "\n" not in message
    with pytest.raises(DatasetNotFoundError, match="VOCdevkit"):
        build_dataset("pascalvoc", str(tmp_path), "val", 32)


def test_missing_curated_list_is_named(tmp_path):
    base = make_coco(tmp_path)
    list_file = os.path.join(base, "curated", "val2017", "Coco164kFull_Stuff_Coarse_7.txt")
    os.remove(list_file)
    with pytest.raises(DatasetNotFoundError, match=f"image list not found: {list_file}"):
        build_dataset("cocostuff27", str(tmp_path), "val", 32)


def test_unreadable_and_missing_files_are_named(tmp_path):
    base = make_coco(tmp_path)
    bad_image = os.path.join(base, "images", "val2017", f"{COCO_VAL_IDS[0]}.jpg")
    with open(bad_image, "wb") as f:
        f.write(b"not a jpeg at all")
    dataset = build_dataset("cocostuff27", str(tmp_path), "val", 32)
    with pytest.raises(DatasetError, match=f"cannot read image {bad_image}"):
        dataset[0]
    bad_label = os.path.join(base, "annotations", "val2017", f"{COCO_VAL_IDS[1]}.png")
    with open(bad_label, "wb") as f:
        f.write(b"\x89PNG truncated")
    with pytest.raises(DatasetError, match=f"cannot read label {bad_label}"):
        dataset[1]
    os.remove(bad_label)
    with pytest.raises(DatasetNotFoundError, match=f"label file not found: {bad_label}"):
        dataset[1]
    colour_label = tmp_path / "labels" / "x.png"
    _write(_rgb(4, 4, 0), str(colour_label))
    _write(_rgb(4, 4, 0), str(tmp_path / "imgs" / "x.png"))
    with pytest.raises(DatasetError, match="mode RGB; expected a single-channel"):
        build_dataset(
            "folder", None, "val", 4, image_dir=str(tmp_path / "imgs"), label_dir=str(colour_label.parent), n_classes=3
        )[0]
    os.remove(colour_label)
    with pytest.raises(DatasetNotFoundError, match="label file not found: .*x.png"):
        build_dataset(
            "folder", None, "val", 4, image_dir=str(tmp_path / "imgs"), label_dir=str(colour_label.parent), n_classes=3
        )


@pytest.mark.parametrize(
    "maker,name,values,bad",
    [
        (make_coco, "cocostuff27", (0, 255, 200, 182), "182, 200"),
        (make_cityscapes, "cityscapes", (7, 34, 255), "34"),
        (make_voc, "pascalvoc", (0, 21, 254, 255), "21, 254"),
    ],
)
def test_label_values_out_of_range_are_reported(tmp_path, maker, name, values, bad):
    maker(tmp_path, values=values)
    with pytest.raises(DatasetError, match=f"holds values outside the dataset's range: {bad} "):
        build_dataset(name, str(tmp_path), "val", 32)[0]


def test_toy_label_out_of_range(tmp_path, monkeypatch):
    monkeypatch.setattr(datasets, "ensure_toy", lambda root: ensure_toy(root, n_train=1, n_val=1, size=16))
    dataset = build_dataset("toy", str(tmp_path), "val", 16)
    _write(_stripes((0, 6), 16, 16), str(tmp_path / "toy" / "val" / "labels" / "00000.png"))
    with pytest.raises(DatasetError, match="00000.png holds values outside .*: 6 .*0..5 or 255"):
        dataset[0]


def test_bad_arguments(tmp_path):
    make_voc(tmp_path)
    with pytest.raises(DatasetError, match="has 21 classes, not 27"):
        build_dataset("pascalvoc", str(tmp_path), "val", 32, n_classes=27)
    with pytest.raises(DatasetError, match="unknown split 'test' for cocostuff27"):
        build_dataset("cocostuff27", str(tmp_path), "test", 32, crops=False)
    with pytest.raises(DatasetNotFoundError, match=r"Segmentation.test\.txt"):
        build_dataset("pascalvoc", str(tmp_path), "test", 32, crops=False)
