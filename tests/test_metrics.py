import itertools
import math

import numpy as np
import pytest
import torch

from utils.metrics import UnsupervisedMetrics


def brute_force_scores(pred, label, n_classes):
    """Literal formulation: try every cluster -> class permutation, keep the best one."""
    pairs = [
        (int(p), int(y))
        for p, y in zip(pred.reshape(-1), label.reshape(-1))
        if 0 <= y < n_classes and 0 <= p < n_classes
    ]
    best = max(itertools.permutations(range(n_classes)), key=lambda perm: sum(perm[p] == y for p, y in pairs))
    ious = []
    for c in range(n_classes):
        tp = sum(best[p] == c and y == c for p, y in pairs)
        fp = sum(best[p] == c and y != c for p, y in pairs)
        fn = sum(best[p] != c and y == c for p, y in pairs)
        ious.append(math.nan if tp + fp + fn == 0 else 100.0 * tp / (tp + fp + fn))
    matched = sum(best[p] == y for p, y in pairs)
    return list(best), ious, 100.0 * matched / len(pairs)


def test_hand_computed_example():
    label = torch.tensor([0, 0, 0, 1, 1, 2, 2, 2, 2, -1])
    pred = torch.tensor([1, 1, 2, 0, 0, 2, 2, 2, 0, 1])
    metrics = UnsupervisedMetrics(3)
    metrics.update(pred, label)
    expected_hist = torch.tensor([[0, 2, 1], [2, 0, 0], [1, 0, 3]])
    assert torch.equal(metrics.histogram, expected_hist)
    assert metrics.histogram.dtype == torch.long
    out = metrics.compute()
    assert out["assignment"] == [1, 0, 2]
    assert out["iou"] == pytest.approx([200 / 3, 200 / 3, 60.0])
    assert out["mIoU"] == pytest.approx((200 / 3 + 200 / 3 + 60.0) / 3)
    assert out["pAcc"] == pytest.approx(700 / 9)
    assert out["n_pixels"] == 9


def test_random_against_brute_force():
    generator = torch.Generator().manual_seed(0)
    n = 4
    label = torch.randint(-1, n, (6, 11), generator=generator)
    pred = torch.randint(0, n, (6, 11), generator=generator)
    metrics = UnsupervisedMetrics(n)
    metrics.update(pred, label)
    out = metrics.compute()
    best, ious, pacc = brute_force_scores(pred, label, n)
    assert out["pAcc"] == pytest.approx(pacc)
    assert out["iou"] == pytest.approx(ious)
    assert out["mIoU"] == pytest.approx(np.nanmean(ious))


def test_permuted_perfect_prediction_scores_100():
    generator = torch.Generator().manual_seed(1)
    label = torch.randint(0, 5, (2, 16, 16), generator=generator)
    permutation = torch.tensor([3, 0, 4, 1, 2])
    metrics = UnsupervisedMetrics(5)
    metrics.update(permutation[label], label)
    out = metrics.compute()
    assert out["mIoU"] == pytest.approx(100.0)
    assert out["pAcc"] == pytest.approx(100.0)
    # cluster permutation[c] holds class c
    assert [out["assignment"][int(permutation[c])] for c in range(5)] == list(range(5))


def test_ignored_pixels_are_not_counted():
    label = torch.tensor([0, 1, -1, 255, 3, 1, 0])
    pred = torch.tensor([0, 1, 1, 0, 0, -1, 7])
    metrics = UnsupervisedMetrics(3)
    metrics.update(pred, label)
    assert int(metrics.histogram.sum()) == 2
    assert torch.equal(metrics.histogram, torch.tensor([[1, 0, 0], [0, 1, 0], [0, 0, 0]]))
    out = metrics.compute()
    assert out["pAcc"] == pytest.approx(100.0)
    assert out["n_pixels"] == 2


def test_accumulation_equals_one_big_update():
    generator = torch.Generator().manual_seed(2)
    label = torch.randint(-1, 6, (8, 12, 12), generator=generator)
    pred = torch.randint(0, 6, (8, 12, 12), generator=generator)
    whole = UnsupervisedMetrics(6)
    whole.update(pred, label)
    batched = UnsupervisedMetrics(6)
    for i in range(0, 8, 3):
        batched.update(pred[i : i + 3], label[i : i + 3])
    assert torch.equal(whole.histogram, batched.histogram)
    assert whole.compute() == batched.compute()


def test_map_sends_cluster_to_class_for_a_three_cycle():
    generator = torch.Generator().manual_seed(3)
    label = torch.randint(0, 3, (20, 20), generator=generator)
    cluster_to_class = torch.tensor([1, 2, 0])
    class_to_cluster = torch.tensor([2, 0, 1])
    pred = class_to_cluster[label]
    metrics = UnsupervisedMetrics(3)
    metrics.update(pred, label)
    assert metrics.compute()["assignment"] == cluster_to_class.tolist()
    assert torch.equal(metrics.map(pred), label)
    # the inverse direction would give a different map for a 3-cycle
    assert not torch.equal(class_to_cluster[pred], label)


