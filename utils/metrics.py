"""Segmentation metrics: Hungarian-matched mIoU and pixel accuracy (SPEC §7).

One ``C×C`` confusion histogram is accumulated over the whole evaluation set. Unsupervised
predictions are cluster ids, so a single Hungarian assignment of clusters to classes is
computed on the accumulated histogram (``scipy.optimize.linear_sum_assignment``, maximising
the matched pixels); IoU and pixel accuracy are then read from the histogram with its rows
permuted by that assignment. The linear probe predicts classes directly and uses the
identity assignment (``hungarian=False``).

The histogram is kept as exact int64 counts (the reference accumulates float32 counts on
the GPU, which rounds once a cell passes 2**24 pixels).
"""

import numpy as np
import torch
from scipy.optimize import linear_sum_assignment


class UnsupervisedMetrics:
    """Accumulates a confusion histogram and scores it with one Hungarian assignment.

    ``histogram[p, l]`` counts the pixels predicted as cluster ``p`` whose label is class
    ``l`` (rows: prediction, columns: label, as in the reference). Only pixels with
    ``0 <= label < C`` and ``0 <= pred < C`` are counted.

    Args:
        n_classes: ``C``, the number of classes and of clusters.
        hungarian: match clusters to classes with the Hungarian algorithm (unsupervised
            predictions); ``False`` keeps the identity assignment (supervised linear probe).
    """

    def __init__(self, n_classes, hungarian=True):
        if int(n_classes) < 1:
            raise ValueError(f"n_classes must be a positive integer, got {n_classes!r}")
        self.n_classes = int(n_classes)
        self.hungarian = bool(hungarian)
        self.histogram = torch.zeros(self.n_classes, self.n_classes, dtype=torch.long)

    @torch.no_grad()
    def update(self, pred, label):
        """Counts one batch. pred, label: integer tensors of the same shape [...]."""
        pred = torch.as_tensor(pred)
        label = torch.as_tensor(label)
        if pred.shape != label.shape:
            raise ValueError(f"prediction shape {tuple(pred.shape)} does not match label shape {tuple(label.shape)}")
        if pred.is_floating_point() or label.is_floating_point():
            raise ValueError(
                f"prediction and label must be integer tensors (class ids), got {pred.dtype} and {label.dtype}"
            )
        n = self.n_classes
        pred = pred.reshape(-1).long()
        label = label.to(pred.device).reshape(-1).long()
        valid = (label >= 0) & (label < n) & (pred >= 0) & (pred < n)
        counts = torch.bincount(n * pred[valid] + label[valid], minlength=n * n)
        self.histogram += counts.reshape(n, n).cpu()

    def assignment(self):
        """The cluster -> class assignment, a LongTensor [C] (identity without Hungarian)."""
        if not self.hungarian:
            return torch.arange(self.n_classes)
        if int(self.histogram.sum()) == 0:
            raise RuntimeError("no labelled pixel has been counted yet: call update() before compute() or map()")
        clusters, classes = linear_sum_assignment(self.histogram.numpy(), maximize=True)
        assignment = np.empty(self.n_classes, dtype=np.int64)
        assignment[clusters] = classes
        return torch.from_numpy(assignment)

    def matched_histogram(self, assignment=None):
        """The class × class histogram [C, C] after matching: rows predicted class, columns label."""
        if assignment is None:
            assignment = self.assignment()
        matched = torch.zeros_like(self.histogram)
        matched[assignment] = self.histogram
        return matched

    def compute(self):
        """Scores the accumulated histogram.

        Returns a dict of plain Python values: ``mIoU`` and ``pAcc`` in percent, ``iou`` the
        per-class IoU in percent indexed by class (NaN for a class with no tp+fp+fn),
        ``assignment`` (cluster id -> class id) and ``n_pixels`` (counted pixels).
        """
        assignment = self.assignment()
        matched = self.matched_histogram(assignment).double()
        total = float(matched.sum())
        if total == 0:
            raise RuntimeError("no labelled pixel has been counted yet: call update() before compute()")
        tp = torch.diag(matched)
        fp = matched.sum(dim=1) - tp
        fn = matched.sum(dim=0) - tp
        iou = tp / (tp + fp + fn)
        valid = ~torch.isnan(iou)
        miou = float(iou[valid].mean()) * 100 if bool(valid.any()) else float("nan")
        return {
            "mIoU": miou,
            "pAcc": float(tp.sum()) / total * 100,
            "iou": [float(v) * 100 for v in iou],
            "assignment": [int(c) for c in assignment],
            "n_pixels": int(total),
        }

    def map(self, pred):
        """Sends each cluster id to its matched class; ids outside [0, C) are kept.

        pred: integer tensor or array [...] -> same type, shape and dtype.
        """
        assignment = self.assignment()
        is_numpy = isinstance(pred, np.ndarray)
        pred_t = torch.from_numpy(pred) if is_numpy else torch.as_tensor(pred)
        if pred_t.is_floating_point():
            raise ValueError(f"map() expects integer cluster ids, got {pred_t.dtype}")
        inside = (pred_t >= 0) & (pred_t < self.n_classes)
        lookup = assignment.to(pred_t.device)
        mapped = torch.where(inside, lookup[pred_t.long().clamp(0, self.n_classes - 1)], pred_t.long())
        mapped = mapped.to(pred_t.dtype)
        return mapped.numpy() if is_numpy else mapped
