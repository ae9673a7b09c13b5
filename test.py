"""Evaluation — flip TTA, dense CRF, Hungarian-matched mIoU / pixel accuracy, pictures (SPEC §7).

    python test.py --dataset cocostuff27 --data_dir DATA --ckpt checkpoint/dino_vitbase8_pretrain.pth --head tr

Writes ``metrics.json``, ``iou.md``, ``confusion.png``, the panels of the first ``--save_images`` images and
``report.html`` (all on one self-contained page) into the run directory ``<out>/<dataset>/<baseline>/<K>/<head>/``.
``--segment``/``--cluster``/``--codebook`` evaluate trained heads given by path (e.g. the released ones). Evaluation
runs in one process (the first id of ``--gpu``).
"""

import json
import os
import warnings
from contextlib import nullcontext

import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm

from engine import cli
from engine.build import load_trained
from engine.config import STAGE3_NOTES, build_parser, count, str2bool
from engine.report import METRIC_ROWS, write_report
from engine.segmenter import CauseSegmenter
from engine.store import ProvenanceWarning
from loader.batches import make_loader
from loader.datasets import dataset_info
from modules.inference import upsample
from modules.kmeans import fit_kmeans, kmeans_assign
from modules.segment import image_to_tokens, tokens_to_image
from utils.atomic import atomic_write_bytes
from utils.crf import CRFPool, unnormalize_to_uint8
from utils.errors import InvalidInputError
from utils.metrics import UnsupervisedMetrics
from utils.visualize import dataset_colormap, plot_confusion, save_iou_table, save_panel

RANDOM_BACKBONE_NOTE = "note: the backbone is random (ckpt empty): these numbers check the pipeline, not the method"


def parser():
    p = build_parser(__doc__, stage="test")
    g = p.add_argument_group("evaluation")
    g.add_argument("--crf", type=str2bool, default=True, help="yes/no: also evaluate with the dense CRF")
    g.add_argument("--crf_workers", type=count, default=None, help="CRF processes (default: CPU count; 0 = serial)")
    g.add_argument("--linear_crf", type=str2bool, default=False, help="yes/no: the CRF on the linear probe too")
    g.add_argument("--baseline", choices=["kmeans", "none"], default="kmeans", help="k-means on tokens and features")
    g.add_argument("--kmeans_max_tokens", type=count, default=500_000, help="tokens k-means is fitted on, at most")
    g.add_argument("--save_images", type=count, default=8, help="panels written for the first N images")
    return p