def test_map_keeps_out_of_range_ids_and_types():
    label = torch.tensor([0, 1, 2, 0, 1, 2])
    pred = torch.tensor([1, 2, 0, 1, 2, 0])
    metrics = UnsupervisedMetrics(3)
    metrics.update(pred, label)
    mapped = metrics.map(torch.tensor([[0, 1], [2, -1], [5, 255]], dtype=torch.int32))
    assert mapped.dtype == torch.int32
    assert mapped.tolist() == [[2, 0], [1, -1], [5, 255]]
    mapped_np = metrics.map(np.array([0, 1, 2, 9], dtype=np.int64))
    assert isinstance(mapped_np, np.ndarray)
    assert mapped_np.tolist() == [2, 0, 1, 9]


def test_class_without_pixels_is_nan_and_excluded_from_miou():
    # class 2 is neither labelled nor predicted after matching
    label = torch.tensor([0, 0, 1, 1, 1])
    pred = torch.tensor([0, 1, 1, 1, 1])
    metrics = UnsupervisedMetrics(3, hungarian=False)
    metrics.update(pred, label)
    out = metrics.compute()
    assert math.isnan(out["iou"][2])
    assert out["iou"][:2] == pytest.approx([50.0, 75.0])
    assert out["mIoU"] == pytest.approx(62.5)


def test_identity_assignment_without_hungarian():
    label = torch.tensor([0, 0, 1, 1])
    pred = torch.tensor([1, 1, 0, 0])
    supervised = UnsupervisedMetrics(2, hungarian=False)
    supervised.update(pred, label)
    out = supervised.compute()
    assert out["assignment"] == [0, 1]
    assert out["pAcc"] == 0.0
    assert out["mIoU"] == 0.0
    assert torch.equal(supervised.map(pred), pred)
    unsupervised = UnsupervisedMetrics(2)
    unsupervised.update(pred, label)
    assert unsupervised.compute()["pAcc"] == pytest.approx(100.0)


def test_matched_histogram_puts_matches_on_the_diagonal():
    label = torch.tensor([0, 0, 1, 2, 2, 2])
    pred = torch.tensor([2, 2, 0, 1, 1, 0])
    metrics = UnsupervisedMetrics(3)
    metrics.update(pred, label)
    matched = metrics.matched_histogram()
    assert torch.equal(matched, torch.tensor([[2, 0, 0], [0, 1, 1], [0, 0, 2]]))
    assert int(torch.diag(matched).sum()) == 5


def test_reset_and_errors():
    metrics = UnsupervisedMetrics(3)
    with pytest.raises(RuntimeError, match="call update"):
        metrics.compute()
    with pytest.raises(ValueError, match="does not match"):
        metrics.update(torch.zeros(3, dtype=torch.long), torch.zeros(4, dtype=torch.long))
    with pytest.raises(ValueError, match="integer"):
        metrics.update(torch.zeros(3), torch.zeros(3, dtype=torch.long))


def test_single_pixel_and_empty_probe_histogram():
    metrics = UnsupervisedMetrics(3)
    metrics.update(torch.tensor([2]), torch.tensor([1]))
    scores = metrics.compute()
    assert scores["n_pixels"] == 1 and scores["mIoU"] == 100.0 and scores["pAcc"] == 100.0
    with pytest.raises(RuntimeError, match="no labelled pixel has been counted yet"):
        UnsupervisedMetrics(3, hungarian=False).compute()


def test_map_keeps_the_first_id_past_the_classes_and_rejects_float_ids():
    metrics = UnsupervisedMetrics(3)
    metrics.update(torch.tensor([1, 2, 0]), torch.tensor([0, 1, 2]))
    assert metrics.map(torch.tensor([3, 2, -1])).tolist() == [3, 1, -1]
    with pytest.raises(ValueError, match="expects integer cluster ids"):
        metrics.map(torch.zeros(2))


def test_one_class_is_allowed_and_error_texts_are_exact():
    metrics = UnsupervisedMetrics(1)
    metrics.update(torch.tensor([0, 0, 1]), torch.tensor([0, 1, 0]))
    scores = metrics.compute()
    assert scores["n_pixels"] == 1 and scores["mIoU"] == 100.0 and scores["assignment"] == [0]
    with pytest.raises(ValueError, match=r"^n_classes must be a positive integer, got 0$"):
        UnsupervisedMetrics(0)
    with pytest.raises(
        RuntimeError,
        match=r"^no labelled pixel has been counted yet: call update\(\) "
        r"before compute\(\) or map\(\)$",
    ):
        UnsupervisedMetrics(2).map(torch.tensor([0]))
    with pytest.raises(
        RuntimeError,
        match=r"^no labelled pixel has been counted yet: call update\(\) "
        r"before compute\(\)$",
    ):
        UnsupervisedMetrics(2, hungarian=False).compute()
