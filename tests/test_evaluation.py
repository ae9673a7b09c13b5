"""test.py's evaluation loop and predict.py's whole-picture recipe against literal formulations (SPEC §7).

A stub backbone that is not flip-equivariant, a student head that differs from its EMA teacher,
a batch of three and one of two (so the CRF of one batch is collected while the next is
computed), the probe's CRF on: every pixel count of every metric must be the literal one.
"""

import argparse

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

import test as test_stage
from engine.segmenter import CauseSegmenter
from modules.segment import Cluster, SegmentMLP
from tests._stub_backbone import PatchBackbone
from utils.crf import CRFPool, dense_crf, unnormalize_to_uint8

C, D, R, SIDE, PATCH = 4, 12, 6, 6, 4
MEAN, STD = PatchBackbone.mean, PatchBackbone.std


def literal_evaluation(batches, backbone, segment, cluster, crf_alpha):
    """Per image, as SPEC §7 reads: flip-TTA teacher features, bilinear to the label size, cosine
    scores, argmax; the probe; the CRF of log_softmax(alpha * scores) and of the probe's one-hot map."""

    def as_image(tokens):
        return tokens.reshape(tokens.shape[0], SIDE, SIDE, -1).permute(0, 3, 1, 2)

    teacher = segment.head_ema
    weight, bias = segment.linear.f.weight[:, :, 0, 0], segment.linear.f.bias
    preds = {"cluster": [], "cluster_crf": [], "linear": [], "linear_crf": []}
    labels = []
    with torch.no_grad():
        for batch in batches:
            img, label = batch["img"], batch["label"]
            u = (as_image(teacher(backbone(img))) + as_image(teacher(backbone(img.flip(3)))).flip(3)) / 2
            feats = F.interpolate(u, size=label.shape[-2:], mode="bilinear", align_corners=False)
            scores = torch.einsum("brhw,cr->bchw", F.normalize(feats, dim=1), F.normalize(cluster.cluster_probe, dim=1))
            linear = torch.einsum("brhw,cr->bchw", feats, weight) + bias[None, :, None, None]
            pixels = unnormalize_to_uint8(img, MEAN, STD)
            for i in range(img.shape[0]):
                cluster_pred, linear_pred = scores[i].argmax(0), linear[i].argmax(0)
                preds["cluster"].append(cluster_pred)
                preds["linear"].append(linear_pred)
                preds["cluster_crf"].append(dense_crf(pixels[i], torch.log_softmax(crf_alpha * scores[i], 0)).argmax(0))
                one_hot = F.one_hot(linear_pred, C).permute(2, 0, 1).float()
                preds["linear_crf"].append(dense_crf(pixels[i], one_hot).argmax(0))
                labels.append(label[i])
    return preds, labels


def histogram(preds, labels):
    """[C, C] counts of (predicted id, label) over labelled pixels."""
    pred, label = torch.stack(preds).flatten().numpy(), torch.stack(labels).flatten().numpy()
    keep = (label >= 0) & (label < C)
    return torch.from_numpy(np.bincount(C * pred[keep] + label[keep], minlength=C * C).reshape(C, C))


