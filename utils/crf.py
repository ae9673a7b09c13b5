"""Fully-connected CRF post-processing (Krähenbühl & Koltun) as CAUSE evaluates it (SPEC §7).

``dense_crf`` refines one image's class scores with the reference's settings (Gaussian
kernel ``sxy=1, compat=3``, bilateral kernel ``sxy=67, srgb=3, compat=4``, mean-field
iterations). It runs on the CPU; ``CRFPool`` spreads a batch over worker processes and
falls back to serial CRF, with a warning, whenever a worker fails or the batch times out,
so the pool can never hang an evaluation.
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

GAUSSIAN_SXY = 1
GAUSSIAN_COMPAT = 3
BILATERAL_SXY = 67
BILATERAL_SRGB = 3
BILATERAL_COMPAT = 4


def unnormalize_to_uint8(img, mean, std):
    """Undoes the input normalisation and quantises to 8 bits, as the reference does.

    img: normalised float tensor [B, 3, H, W] (or [3, H, W]) -> uint8 RGB array
    [B, H, W, 3] (or [H, W, 3]). The reference inverts ``Normalize`` with two more
    ``Normalize`` transforms (divide by ``1/std``, add ``mean``) and quantises with
    ``to_pil_image`` (multiply by 255, truncate); the same float32 operations are used
    here, after a clamp to [0, 1], so the CRF sees the reference's pixels.
    """
    x = torch.as_tensor(img).detach().to("cpu", torch.float32)
    squeeze = x.ndim == 3
    if squeeze:
        x = x.unsqueeze(0)
    if x.ndim != 4 or x.shape[1] != 3:
        raise ValueError(f"expected a normalised image batch [B, 3, H, W], got shape {tuple(x.shape)}")
    inv_std = torch.tensor([1.0 / s for s in std], dtype=torch.float32).view(1, 3, 1, 1)
    neg_mean = torch.tensor([-m for m in mean], dtype=torch.float32).view(1, 3, 1, 1)
    x = x.div(inv_std).sub(neg_mean)
    pixels = x.clamp(0.0, 1.0).mul(255).to(torch.uint8).permute(0, 2, 3, 1).contiguous().numpy()
    return pixels[0] if squeeze else pixels


def _check_image(image):
    image = image.numpy() if isinstance(image, torch.Tensor) else np.asarray(image)
    if image.dtype != np.uint8 or image.ndim != 3 or image.shape[2] != 3:
        raise ValueError(
            f"dense_crf expects an RGB uint8 image [H, W, 3], got {image.dtype} array of "
            f"shape {image.shape} (use unnormalize_to_uint8 on normalised tensors)"
        )
    return image


def _check_scores(logits):
    scores = torch.as_tensor(logits).detach().to("cpu", torch.float32)
    if scores.ndim != 3:
        raise ValueError(f"dense_crf expects class scores [C, h, w], got shape {tuple(scores.shape)}")
    return scores


def dense_crf(image, logits, iters=10):
    """One image's CRF marginals.

    image: RGB uint8 [H, W, 3] (numpy or torch); logits: class scores [C, h, w] (torch or
    numpy), for CAUSE ``log_softmax(3 * cosine)`` -> probabilities float32 [C, H, W].
    The scores are resized bilinearly to the image size and turned into probabilities;
    the bilateral kernel sees the image in BGR order, as the reference passes it.
    """
    image = _check_image(image)
    scores = _check_scores(logits)
    height, width = image.shape[:2]
    n_classes = scores.shape[0]
    scores = F.interpolate(scores.unsqueeze(0), size=(height, width), mode="bilinear", align_corners=False)[0]
    probs = F.softmax(scores, dim=0).numpy()
    unary = np.ascontiguousarray(dcrf_utils.unary_from_softmax(probs))
    crf = dcrf.DenseCRF2D(width, height, n_classes)
    crf.setUnaryEnergy(unary)
    crf.addPairwiseGaussian(sxy=GAUSSIAN_SXY, compat=GAUSSIAN_COMPAT)
    bgr = np.ascontiguousarray(image[:, :, ::-1])
    crf.addPairwiseBilateral(sxy=BILATERAL_SXY, srgb=BILATERAL_SRGB, rgbim=bgr, compat=BILATERAL_COMPAT)
    marginals = crf.inference(iters)
    return torch.from_numpy(np.array(marginals, dtype=np.float32).reshape(n_classes, height, width))


def _crf_task(task):
    image, scores, iters = task
    return dense_crf(image, scores, iters).numpy()


def _init_worker():
    # One CRF per worker process: torch must not spread each one over every core as well.
    torch.set_num_threads(1)
    # Ctrl-C reaches the whole process group: the parent stops the pool, the workers stay quiet.
    signal.signal(signal.SIGINT, signal.SIG_IGN)


def _prepare_batch(images, logits, iters):
    """Validates a batch and returns the per-image tasks (image, float32 scores, iters)."""
    if isinstance(images, torch.Tensor):
        images = images.cpu().numpy()
    images = [_check_image(image) for image in images]
    scores = torch.as_tensor(logits).detach().to("cpu", torch.float32)
    if scores.ndim != 4:
        raise ValueError(f"expected class scores [B, C, h, w], got shape {tuple(scores.shape)}")
    if len(images) != scores.shape[0]:
        raise ValueError(f"got {len(images)} images but class scores for {scores.shape[0]}")
    if len({image.shape for image in images}) > 1:
        raise ValueError(
            f"all images of a CRF batch must have the same size, got {sorted({image.shape for image in images})}"
        )
    scores = scores.numpy()
    return [(image, scores[i], int(iters)) for i, image in enumerate(images)]


def _stack(outputs):
    if not outputs:
        return torch.zeros(0, dtype=torch.float32)
    return torch.from_numpy(np.stack(outputs))


@dataclass(eq=False)
class CRFJob:
    """A batch submitted to a ``CRFPool``; ``result()`` returns its marginals [B, C, H, W].

    Falls back to serial CRF, with a ``RuntimeWarning``, when the pool fails, when the
    result takes longer than the pool's ``timeout`` (counted from the ``result()`` call), or
    when the pool was restarted after another batch failed.
    """

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
        return _stack(self.outputs)

    def _collect(self):
        if self.pending is None and self.error is None:
            return [_crf_task(task) for task in self.tasks]
        error = self.error
        if error is None and self.worker_pool is not self.crf_pool._pool:
            error = RuntimeError("the pool was restarted after another batch failed")
        if error is None:
            try:
                return self.pending.get(self.crf_pool.timeout)
            except Exception as failure:
                error = failure
                self.crf_pool._discard_pool()
        reason = (
            "timed out"
            if isinstance(error, multiprocessing.TimeoutError)
            else f"failed ({type(error).__name__}: {error})"
        )
        warnings.warn(
            f"CRF worker pool {reason}; computing the CRF of this batch serially", RuntimeWarning, stacklevel=3
        )
        return [_crf_task(task) for task in self.tasks]


class CRFPool:
    """A process pool for batched dense CRF, created once and reused across batches.

    Use it as a context manager around the whole evaluation loop::

        with CRFPool(num_workers=8) as crf_pool:
            for batch in loader:
                probs = crf_pool(images_uint8, log_probs)   # [B, C, H, W]

    or submit a batch and collect it later, so that the workers run while the caller
    computes the next batch: ``job = crf_pool.submit(images, log_probs)`` ... ``job.result()``.

    Workers are started lazily (``spawn`` by default, which is safe in torchrun/DDP
    processes that already hold CUDA or NCCL state). If a worker raises, dies, or a batch's
    result takes longer than ``timeout`` seconds, the pool is torn down, a ``RuntimeWarning``
    is issued and that batch (and any other batch still in the old pool) is computed
    serially; the next batch starts a fresh pool.

    Args:
        num_workers: worker processes; ``None`` uses ``os.cpu_count()``, ``0`` runs serially
            (when ``result()`` is called).
        timeout: seconds ``result()`` waits for one batch before falling back to serial CRF.
        context: multiprocessing start method (``"spawn"``, ``"forkserver"`` or ``"fork"``).
    """

    def __init__(self, num_workers=None, timeout=300.0, context="spawn"):
        if num_workers is None:
            num_workers = os.cpu_count() or 1
        if int(num_workers) < 0:
            raise ValueError(f"num_workers must be >= 0, got {num_workers}")
        self.num_workers = int(num_workers)
        self.timeout = timeout
        self.context = context
        self._pool = None

    def __enter__(self):
        return self

    def __exit__(self, exc_type, exc, traceback):
        if exc_type is None:
            self.close()
        else:
            self._discard_pool()
        return False

    def _get_pool(self):
        if self._pool is None:
            ctx = multiprocessing.get_context(self.context)
            self._pool = ctx.Pool(self.num_workers, initializer=_init_worker)
        return self._pool

    def _discard_pool(self):
        pool, self._pool = self._pool, None
        if pool is not None:
            pool.terminate()
            pool.join()

    def close(self):
        """Lets the workers finish and stops them."""
        pool, self._pool = self._pool, None
        if pool is not None:
            pool.close()
            pool.join()

    def submit(self, images, logits, iters=10):
        """Starts a batch and returns at once: images uint8 RGB [B, H, W, 3] (array, tensor or
        list); logits [B, C, h, w] -> a ``CRFJob`` whose ``result()`` is [B, C, H, W] float32."""
        tasks = _prepare_batch(images, logits, iters)
        if self.num_workers == 0 or not tasks:
            return CRFJob(self, tasks)
        try:
            worker_pool = self._get_pool()
            return CRFJob(self, tasks, worker_pool, worker_pool.map_async(_crf_task, tasks, chunksize=1))
        except Exception as error:
            self._discard_pool()
            return CRFJob(self, tasks, error=error)

    def __call__(self, images, logits, iters=10):
        """images: uint8 RGB [B, H, W, 3] (array, tensor or list); logits: [B, C, h, w]
        -> CRF marginals float32 [B, C, H, W]."""
        return self.submit(images, logits, iters).result()
