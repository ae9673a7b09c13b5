import json
import os
import warnings

import numpy as np
import pydensecrf.densecrf as dcrf
import pydensecrf.utils as dcrf_utils
import pytest
import torch
import torch.nn.functional as F
import torchvision.transforms.functional as VF

from utils.crf import CRFPool, dense_crf, unnormalize_to_uint8

MEAN = (0.485, 0.456, 0.406)
STD = (0.229, 0.224, 0.225)


def two_region_problem(seed, height=24, width=32, noise=0.6):
    """A two-colour image and noisy log-probabilities of its two regions."""
    rng = np.random.default_rng(seed)
    image = np.zeros((height, width, 3), np.uint8)
    image[:, : width // 2] = (200, 40, 30)
    image[:, width // 2 :] = (30, 60, 210)
    truth = np.zeros((height, width), np.int64)
    truth[:, width // 2 :] = 1
    onehot = np.stack([truth == 0, truth == 1]).astype(np.float32)
    scores = 3 * (onehot + rng.normal(0, noise, onehot.shape)).astype(np.float32)
    return image, torch.log_softmax(torch.from_numpy(scores), dim=0), truth


def test_crf_cleans_a_noisy_two_region_map():
    image, logits, truth = two_region_problem(0)
    error_before = (logits.argmax(0).numpy() != truth).mean()
    probs = dense_crf(image, logits, iters=10)
    error_after = (probs.argmax(0).numpy() != truth).mean()
    assert error_before > 0.08
    assert error_after < 0.2 * error_before
    assert probs.dtype == torch.float32
    assert torch.allclose(probs.sum(0), torch.ones(24, 32), atol=1e-4)


def test_dense_crf_matches_the_literal_reference_recipe():
    image, logits, _ = two_region_problem(1, noise=1.0)
    low_res = logits[:, ::2, ::2].contiguous()
    resized = F.interpolate(low_res[None], size=(24, 32), mode="bilinear", align_corners=False)[0]
    probs = F.softmax(resized, dim=0).numpy()
    crf = dcrf.DenseCRF2D(32, 24, 2)
    crf.setUnaryEnergy(np.ascontiguousarray(dcrf_utils.unary_from_softmax(probs)))
    crf.addPairwiseGaussian(sxy=1, compat=3)
    crf.addPairwiseBilateral(sxy=67, srgb=3, rgbim=np.ascontiguousarray(image[:, :, ::-1]), compat=4)
    expected = np.array(crf.inference(5)).reshape(2, 24, 32)
    out = dense_crf(image, low_res.numpy(), iters=5)
    assert out.shape == (2, 24, 32)
    assert np.array_equal(out.numpy(), expected)


def test_dense_crf_rejects_bad_input():
    image, logits, _ = two_region_problem(2)
    with pytest.raises(ValueError, match="uint8 image"):
        dense_crf(image.astype(np.float32), logits)
    with pytest.raises(ValueError, match=r"\[C, h, w\]"):
        dense_crf(image, logits[None])


def test_unnormalize_matches_the_reference_inverse_transform():
    rng = np.random.default_rng(3)
    pixels = rng.integers(0, 256, (2, 3, 8, 8), dtype=np.uint8)
    normalised = VF.normalize(torch.from_numpy(pixels).float() / 255, MEAN, STD)
    out = unnormalize_to_uint8(normalised, MEAN, STD)
    assert out.shape == (2, 8, 8, 3) and out.dtype == np.uint8
    for i in range(2):
        inverse = VF.normalize(
            VF.normalize(normalised[i], [0.0] * 3, [1 / s for s in STD]), [-m for m in MEAN], [1.0] * 3
        )
        assert np.array_equal(out[i], np.array(VF.to_pil_image(inverse)))
    # truncation, not rounding: values never exceed the original pixel
    assert np.all(out.astype(int) - pixels.transpose(0, 2, 3, 1) <= 0)
    assert np.all(out.astype(int) - pixels.transpose(0, 2, 3, 1) >= -1)
    assert unnormalize_to_uint8(normalised[0], MEAN, STD).shape == (8, 8, 3)


def test_unnormalize_clamps_out_of_range_values():
    far = torch.tensor([-10.0, 10.0]).view(1, 1, 1, 2).expand(1, 3, 1, 2)
    out = unnormalize_to_uint8(far, MEAN, STD)
    assert out[0, 0, 0].tolist() == [0, 0, 0]
    assert out[0, 0, 1].tolist() == [255, 255, 255]


def serial_crf(images, logits, iters):
    return CRFPool(num_workers=0)(images, logits, iters=iters)


def batch_problem():
    problems = [two_region_problem(seed) for seed in range(3)]
    images = np.stack([p[0] for p in problems])
    logits = torch.stack([p[1] for p in problems])[:, :, ::2, ::2]
    return images, logits


def test_pool_serial_and_single_image_results_are_identical():
    images, logits = batch_problem()
    serial = serial_crf(images, logits, iters=3)
    assert serial.shape == (3, 2, 24, 32)
    for i in range(3):
        assert torch.equal(serial[i], dense_crf(images[i], logits[i], iters=3))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        with CRFPool(num_workers=2, timeout=120) as pool:
            first = pool(list(images), logits, iters=3)
            second = pool(torch.from_numpy(images), logits.numpy(), iters=3)
            # batches in flight together, collected out of order
            jobs = [pool.submit(images[i : i + 2], logits[i : i + 2], iters=3) for i in range(0, 3, 2)]
            jobs.append(pool.submit(images[::-1].copy(), logits.flip(0), iters=3))
            results = [job.result() for job in reversed(jobs)][::-1]
            assert torch.equal(jobs[0].result(), results[0])  # a job can be read twice
    assert torch.equal(first, serial)
    assert torch.equal(second, serial)
    assert torch.equal(torch.cat(results[:2]), serial)
    assert torch.equal(results[2], serial.flip(0))


class FailingPool:
    def map_async(self, *args, **kwargs):
        raise RuntimeError("worker died")

    def terminate(self):
        pass

    def join(self):
        pass


def test_worker_failure_falls_back_to_serial(monkeypatch):
    images, logits = batch_problem()
    serial = serial_crf(images, logits, iters=3)
    pool = CRFPool(num_workers=2)
    monkeypatch.setattr(pool, "_get_pool", FailingPool)
    with pytest.warns(RuntimeWarning, match="worker died"):
        out = pool(images, logits, iters=3)
    assert torch.equal(out, serial)
    assert pool._pool is None


def test_batch_input_errors():
    images, logits = batch_problem()
    with pytest.raises(ValueError, match="got 2 images but class scores for 3"):
        CRFPool(num_workers=0)(images[:2], logits)
    with pytest.raises(ValueError, match=r"\[B, C, h, w\]"):
        CRFPool(num_workers=0).submit(images, logits[0])
    with pytest.raises(ValueError, match="num_workers"):
        CRFPool(num_workers=-1)


def test_serial_pool_computes_when_the_result_is_read(monkeypatch):
    images, logits = batch_problem()
    calls = []
    monkeypatch.setattr("utils.crf._crf_task", lambda task: calls.append(task) or np.zeros((2, 24, 32), np.float32))
    job = CRFPool(num_workers=0).submit(images, logits, iters=3)
    assert calls == []
    assert job.result().shape == (3, 2, 24, 32) and len(calls) == 3


def test_timeout_falls_back_to_serial_for_every_batch_in_flight_then_a_fresh_pool():
    images, logits = batch_problem()
    serial = serial_crf(images, logits, iters=3)
    with CRFPool(num_workers=1, timeout=0.0) as pool:
        first = pool.submit(images, logits, iters=3)
        second = pool.submit(images, logits, iters=3)
        with pytest.warns(RuntimeWarning, match="timed out"):
            assert torch.equal(first.result(), serial)
        with pytest.warns(RuntimeWarning, match="restarted"):
            assert torch.equal(second.result(), serial)
        pool.timeout = 120
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            assert torch.equal(pool.submit(images, logits, iters=3).result(), serial)


class SynchronousPool(CRFPool):
    """Computes each batch's CRF when it is submitted, in this process."""

    def __init__(self, num_workers=None, timeout=300.0):
        super().__init__(num_workers=0, timeout=timeout)

    def submit(self, images, logits, iters=10):
        job = super().submit(images, logits, iters)
        job.result()
        return job


def test_evaluation_with_overlapped_crf_equals_the_synchronous_one(tmp_path, toy_dirs, dino_ckpt, monkeypatch):
    import test as test_stage
    from engine.cli import artifact_store
    from modules.segment import Cluster, SegmentMLP
    from tests._stage_flags import flags, parse
    from utils.atomic import atomic_np_save, atomic_torch_save

    def evaluate(pool_flags, linear_crf="yes"):
        # 8 images in batches of 3, panels for 4: the kept CRF maps span two batches.
        extra = ["--baseline", "none", "--save_images", "4", "--batch_size", "3", "--linear_crf", linear_crf]
        args = parse(test_stage, flags(tmp_path, dino_ckpt, toy_dirs["val"], "mlp", extra + pool_flags))
        store = artifact_store(args)
        if not os.path.exists(store.path("codebook")):
            torch.manual_seed(0)
            atomic_np_save(
                np.random.default_rng(0).standard_normal((16, 48)).astype(np.float32), store.path("codebook")
            )
            atomic_torch_save(SegmentMLP(48, 8, 16, 6).state_dict(), store.path("segment"))
            atomic_torch_save(Cluster(48, 8, 16, 6).state_dict(), store.path("cluster"))
        test_stage.main(args)
        run = next(tmp_path.rglob("metrics.json")).parent
        panels = {p.name: p.read_bytes() for p in sorted((run / "panels").glob("*.png"))}
        return json.loads((run / "metrics.json").read_text()), panels

    with monkeypatch.context() as patch:
        patch.setattr(test_stage, "CRFPool", SynchronousPool)
        synchronous, sync_panels = evaluate([])
        without_linear_crf, _ = evaluate([], linear_crf="no")
        flat_unary, _ = evaluate(["--crf_alpha", "1e-12"], linear_crf="no")
    overlapped, panels = evaluate(["--crf_workers", "2"])
    assert set(synchronous) >= {"cluster", "cluster_crf", "linear", "linear_crf"}
    assert overlapped == synchronous
    assert len(panels) == 4 and panels == sync_panels
    assert "linear_crf" not in without_linear_crf
    assert without_linear_crf["cluster_crf"] == synchronous["cluster_crf"]
    # --crf_alpha reaches the CRF's unary (1e-12: uniform scores) and nothing else.
    assert flat_unary["cluster"] == synchronous["cluster"]
    assert flat_unary["cluster_crf"] != synchronous["cluster_crf"]
