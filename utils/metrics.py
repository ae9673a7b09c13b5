"""Segmentation metrics: Hungarian-matched mIoU and pixel accuracy (SPEC §7).

One ``C×C`` confusion histogram is accumulated over the whole evaluation set, as exact int64 counts
(the reference's float32 counts round once a cell passes 2**24 pixels). Unsupervised predictions are
cluster ids: one Hungarian assignment of clusters to classes (``linear_sum_assignment``, maximising the
matched pixels) is computed on it, and IoU and pixel accuracy are read with its rows permuted by that
assignment. The linear probe predicts classes and keeps the identity (``hungarian=False``).
"""

import numpy as np
import torch
from scipy.optimize import linear_sum_assignment


class UnsupervisedMetrics:
    """Accumulates a confusion histogram and scores it with one Hungarian assignment.

    ``histogram[p, l]`` counts the pixels predicted as cluster ``p`` whose label is class ``l``
    (rows: prediction, columns: label, as in the reference); only pixels with ``0 <= label < C``
    and ``0 <= pred < C`` count. ``n_classes``: ``C``, classes and clusters; ``hungarian=False``
    keeps the identity assignment (supervised linear probe).
    """

    def __init__(self, n_classes, hungarian=True):
        if int(n_classes) < 1:
            raise ValueError(f"n_classes must be a positive integer, got {n_classes!r}")
        self.n_classes, self.hungarian = int(n_classes), bool(hungarian)
        self.histogram = torch.zeros(self.n_classes, self.n_classes, dtype=torch.long)

    @torch.no_grad()
    def update(self, pred, label):
        """Counts one batch. pred, label: integer tensors of the same shape [...]."""
        pred, label = torch.as_tensor(pred), torch.as_tensor(label)
        if pred.shape != label.shape:
            raise ValueError(f"prediction shape {tuple(pred.shape)} does not match label shape {tuple(label.shape)}")
        if pred.is_floating_point() or label.is_floating_point():
            dtypes = f"{pred.dtype} and {label.dtype}"
            raise ValueError(f"prediction and label must be integer tensors (class ids), got {dtypes}")
        n = self.n_classes
        pred, label = pred.reshape(-1).long(), label.to(pred.device).reshape(-1).long()
        valid = (label >= 0) & (label < n) & (pred >= 0) & (pred < n)
        self.histogram += torch.bincount(n * pred[valid] + label[valid], minlength=n * n).reshape(n, n).cpu()

    def assignment(self):
        """The cluster -> class assignment, a LongTensor [C] (identity without Hungarian)."""
        if not self.hungarian:
            return torch.arange(self.n_classes)
        if int(self.histogram.sum()) == 0:
            raise RuntimeError("no labelled pixel has been counted yet: call update() before compute() or map()")
        _, classes = linear_sum_assignment(self.histogram.numpy(), maximize=True)  # square: rows 0..C-1 in order
        return torch.from_numpy(classes.astype(np.int64))

    def matched_histogram(self, assignment=None):
        """The class × class histogram [C, C] after matching: rows predicted class, columns label."""
        matched = torch.zeros_like(self.histogram)
        matched[self.assignment() if assignment is None else assignment] = self.histogram
        return matched

    def compute(self):
        """Scores the accumulated histogram -> plain Python values: ``mIoU`` and ``pAcc`` in percent,
        ``iou`` per class in percent (NaN for a class with no tp+fp+fn), ``assignment`` (cluster id ->
        class id) and ``n_pixels`` (counted pixels)."""
        assignment = self.assignment()
        matched = self.matched_histogram(assignment).double()
        total = float(matched.sum())
        if total == 0:
            raise RuntimeError("no labelled pixel has been counted yet: call update() before compute()")
        tp = torch.diag(matched)
        iou = tp / (matched.sum(dim=1) + matched.sum(dim=0) - tp)  # tp / (tp + fp + fn)
        return {
            "mIoU": float(iou.nanmean()) * 100,
            "pAcc": float(tp.sum()) / total * 100,
            "iou": [float(v) * 100 for v in iou],
            "assignment": [int(c) for c in assignment],
            "n_pixels": int(total),
        }

    def map(self, pred):
        """pred: cluster ids, integer tensor or array [...] -> their matched classes (ids outside [0, C)
        kept), same type, shape and dtype."""
        assignment = self.assignment()
        is_numpy = isinstance(pred, np.ndarray)
        ids = torch.from_numpy(pred) if is_numpy else torch.as_tensor(pred)
        if ids.is_floating_point():
            raise ValueError(f"map() expects integer cluster ids, got {ids.dtype}")
        inside = (ids >= 0) & (ids < self.n_classes)
        matched = assignment.to(ids.device)[ids.long().clamp(0, self.n_classes - 1)]
        mapped = torch.where(inside, matched, ids.long()).to(ids.dtype)
        return mapped.numpy() if is_numpy else mapped