def test_evaluation_counts_what_a_literal_per_image_evaluation_counts():
    torch.manual_seed(0)
    backbone = PatchBackbone(SIDE, D, PATCH).eval()
    segment = SegmentMLP(D, R, 8, C, dropout=0.0).eval()
    with torch.no_grad():
        for param in segment.head.parameters():  # the student moves away from the teacher
            param.add_(torch.randn_like(param))
    cluster = Cluster(D, R, 5, C)
    size = SIDE * PATCH
    batches = []
    for count in (3, 2):  # a full batch and a last, smaller one
        label = torch.randint(0, C, (count, size, size))
        label[:, :3] = -1  # unlabelled rows are not counted
        # smooth pictures, each its own: the CRF's colour kernel depends on which picture it sees
        img = F.interpolate(2 * torch.randn(count, 3, 3, 3), size=(size, size), mode="bilinear", align_corners=False)
        batches.append({"img": img + 0.05 * torch.randn(img.shape), "label": label})
    args = argparse.Namespace(n_classes=C, save_images=5, linear_crf=True, crf_alpha=2.5)

    segmenter = CauseSegmenter(backbone, segment, cluster, size, crf_alpha=2.5)
    with CRFPool(num_workers=0) as crf_pool:
        metrics, used, kept = test_stage.evaluate(args, batches, segmenter, {}, crf_pool)
    preds, labels = literal_evaluation(batches, backbone, segment, cluster, crf_alpha=2.5)

    assert sorted(metrics) == sorted(preds)
    for key in preds:
        assert torch.equal(metrics[key].histogram, histogram(preds[key], labels)), key
    assert metrics["cluster"].hungarian and not metrics["linear"].hungarian and not metrics["linear_crf"].hungarian
    assert torch.equal(used, torch.bincount(torch.stack(preds["cluster"]).flatten(), minlength=C))
    # the pictures kept for the panels: image, label, prediction and its CRF, in order
    assert len(kept) == 5  # every picture of both batches
    for i, (image, label, pred, crf_pred) in enumerate(kept):
        assert np.array_equal(image, unnormalize_to_uint8(batches[i // 3]["img"][i % 3], MEAN, STD))
        assert torch.equal(label, labels[i]) and torch.equal(pred, preds["cluster"][i])
        assert torch.equal(crf_pred, preds["cluster_crf"][i])


def literal_prediction(image, backbone, segment, cluster, window, stride, crf_alpha):
    """predict.py's recipe for one picture, literally: normalise, resize the short side to the window
    (antialiased), flip-TTA teacher scores of every window at the window's size, the mean over the
    windows covering each pixel, bilinear to the picture's size; argmax, or argmax of its CRF."""
    pixels = torch.from_numpy(np.array(image)).permute(2, 0, 1).float() / 255
    img = ((pixels - torch.tensor(MEAN)[:, None, None]) / torch.tensor(STD)[:, None, None])[None]
    height, width = img.shape[-2:]
    scale = window / min(height, width)
    small = F.interpolate(
        img, size=(round(height * scale), round(width * scale)), mode="bilinear", align_corners=False, antialias=True
    )[0]
    total, count = torch.zeros(C, *small.shape[-2:]), torch.zeros(small.shape[-2:])

    def starts(length):
        return sorted({min(offset, length - window) for offset in range(0, length, stride)})

    with torch.no_grad():
        for y in starts(small.shape[1]):
            for x in starts(small.shape[2]):
                crop = small[None, :, y : y + window, x : x + window]
                teacher = segment.head_ema
                u = (
                    sum(
                        torch.flip(
                            teacher(backbone(torch.flip(crop, [3]) if flip else crop))
                            .reshape(1, SIDE, SIDE, -1)
                            .permute(0, 3, 1, 2),
                            [3] if flip else [],
                        )
                        for flip in (False, True)
                    )
                    / 2
                )
                feats = F.interpolate(u, size=(window, window), mode="bilinear", align_corners=False)
                scores = torch.einsum(
                    "brhw,cr->bchw", F.normalize(feats, dim=1), F.normalize(cluster.cluster_probe, dim=1)
                )[0]
                total[:, y : y + window, x : x + window] += scores
                count[y : y + window, x : x + window] += 1
    scores = F.interpolate(
        (total / count)[None], size=(image.height, image.width), mode="bilinear", align_corners=False
    )[0]
    plain = scores.argmax(0)
    crf = dense_crf(np.asarray(image), torch.log_softmax(crf_alpha * scores, 0)).argmax(0)
    return plain, crf


def test_predict_image_is_the_literal_whole_picture_recipe():
    torch.manual_seed(1)
    backbone = PatchBackbone(SIDE, D, PATCH).eval()
    segment = SegmentMLP(D, R, 8, C, dropout=0.0).eval()
    with torch.no_grad():
        for param in segment.head.parameters():
            param.add_(torch.randn_like(param))
    cluster = Cluster(D, R, 5, C)
    window = SIDE * PATCH
    # A smooth picture twice the window's size on its long side, not a multiple of the stride.
    rgb = F.interpolate(torch.rand(1, 3, 4, 6), size=(37, 61), mode="bilinear", align_corners=False)[0]
    image = Image.fromarray((rgb.permute(1, 2, 0).numpy() * 255).astype(np.uint8))
    segmenter = CauseSegmenter(backbone, segment, cluster, window, crf_alpha=2.5)
    plain, crf = literal_prediction(image, backbone, segment, cluster, window, window // 2, crf_alpha=2.5)
    assert torch.equal(segmenter.predict(image, crf=False, overlap=0.5, batch_size=2), plain)
    assert torch.equal(segmenter.predict(image, crf=True, overlap=0.5, batch_size=2), crf)
    assert torch.equal(segmenter.predict(np.asarray(image), crf=True, overlap=0.5, batch_size=2), crf)
    assert plain.shape == (37, 61) and not torch.equal(plain, crf)
