import numpy as np
import pytest
import torch
from PIL import Image
from torchvision import transforms as T
from torchvision.transforms import InterpolationMode

from loader.transforms import SegmentationTransform, image_to_tensor, normalize, resize_pil
from models.normalisation import IMAGENET_MEAN, IMAGENET_STD

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


def _random_image(height, width, seed=0):
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8))


def _reference_image(image, res, square=False):
    size = (res, res) if square else res
    steps = [T.Resize(size, interpolation=InterpolationMode.NEAREST)]
    if not square:
        steps.append(T.CenterCrop(res))
    steps += [T.ToTensor(), T.Normalize(IMAGENET_MEAN, IMAGENET_STD)]
    return T.Compose(steps)(image)


@pytest.mark.parametrize("height,width", [(47, 63), (90, 41), (320, 320)])
def test_center_geometry_matches_torchvision_pipeline(height, width):
    image = _random_image(height, width)
    img, _ = SegmentationTransform(320, "center")(image, None)
    assert img.shape == (3, 320, 320) and img.dtype == torch.float32
    torch.testing.assert_close(img, _reference_image(image, 320), rtol=0, atol=1e-6)


def test_square_geometry_matches_torchvision_pipeline():
    image = _random_image(37, 52)
    img, _ = SegmentationTransform(64, "square")(image, None)
    torch.testing.assert_close(img, _reference_image(image, 64, square=True), rtol=0, atol=1e-6)


@pytest.mark.parametrize("mode", ["center", "square"])
def test_label_stays_aligned_with_image(mode):
    # the red channel holds the column and the green channel the row of each source pixel
    height, width = 45, 70
    rows, cols = np.mgrid[0:height, 0:width]
    pixels = np.stack([cols, rows, np.zeros_like(rows)], -1).astype(np.uint8)
    label = rows * 1000 + cols - 5  # int64, negative values included
    transform = SegmentationTransform(96, mode, mean=(0, 0, 0), std=(1, 1, 1))
    img, out = transform(Image.fromarray(pixels), label)
    assert out.dtype == torch.int64 and out.shape == (96, 96)
    src_cols = torch.round(img[0] * 255).long()
    src_rows = torch.round(img[1] * 255).long()
    assert torch.equal(out, src_rows * 1000 + src_cols - 5)


def test_label_decoded_before_or_after_resize_is_the_same():
    rng = np.random.default_rng(1)
    raw = rng.integers(0, 6, (33, 58), dtype=np.uint8)
    lut = np.array([3, -1, 0, 2, 1, 4])
    _, decoded_first = SegmentationTransform(50)(_random_image(33, 58), lut[raw])
    resized = T.CenterCrop(50)(T.Resize(50, interpolation=InterpolationMode.NEAREST)(Image.fromarray(raw)))
    assert torch.equal(decoded_first, torch.from_numpy(lut[np.array(resized)]))


def test_missing_label_is_all_ignore():
    _, label = SegmentationTransform(32)(_random_image(40, 40), None)
    assert label.shape == (32, 32) and label.dtype == torch.int64 and bool((label == -1).all())


def test_normalisation_uses_given_statistics():
    image = _random_image(8, 8, seed=3)
    raw = torch.from_numpy(np.array(image)).permute(2, 0, 1).float() / 255
    img = image_to_tensor(image, CLIP_MEAN, CLIP_STD)
    expected = (raw - torch.tensor(CLIP_MEAN)[:, None, None]) / torch.tensor(CLIP_STD)[:, None, None]
    torch.testing.assert_close(img, expected)
    torch.testing.assert_close(normalize(raw), T.Normalize(IMAGENET_MEAN, IMAGENET_STD)(raw))


def test_bad_arguments():
    with pytest.raises(ValueError, match="resize mode"):
        SegmentationTransform(32, "stretch")
    with pytest.raises(ValueError, match="resize mode"):
        resize_pil(_random_image(4, 4), 8, "stretch")
    with pytest.raises(ValueError, match="positive"):
        SegmentationTransform(0)
