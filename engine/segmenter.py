"""A trained CAUSE model as one ``nn.Module``: the inference of test.py and predict.py, usable from Python.

    >>> segmenter = CauseSegmenter.from_run(run_dir)  # <out>/<dataset>/<baseline>/<K>/<head>, or its metrics.json
    >>> scores = segmenter(images)  # normalised [B, 3, H, W] -> cosine scores [B, C, H, W]
    >>> scores.shape[1] == segmenter.cluster.cluster_probe.shape[0]
    True
    >>> labels = segmenter.predict(photo)  # a PIL image or uint8 [H, W, 3] -> int64 [H, W] cluster ids
    >>> labels.shape == (photo.height, photo.width)
    True

Nothing is written or downloaded.
"""

import json
import math
import os
from argparse import Namespace

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from PIL import Image

from engine.build import describe_cluster, describe_segment, load_trained
from engine.cli import artifact_store
from engine.config import TEST_RESOLUTION, round_to_patch
from engine.store import ArtifactMismatchError, ArtifactStore
from loader.images import to_display_rgb
from loader.transforms import image_to_tensor
from models.backbone import load_backbone
from modules import inference
from utils.crf import CRFPool
from utils.errors import InputNotFoundError, InvalidInputError


class CauseSegmenter(nn.Module):
    """Frozen backbone, segment head (its EMA teacher) and cluster probe, with flip TTA and the dense CRF.

    ``window``: the square input size of whole-picture inference (the TR head's training resolution,
    else the test resolution); ``crf_alpha``: the CRF's unary is ``log_softmax(crf_alpha * scores)``;
    ``classes``: optional ``(assignment [C] cluster -> class, class names)`` from test.py's matching.
    Device- and dtype-aware like any module (``.to("cuda")``, autocast).
    """

    def __init__(self, backbone, segment, cluster, window, crf_alpha=3.0, classes=None):
        super().__init__()
        self.backbone, self.segment, self.cluster = backbone, segment.eval(), cluster
        self.window, self.crf_alpha, self.classes = window, crf_alpha, classes

    @classmethod
    def from_files(cls, ckpt, segment, cluster, codebook=None, head=None, test_resolution=TEST_RESOLUTION, **options):
        """The model of a backbone checkpoint (``ckpt``, None for ``arch``'s random weights) and trained heads.

        The head (``mlp``/``tr``, checked when given), its sizes and the classes are read from the weights;
        the TR head needs its ``codebook`` (modular.npy). ``options``: ``family``, ``arch``, ``num_heads``,
        ``norm`` of the backbone (``models.backbone.load_backbone``), ``crf_alpha``, ``classes``.
        """
        backbone_options = {k: options.pop(k) for k in ("family", "arch", "num_heads", "norm") if k in options}
        backbone = load_backbone(ckpt, **backbone_options)
        given = {"segment": os.fspath(segment), "cluster": os.fspath(cluster)}
        files = ArtifactStore("", "", 0, head, {**given, "codebook": codebook and os.fspath(codebook)})
        held = describe_segment(files.state("segment"))
        if held["head"] is None or head not in (None, held["head"]):
            heads = f"{held['head'] or 'no CAUSE'} head, not {head or 'a CAUSE one'}"
            raise ArtifactMismatchError(f"{segment} holds {heads}")
        clusters = describe_cluster(files.state("cluster"))
        grid = math.isqrt(held["num_queries"] or 0) * backbone.patch_size
        resolution = grid or round_to_patch(test_resolution, backbone.patch_size)
        cfg = Namespace(**held, num_codebook=clusters["num_codebook"], train_resolution=resolution)
        store = ArtifactStore("", "", cfg.num_codebook, cfg.head, files.given)
        segment_module, cluster_module = load_trained(cfg, store, backbone.embed_dim, torch.device("cpu"))
        return cls(backbone, segment_module, cluster_module, resolution, **options)

    @classmethod
    def from_run(cls, path, **options):
        """The model a run trained: its run directory ``<out>/<dataset>/<baseline>/<K>/<head>`` or its metrics.json.

        The run's configuration (config_test.json, else config_fine_tuning.json) names the backbone and the
        files; with a metrics.json, ``classes`` maps the clusters to their Hungarian-matched classes.
        """
        run_dir = os.path.dirname(path) if os.path.isfile(path) else path
        configs = [os.path.join(run_dir, f"config_{name}.json") for name in ("test", "fine_tuning")]
        found = [p for p in configs if os.path.isfile(p)]
        if not found:
            raise InputNotFoundError(f"{run_dir} holds no config_test.json or config_fine_tuning.json: not a run dir")
        with open(found[0]) as f:
            cfg = Namespace(**json.load(f))
        store = artifact_store(cfg)
        metrics = os.path.join(run_dir, "metrics.json")
        if os.path.isfile(metrics) and "classes" not in options:
            with open(metrics) as f:
                result = json.load(f)
            key = "cluster_crf" if "cluster_crf" in result else "cluster"
            options["classes"] = (torch.tensor(result[key]["assignment"]), result.get("class_names", []))
        options.setdefault("crf_alpha", getattr(cfg, "crf_alpha", 3.0))
        backbone = {"family": cfg.family, "arch": cfg.arch, "num_heads": cfg.num_heads, "norm": cfg.norm}
        files = {kind: store.path(kind) for kind in ("segment", "cluster", "codebook")}
        resolution = getattr(cfg, "test_resolution", None) or TEST_RESOLUTION
        return cls.from_files(
            cfg.ckpt or None, head=cfg.head, test_resolution=resolution, **files, **backbone, **options
        )

    @property
    def device(self):
        return self.cluster.cluster_probe.device

    def features(self, img):
        """img: [B, 3, H, W] normalised -> (flip-TTA teacher features u [B, r, h, w] in the probe's dtype,
        backbone tokens [B, N, D])."""
        u, tokens = inference.flip_tta_features(self.backbone, self.segment.head_ema, img)
        return u.to(self.cluster.cluster_probe.dtype), tokens

    def scores(self, feats):
        """feats: [B, r, H, W] (``features`` upsampled) -> cosine scores to the cluster centroids [B, C, H, W]."""
        return self.cluster.scores(feats)

    def input_side(self, height, width):
        """The square side the heads see for an input of ``height`` x ``width``: the input's own when it is a
        square of whole patches (and, for the TR head, the side it was trained at), else ``window``."""
        tr_side = math.isqrt(getattr(self.segment.head_ema, "num_queries", 0)) * self.backbone.patch_size
        fits = height == width and height % self.backbone.patch_size == 0 and tr_side in (0, height)
        return height if fits else self.window

    def forward(self, img):
        """img: [B, 3, H, W] normalised (``mean``/``std`` of the backbone) -> cluster scores [B, C, H, W].

        The heads work on square token grids: any other input is resized (bilinear) to ``window`` x ``window``
        (its aspect is not kept) and the scores resized back; ``predict`` tiles a picture with square windows.
        """
        size, side = img.shape[-2:], self.input_side(*img.shape[-2:])
        if tuple(size) != (side, side):
            img = inference.upsample(img, (side, side))
        return self.scores(inference.upsample(self.features(img)[0], size))

    @torch.no_grad()
    def picture_scores(self, image, overlap=0.5, batch_size=4):
        """A displayed RGB picture -> scores [C, h, w] of its copy with a short side of ``window`` pixels, averaged
        over square windows ``overlap`` apart, each with flip TTA (on this module's device, float32)."""
        if not 0.0 <= overlap < 1.0:
            raise InvalidInputError(f"the window overlap must be in [0, 1), got {overlap}")
        img = image_to_tensor(image, self.backbone.mean, self.backbone.std).to(self.device)[None]
        small = inference.resize_short_side(img, self.window)[0]
        stride = max(1, round(self.window * (1.0 - overlap)))
        return inference.sliding_window_scores(small, self.window, stride, self, batch_size)

    def labels_job(self, image, scores, crf=True, crf_max_megapixels=1.0, pool=None):
        """The labels [H, W] of a picture from its ``picture_scores``, as a job whose ``result()`` gives them: the
        argmax of the upsampled scores, or the dense CRF's (in ``pool``, a utils.crf.CRFPool, when given) at the
        picture's size or on a copy of at most ``crf_max_megapixels`` whose labels are then enlarged (nearest)."""
        size = (image.height, image.width)
        if not crf:
            return LabelsJob(None, inference.upsample_argmax(scores, size).cpu(), size)
        crf_h, crf_w = inference.crf_size(*size, int(crf_max_megapixels * 1e6))
        small = image if (crf_h, crf_w) == size else image.resize((crf_w, crf_h), Image.Resampling.BILINEAR)
        logits = torch.log_softmax(scores.float().cpu() * self.crf_alpha, dim=0)
        return LabelsJob((pool or CRFPool(num_workers=0)).submit(np.asarray(small)[None], logits[None]), None, size)

    @torch.no_grad()
    def predict(self, image, crf=True, overlap=0.5, crf_max_megapixels=1.0, batch_size=4, matched=False):
        """A picture (PIL image, or uint8 [H, W, 3] / [H, W]) -> int64 [H, W] cluster ids at its own size (CPU).

        Sliding windows with flip TTA, then the dense CRF (``crf``); ``matched``: the Hungarian-matched class
        ids of test.py instead (needs ``classes``).
        """
        image = to_display_rgb(Image.fromarray(np.asarray(image)) if not isinstance(image, Image.Image) else image)
        scores = self.picture_scores(image, overlap, batch_size)
        labels = self.labels_job(image, scores, crf, crf_max_megapixels).result()
        if matched and self.classes is None:
            raise InvalidInputError("matched labels need the classes of a test.py run (from_run, or classes=...)")
        return self.classes[0][labels] if matched else labels


class LabelsJob:
    """Labels [H, W] now (``labels``) or from a CRF job (its marginals at ``size`` or below, enlarged by nearest)."""

    def __init__(self, crf_job, labels, size):
        self.crf_job, self.labels, self.size = crf_job, labels, size

    def result(self):
        if self.labels is None:
            labels = self.crf_job.result()[0].argmax(0)
            self.labels = F.interpolate(labels[None, None].float(), size=self.size, mode="nearest")[0, 0].long()
        return self.labels
