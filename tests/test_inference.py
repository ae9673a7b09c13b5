"""modules/inference.py against literal formulations: window offsets, resizing, tie-breaking, CRF size."""

import pytest
import torch
import torch.nn.functional as F

from modules.inference import crf_size, resize_short_side, sliding_window_scores, upsample_argmax, window_starts


@pytest.mark.parametrize(
    "length,window,stride,expected",
    [
        (64, 64, 32, [0]),
        (100, 64, 32, [0, 32, 36]),
        (128, 64, 32, [0, 32, 64]),  # the last stride lands flush with the edge
        (10, 4, 1, [0, 1, 2, 3, 4, 5, 6]),  # stride 1: every offset
        (10, 4, 4, [0, 4, 6]),  # stride = window: no overlap but the last one
        (5, 1, 1, [0, 1, 2, 3, 4]),
    ],
)
def test_window_starts_are_stride_apart_and_the_last_is_flush(length, window, stride, expected):
    assert window_starts(length, window, stride) == expected


def test_window_starts_errors_name_the_sizes():
    with pytest.raises(ValueError, match=r"^a side of 50 pixels is shorter than the window \(64\)$"):
        window_starts(50, 64, 32)
    for stride in (0, 65):
        with pytest.raises(ValueError, match=rf"^stride must be in \[1, 64\], got {stride}$"):
            window_starts(100, 64, stride)


@pytest.mark.parametrize(
    "height,width,expected",
    [
        (40, 60, (20, 30)),  # landscape, scaled down
        (60, 40, (30, 20)),  # portrait
        (10, 15, (20, 30)),  # scaled up
        (14, 21, (20, 30)),  # scaled up by less than 2
        (20, 33, (20, 33)),  # already at the side: unchanged
    ],
)
def test_resize_short_side_keeps_the_aspect_ratio_and_antialiases_only_down(height, width, expected):
    img = torch.rand(2, 3, height, width, generator=torch.Generator().manual_seed(0))
    out = resize_short_side(img, 20)
    assert out.shape == (2, 3, *expected)
    if expected == (height, width):
        assert out is img
    else:
        literal = F.interpolate(
            img, size=expected, mode="bilinear", align_corners=False, antialias=expected[0] < height
        )
        assert torch.equal(out, literal)


def test_sliding_window_scores_average_the_windows_covering_each_pixel():
    img = torch.rand(3, 6, 9, generator=torch.Generator().manual_seed(1))

    def window_mean(windows):  # [n, 3, 4, 4] -> [n, 2, 4, 4]: each window's mean and its negation
        mean = windows.mean(dim=(1, 2, 3))
        return torch.stack([mean, -mean], dim=1)[:, :, None, None].expand(-1, -1, 4, 4)

    scores = sliding_window_scores(img, 4, 3, window_mean, batch_size=5)
    total, count = torch.zeros(2, 6, 9), torch.zeros(6, 9)
    for y in (0, 2):
        for x in (0, 3, 5):
            total[:, y : y + 4, x : x + 4] += window_mean(img[None, :, y : y + 4, x : x + 4])[0]
            count[y : y + 4, x : x + 4] += 1
    torch.testing.assert_close(scores, total / count, rtol=1e-6, atol=1e-6)
    assert scores.dtype == torch.float32


def test_identity_scores_come_back_as_the_picture_in_batches_of_windows():
    img = torch.rand(3, 64, 150)
    calls = []

    def identity(windows):
        calls.append(windows.shape[0])
        return windows

    assert torch.allclose(sliding_window_scores(img, 64, 32, identity, batch_size=2), img, atol=1e-6)
    assert calls == [2, 2]  # windows at x = 0, 32, 64 and 86 (flush with the edge), two per call


def test_upsample_argmax_is_the_argmax_of_the_full_upsampled_scores():
    scores = torch.randn(7, 9, 13)
    full = F.interpolate(scores[None], size=(40, 50), mode="bilinear", align_corners=False)[0]
    assert torch.equal(upsample_argmax(scores, (40, 50), chunk=3), full.argmax(0))


def test_upsample_argmax_breaks_ties_towards_the_first_class_across_chunks():
    scores = torch.zeros(10, 3, 4)
    scores[1:8] = -1.0  # classes 0 and 8 (the first of the second chunk) tie everywhere
    scores[9] = -1.0
    assert torch.equal(upsample_argmax(scores, (6, 8), chunk=8), torch.zeros(6, 8, dtype=torch.long))
    assert torch.equal(upsample_argmax(scores, (6, 8)), torch.zeros(6, 8, dtype=torch.long))  # default chunk


def test_crf_size_keeps_pictures_up_to_the_budget_and_never_drops_a_side():
    assert crf_size(1000, 1000, 1_000_000) == (1000, 1000)  # exactly at the budget: kept
    assert crf_size(1000, 1001, 1_000_000) == (999, 1000)
    assert crf_size(3000, 4000, 2_000_000) == (1224, 1632) and crf_size(30, 40, 2_000_000) == (30, 40)
    # A thin picture: the short side stops at 1 pixel, the long one at the budget.
    assert crf_size(1, 10_000_000, 1_000_000) == (1, 1_000_000)
    assert crf_size(10_000_000, 1, 1_000_000) == (1_000_000, 1)
    assert crf_size(3, 5_000_000, 1_000_000) == (1, 1_000_000)
    for height, width in [
        (4000, 3000),
        (1080, 1920),
        (7, 900_001),
        (900_001, 7),
        (2, 2_000_001),
        (1, 10_000_000),
        (10_000_000, 1),
    ]:
        crf_height, crf_width = crf_size(height, width, 1_000_000)
        assert type(crf_height) is int and type(crf_width) is int  # sizes for PIL's resize
        assert 1 <= crf_height <= height and 1 <= crf_width <= width and crf_height * crf_width <= 1_000_000