def fit_baselines(cfg, loader, segmenter):
    """k-means with C clusters on the val set's backbone tokens and head features -> {"kmeans", "kmeans_head"}."""
    gen = torch.Generator().manual_seed(cfg.seed)
    per_image = max(1, cfg.kmeans_max_tokens // len(loader.dataset))
    samples = {"kmeans": [], "kmeans_head": []}
    for batch in tqdm(loader, desc="[test] k-means features", dynamic_ncols=True, leave=False):
        u, tokens = segmenter.features(batch["img"].to(segmenter.device))
        for key, feats in (("kmeans", tokens.float().cpu()), ("kmeans_head", image_to_tokens(u).cpu())):
            n = min(per_image, feats.shape[1])
            idx = torch.stack([torch.randperm(feats.shape[1], generator=gen)[:n] for _ in range(feats.shape[0])])
            samples[key].append(torch.gather(feats, 1, idx[..., None].expand(-1, -1, feats.shape[2])).flatten(0, 1))
    return {k: fit_kmeans(torch.cat(v), cfg.n_classes, seed=cfg.seed).to(segmenter.device) for k, v in samples.items()}


def evaluate(cfg, loader, segmenter, centroids, crf_pool):
    """Every metric over the val set. The CRF of a batch runs in ``crf_pool`` while the backbone
    computes the next batch; the probe's CRF only with ``--linear_crf``."""
    linear_crf, n = crf_pool is not None and cfg.linear_crf, cfg.n_classes
    metrics = {key: UnsupervisedMetrics(n) for key in ("cluster", "cluster_crf", *centroids)}
    for key in ("linear", "linear_crf") if linear_crf else ("linear",):
        metrics[key] = UnsupervisedMetrics(n, hungarian=False)
    used, kept, pending = torch.zeros(n, dtype=torch.long), [], None

    def finish_crf(job, label, first_kept, end_kept):
        both = job.result().argmax(1).to(label.device)
        metrics["cluster_crf"].update(both[: len(label)], label)
        if linear_crf:
            metrics["linear_crf"].update(both[len(label) :], label)
        for i in range(first_kept, end_kept):
            kept[i] = (*kept[i][:3], both[i - first_kept].cpu())

    for batch in tqdm(loader, desc="[test]", dynamic_ncols=True, leave=False):
        img, label = batch["img"].to(segmenter.device), batch["label"].to(segmenter.device)
        u, tokens = segmenter.features(img)
        feats = upsample(u, label.shape[-2:])
        scores = segmenter.scores(feats)
        pred, lin_pred = scores.argmax(1), tokens_to_image(segmenter.segment.linear(image_to_tokens(feats))).argmax(1)
        metrics["cluster"].update(pred, label)
        metrics["linear"].update(lin_pred, label)
        used += torch.bincount(pred.flatten().cpu(), minlength=n)
        for key, centres in centroids.items():
            clusters = kmeans_assign(tokens_to_image(tokens.float()) if key == "kmeans" else u, centres)
            metrics[key].update(F.interpolate(clusters[:, None].float(), size=label.shape[-2:])[:, 0].long(), label)
        images = unnormalize_to_uint8(img.float().cpu(), segmenter.backbone.mean, segmenter.backbone.std)
        first_kept, room = len(kept), min(len(img), cfg.save_images - len(kept))
        kept += [(images[i], label[i].cpu(), pred[i].cpu(), None) for i in range(room)]
        if crf_pool is not None:  # one pool job per batch: the scores, and the probe's one-hot prediction if asked
            logits, crf_images = torch.log_softmax(scores * segmenter.crf_alpha, dim=1), images
            if linear_crf:
                logits = torch.cat([logits, F.one_hot(lin_pred, n).permute(0, 3, 1, 2).float()])
                crf_images = np.concatenate([images, images])
            job = (crf_pool.submit(crf_images, logits.cpu()), label, first_kept, len(kept))
            if pending is not None:
                finish_crf(*pending)
            pending = job
    if pending is not None:
        finish_crf(*pending)
    return metrics, used, kept


def evaluated_stage3(store):
    """How stage 3 trained the evaluated segment head, as its provenance record says (else ``unknown``)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ProvenanceWarning)  # the pre-flight check has reported it
        record = store.record("segment")
    return (record or {}).get("flags", {}).get("stage3", "unknown")


def summarise(cfg, metrics, used, names, stage3):
    backbone = cfg.ckpt or f"random {cfg.arch}"
    result = {"dataset": cfg.dataset, "head": cfg.head, "n_classes": cfg.n_classes, "backbone": backbone}
    result.update(test_resolution=cfg.test_resolution, stage3=stage3)
    for key, m in metrics.items():
        if m.histogram.sum() > 0:
            values = m.compute()
            result[key] = {"mIoU": values["mIoU"], "pAcc": values["pAcc"], "iou": values["iou"]}
            if key.startswith(("cluster", "kmeans")):
                result[key]["assignment"] = values["assignment"]
    share = [round(100.0 * float(c) / max(1, int(used.sum())), 2) for c in used]
    result.update(clusters_used=int((used > 0).sum()), cluster_pixel_share=share, class_names=names)
    return result


def write_outputs(cfg, result, metrics, kept, out_dir, log_dirs):
    atomic_write_bytes(os.path.join(out_dir, "metrics.json"), json.dumps(result, indent=2).encode())
    best, names = "cluster_crf" if "cluster_crf" in result else "cluster", result["class_names"]
    save_iou_table(result[best]["iou"], names, os.path.join(out_dir, "iou.md"))
    confusion = os.path.join(out_dir, "confusion.png")
    plot_confusion(metrics[best].matched_histogram(), names, confusion)
    cmap, panels = dataset_colormap(cfg.dataset, cfg.n_classes), []
    for i, (image, gt, pred, crf_pred) in enumerate(kept):
        final = crf_pred if crf_pred is not None else pred
        panels.append(os.path.join(out_dir, "panels", f"{i:04d}.png"))
        save_panel(panels[-1], image, gt, pred, final, metrics[best].map(final), cmap)
    write_report(os.path.join(out_dir, "report.html"), cfg.as_dict(), result, confusion, panels, log_dirs)


def results_table(result):
    rows = [f"{title:30s} {result[k]['mIoU']:7.2f} {result[k]['pAcc']:7.2f}" for title, k in METRIC_ROWS if k in result]
    used = f"clusters receiving pixels: {result['clusters_used']}/{result['n_classes']}"
    return "\n".join([f"{'':30s} {'mIoU':>7s} {'pAcc':>7s}", *rows, used, STAGE3_NOTES[result["stage3"]]])


def main(args):
    run = cli.prepare(args)
    if not run.info.is_main:
        return
    run = cli.single_process(run)
    cfg, store = run.cfg, run.store
    segment, cluster = load_trained(cfg, store, run.backbone.embed_dim, run.device)
    segmenter = CauseSegmenter(run.backbone, segment, cluster, cfg.test_resolution, cfg.crf_alpha)
    run.write_config("test", store.run_dir)
    data = run.dataset("val", cfg.test_resolution)
    loader, _ = make_loader(data, run.info, cfg.batch_size, cfg.num_workers, shuffle=False, drop_last=False)
    with torch.no_grad():
        centroids = fit_baselines(cfg, loader, segmenter) if cfg.baseline == "kmeans" else {}
        with CRFPool(num_workers=cfg.crf_workers) if cfg.crf else nullcontext() as pool:
            metrics, used, kept = evaluate(cfg, loader, segmenter, centroids, pool)
    if metrics["cluster"].histogram.sum() == 0:
        raise InvalidInputError("the val set has no labelled pixels (0 <= label < n_classes): nothing to score")
    names = [str(c) for c in range(cfg.n_classes)] if cfg.dataset == "folder" else dataset_info(cfg.dataset).class_names
    result = summarise(cfg, metrics, used, list(names), evaluated_stage3(store))
    write_outputs(cfg, result, metrics, kept, store.run_dir, [store.mediator_dir, store.run_dir])
    print(results_table(result) + (f"\n{RANDOM_BACKBONE_NOTE}" if not cfg.ckpt else ""))
    print(f"metrics: {os.path.join(store.run_dir, 'metrics.json')}")


if __name__ == "__main__":
    cli.run(main, parser(), single_process=True)
