"""Fully-connected CRF post-processing (Krähenbühl & Koltun) as CAUSE evaluates it (SPEC §7).

``dense_crf`` refines one image's class scores on the CPU with the reference's settings (Gaussian kernel ``sxy=1,
compat=3``, bilateral ``sxy=67, srgb=3, compat=4``). ``CRFPool`` spreads a batch over worker processes and falls
back to serial CRF, with a warning, when a worker fails or the batch times out: it never hangs an evaluation.
"""

import multiprocessing
import os
import signal
import warnings
from dataclasses import dataclass, field

import numpy as np
import pydensecrf.densecrf as dcrf
import pydensecrf.utils as dcrf_utils
import torch
import torch.nn.functional as F


def unnormalize_to_uint8(img, mean, std):
    """img: normalised float tensor [B, 3, H, W] (or [3, H, W]) -> uint8 RGB array [B, H, W, 3] (or [H, W, 3]),
    with the reference's float32 operations (divide by ``1/std``, add ``mean``, clamp, times 255, truncated)."""
    x = torch.as_tensor(img).detach().to("cpu", torch.float32)
    single = x.ndim == 3
    x = x[None] if single else x
    if x.ndim != 4 or x.shape[1] != 3:
        raise ValueError(f"expected a normalised image batch [B, 3, H, W], got shape {tuple(x.shape)}")
    inv_std = torch.tensor([1.0 / s for s in std], dtype=torch.float32).view(1, 3, 1, 1)
    neg_mean = torch.tensor([-m for m in mean], dtype=torch.float32).view(1, 3, 1, 1)
    x = x.div(inv_std).sub(neg_mean)
    pixels = x.clamp(0.0, 1.0).mul(255).to(torch.uint8).permute(0, 2, 3, 1).contiguous().numpy()
    return pixels[0] if single else pixels


def _check_image(image):
    image = image.numpy() if isinstance(image, torch.Tensor) else np.asarray(image)
    if image.dtype != np.uint8 or image.ndim != 3 or image.shape[2] != 3:
        got, hint = f"{image.dtype} array of shape {image.shape}", "use unnormalize_to_uint8 on normalised tensors"
        raise ValueError(f"dense_crf expects an RGB uint8 image [H, W, 3], got {got} ({hint})")
    return image


def _check_scores(logits, ndim, expected):
    scores = torch.as_tensor(logits).detach().to("cpu", torch.float32)
    if scores.ndim != ndim:
        raise ValueError(f"{expected}, got shape {tuple(scores.shape)}")
    return scores


def dense_crf(image, logits, iters=10):
    """One image's CRF marginals: image RGB uint8 [H, W, 3], logits class scores [C, h, w] (for CAUSE
    ``log_softmax(3 * cosine)``), numpy or torch -> probabilities float32 [C, H, W]. The scores are resized
    bilinearly to the image; the bilateral kernel sees the image in BGR order, as in the reference."""
    image, scores = _check_image(image), _check_scores(logits, 3, "dense_crf expects class scores [C, h, w]")
    (height, width), n_classes = image.shape[:2], scores.shape[0]
    scores = F.interpolate(scores[None], size=(height, width), mode="bilinear", align_corners=False)[0]
    crf = dcrf.DenseCRF2D(width, height, n_classes)
    crf.setUnaryEnergy(np.ascontiguousarray(dcrf_utils.unary_from_softmax(F.softmax(scores, dim=0).numpy())))
    crf.addPairwiseGaussian(sxy=1, compat=3)
    crf.addPairwiseBilateral(sxy=67, srgb=3, rgbim=np.ascontiguousarray(image[:, :, ::-1]), compat=4)
    marginals = np.array(crf.inference(iters), dtype=np.float32)
    return torch.from_numpy(marginals.reshape(n_classes, height, width))


def _crf_task(task):
    image, scores, iters = task
    return dense_crf(image, scores, iters).numpy()


def _init_worker():
    torch.set_num_threads(1)  # one CRF per worker process: torch must not spread each one over every core
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C reaches the process group: the parent stops the pool


@dataclass(eq=False)
class CRFJob:
    """A batch submitted to a ``CRFPool``; ``result()`` returns its marginals [B, C, H, W], computed serially with a
    ``RuntimeWarning`` when the pool fails, times out (from the ``result()`` call) or was restarted."""

    crf_pool: "CRFPool"
    tasks: list
    worker_pool: object | None = None  # the multiprocessing pool the batch went to
    pending: object | None = None  # its AsyncResult
    error: BaseException | None = None  # why the batch could not be submitted
    outputs: list | None = field(default=None, init=False, repr=False)

    def result(self):
        if self.outputs is None:
            self.outputs = self._collect()
            self.tasks = self.pending = self.worker_pool = None
        return torch.from_numpy(np.stack(self.outputs)) if self.outputs else torch.zeros(0, dtype=torch.float32)

    def _collect(self):
        error = self.error
        if self.pending is not None and self.worker_pool is not self.crf_pool._pool:
            error = RuntimeError("the pool was restarted after another batch failed")
        elif self.pending is not None:
            try:
                return self.pending.get(self.crf_pool.timeout)
            except Exception as failure:
                error = failure
                self.crf_pool.close(terminate=True)
        if error is not None:
            failed = f"failed ({type(error).__name__}: {error})"
            reason = "timed out" if isinstance(error, multiprocessing.TimeoutError) else failed
            message = f"CRF worker pool {reason}; computing the CRF of this batch serially"
            warnings.warn(message, RuntimeWarning, stacklevel=3)
        return [_crf_task(task) for task in self.tasks]


class CRFPool:
    """A process pool for batched dense CRF, reused across batches.

    ``with CRFPool(8) as crf_pool:`` around the evaluation loop, then ``crf_pool(images_uint8, log_probs)`` ->
    [B, C, H, W], or ``job = crf_pool.submit(...)`` and later ``job.result()``. Workers start lazily (``spawn``
    by default: safe beside CUDA or NCCL). If a worker raises, dies or a result takes over ``timeout`` seconds,
    the pool is torn down with a ``RuntimeWarning``, its batches are computed serially and the next batch
    starts a fresh pool. ``num_workers``: ``None`` uses ``os.cpu_count()``, ``0`` runs serially.
    """

    def __init__(self, num_workers=None, timeout=300.0, context="spawn"):
        num_workers = (os.cpu_count() or 1) if num_workers is None else int(num_workers)
        if num_workers < 0:
            raise ValueError(f"num_workers must be >= 0, got {num_workers}")
        self.num_workers, self.timeout, self.context, self._pool = num_workers, timeout, context, None

    def __enter__(self):
        return self

    def __exit__(self, exc_type, exc, traceback):
        self.close(terminate=exc_type is not None)

    def _get_pool(self):
        if self._pool is None:
            self._pool = multiprocessing.get_context(self.context).Pool(self.num_workers, initializer=_init_worker)
        return self._pool

    def close(self, terminate=False):
        """Lets the workers finish and stops them (``terminate``: stops them at once)."""
        pool, self._pool = self._pool, None
        if pool is not None:
            (pool.terminate if terminate else pool.close)()
            pool.join()

    def submit(self, images, logits, iters=10):
        """Starts a batch and returns at once: images uint8 RGB [B, H, W, 3] (array, tensor or list);
        logits [B, C, h, w] -> a ``CRFJob`` whose ``result()`` is [B, C, H, W] float32."""
        images = images.cpu().numpy() if isinstance(images, torch.Tensor) else images
        images = [_check_image(image) for image in images]
        scores = _check_scores(logits, 4, "expected class scores [B, C, h, w]")
        if len(images) != scores.shape[0]:
            raise ValueError(f"got {len(images)} images but class scores for {scores.shape[0]}")
        if len(shapes := {image.shape for image in images}) > 1:
            raise ValueError(f"all images of a CRF batch must have the same size, got {sorted(shapes)}")
        tasks = [(image, s, int(iters)) for image, s in zip(images, scores.numpy())]
        if self.num_workers == 0 or not tasks:
            return CRFJob(self, tasks)
        try:
            worker_pool = self._get_pool()
            return CRFJob(self, tasks, worker_pool, worker_pool.map_async(_crf_task, tasks, chunksize=1))
        except Exception as error:
            self.close(terminate=True)
            return CRFJob(self, tasks, error=error)

    def __call__(self, images, logits, iters=10):
        """The marginals float32 [B, C, H, W] of a batch (as ``submit`` takes it), computed now."""
        return self.submit(images, logits, iters).result()
