"""Evaluation — flip TTA, dense CRF, Hungarian-matched mIoU / pixel accuracy, pictures (SPEC §7).

    python test.py --dataset cocostuff27 --data_dir DATA --ckpt checkpoint/dino_vitbase8_pretrain.pth --head tr

Writes ``metrics.json``, ``iou.md``, ``confusion.png``, the panels of the first
``--save_images`` images and ``report.html`` (all of it on one self-contained page) into the
run directory ``<out>/<dataset>/<baseline>/<K>/<head>/``. ``--segment``/``--cluster``/
``--codebook`` evaluate trained heads given by path (e.g. the released ones).
Evaluation runs in one process (the first id of ``--gpu``).
"""

import json
import os
import warnings

import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm

from engine import cli
from engine.build import load_trained
from engine.config import STAGE3_NOTES, build_parser, stage3_protocol, str2bool
from engine.loop import atomic_write_text
from engine.report import write_report
from engine.store import ProvenanceWarning
from loader.batches import make_loader
from loader.datasets import dataset_info
from modules.inference import flip_tta_features, upsample
from modules.kmeans import fit_kmeans, kmeans_assign
from modules.segment import image_to_tokens, tokens_to_image
from utils.crf import CRFPool, unnormalize_to_uint8
from utils.errors import InvalidInputError
from utils.metrics import UnsupervisedMetrics
from utils.visualize import dataset_colormap, plot_confusion, save_iou_table, save_panel

RANDOM_BACKBONE_NOTE = (
    "note: the backbone is random (ckpt empty): these numbers check the pipeline, not the "
    "method; set ckpt= to an official checkpoint for real results"
)


def parser():
    p = build_parser(__doc__, stage="test")
    g = p.add_argument_group("evaluation")
    g.add_argument("--crf", type=str2bool, default=True, help="yes/no: also evaluate with dense-CRF post-processing")
    g.add_argument(
        "--crf_workers", type=int, default=None, help="CRF process-pool size (default: CPU count; 0 = serial)"
    )
    g.add_argument(
        "--linear_crf",
        type=str2bool,
        default=False,
        help="yes/no: also apply the CRF to the linear probe's prediction (linear_crf in metrics.json). "
        "Default no: the published CAUSE protocol reports the unsupervised result with CRF and the "
        "linear probe without it",
    )
    g.add_argument(
        "--baseline",
        choices=["kmeans", "none"],
        default="kmeans",
        help="k-means (faiss, C clusters) on the frozen backbone tokens and on the head features",
    )
    g.add_argument(
        "--kmeans_max_tokens",
        type=int,
        default=500_000,
        help="k-means is fitted on all val tokens, or on this many sampled evenly over the images",
    )
    g.add_argument("--save_images", type=int, default=8, help="panels written for the first N images")
    return p


def class_names(cfg):
    if cfg.dataset == "folder":
        return [str(c) for c in range(cfg.n_classes)]
    return list(dataset_info(cfg.dataset).class_names)


def fit_baselines(args, loader, backbone, segment, device):
    """Fit k-means with C clusters on the val set's backbone tokens and head features.

    Returns ``{"kmeans": [C, D], "kmeans_head": [C, r]}`` centroids.
    """
    gen = torch.Generator().manual_seed(args.seed)
    per_image = max(1, args.kmeans_max_tokens // len(loader.dataset))
    samples = {"kmeans": [], "kmeans_head": []}
    for batch in tqdm_bar(loader, "[test] k-means features"):
        u, tokens = flip_tta_features(backbone, segment.head_ema, batch["img"].to(device))
        for key, feats in (("kmeans", tokens), ("kmeans_head", image_to_tokens(u))):
            feats = feats.float().cpu()
            n = min(per_image, feats.shape[1])
            idx = torch.stack([torch.randperm(feats.shape[1], generator=gen)[:n] for _ in range(feats.shape[0])])
            samples[key].append(torch.gather(feats, 1, idx[..., None].expand(-1, -1, feats.shape[2])).flatten(0, 1))
    return {key: fit_kmeans(torch.cat(v), args.n_classes, seed=args.seed).to(device) for key, v in samples.items()}


def evaluate(args, loader, backbone, segment, cluster, device, centroids, crf_pool):
    """Every metric over the val set. The CRF of a batch runs in ``crf_pool`` while the
    backbone computes the next batch; the probe's CRF only with ``args.linear_crf``."""
    linear_crf = crf_pool is not None and args.linear_crf
    metrics = {key: UnsupervisedMetrics(args.n_classes) for key in ("cluster", "cluster_crf")}
    metrics["linear"] = UnsupervisedMetrics(args.n_classes, hungarian=False)
    if linear_crf:
        metrics["linear_crf"] = UnsupervisedMetrics(args.n_classes, hungarian=False)
    for key in centroids:
        metrics[key] = UnsupervisedMetrics(args.n_classes)
    used = torch.zeros(args.n_classes, dtype=torch.long)
    kept = []

    def finish_crf(job, label, first_kept, end_kept):
        both = job.result().argmax(1).to(device)
        crf_pred = both[: label.shape[0]]
        metrics["cluster_crf"].update(crf_pred, label)
        if linear_crf:
            metrics["linear_crf"].update(both[label.shape[0] :], label)
        for i in range(first_kept, end_kept):
            kept[i] = (*kept[i][:3], crf_pred[i - first_kept].cpu())

    pending = None
    for batch in tqdm_bar(loader, "[test]"):
        img, label = batch["img"].to(device), batch["label"].to(device)
        size = label.shape[-2:]
        u, tokens = flip_tta_features(backbone, segment.head_ema, img)
        u = u.float()
        feats = upsample(u, size)
        scores = cluster.scores(feats)
        pred = scores.argmax(1)
        metrics["cluster"].update(pred, label)
        used += torch.bincount(pred.flatten().cpu(), minlength=args.n_classes)
        lin_logits = tokens_to_image(segment.linear(image_to_tokens(feats)))
        lin_pred = lin_logits.argmax(1)
        metrics["linear"].update(lin_pred, label)
        for key, cents in centroids.items():
            src = tokens_to_image(tokens.float()) if key == "kmeans" else u
            clusters = kmeans_assign(src, cents)[:, None].float()
            metrics[key].update(F.interpolate(clusters, size=size, mode="nearest")[:, 0].long(), label)
        images = unnormalize_to_uint8(img.float().cpu(), backbone.mean, backbone.std)
        first_kept = len(kept)
        for i in range(min(img.shape[0], args.save_images - len(kept))):
            kept.append((images[i], label[i].cpu(), pred[i].cpu(), None))
        if crf_pool is not None:
            # One pool job per batch: the cluster scores, and the probe's one-hot prediction if asked for.
            logits = torch.log_softmax(scores * args.crf_alpha, dim=1)
            crf_images = images
            if linear_crf:
                logits = torch.cat([logits, F.one_hot(lin_pred, args.n_classes).permute(0, 3, 1, 2).float()])
                crf_images = np.concatenate([images, images])
            job = (crf_pool.submit(crf_images, logits.cpu()), label, first_kept, len(kept))
            if pending is not None:
                finish_crf(*pending)
            pending = job
    if pending is not None:
        finish_crf(*pending)
    return metrics, used, kept


def tqdm_bar(loader, desc):
    return tqdm(loader, desc=desc, dynamic_ncols=True, leave=False)


def evaluated_stage3(store):
    """How stage 3 trained the evaluated segment head, as its provenance record says (else ``unknown``)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ProvenanceWarning)  # the pre-flight check has reported it
        record = store.record("segment")
    flags = record.get("flags", {}) if record is not None else {}
    return stage3_protocol(flags.get("reference_stage3") if flags.get("stage") == "fine_tuning" else None)


def summarise(args, metrics, used, names, stage3):
    result = {
        "dataset": args.dataset,
        "head": args.head,
        "n_classes": args.n_classes,
        "backbone": args.ckpt or f"random {args.arch}",
        "test_resolution": args.test_resolution,
        "stage3": stage3,
    }
    for key, m in metrics.items():
        if m.histogram.sum() == 0:
            continue
        values = m.compute()
        result[key] = {"mIoU": values["mIoU"], "pAcc": values["pAcc"], "iou": values["iou"]}
        if key.startswith("cluster") or key.startswith("kmeans"):
            result[key]["assignment"] = values["assignment"]
    result["clusters_used"] = int((used > 0).sum())
    result["cluster_pixel_share"] = [round(100.0 * float(c) / max(1, int(used.sum())), 2) for c in used]
    result["class_names"] = names
    return result


def write_outputs(args, result, metrics, kept, names, out_dir, log_dirs):
    atomic_write_text(os.path.join(out_dir, "metrics.json"), json.dumps(result, indent=2))
    best = "cluster_crf" if "cluster_crf" in result else "cluster"
    save_iou_table(result[best]["iou"], names, os.path.join(out_dir, "iou.md"))
    plot_confusion(metrics[best].matched_histogram(), names, os.path.join(out_dir, "confusion.png"))
    cmap = dataset_colormap(args.dataset, args.n_classes)
    panel_dir = os.path.join(out_dir, "panels")
    os.makedirs(panel_dir, exist_ok=True)
    panels = []
    for i, (image, gt, pred, crf_pred) in enumerate(kept):
        final = crf_pred if crf_pred is not None else pred
        panels.append(os.path.join(panel_dir, f"{i:04d}.png"))
        save_panel(
            panels[-1], image, gt, pred, crf_pred if crf_pred is not None else pred, metrics[best].map(final), cmap
        )
    write_report(
        os.path.join(out_dir, "report.html"),
        args.as_dict(),
        result,
        os.path.join(out_dir, "confusion.png"),
        panels,
        log_dirs,
    )


def results_table(result):
    rows = [
        ("CAUSE (cluster probe)", "cluster"),
        ("CAUSE + CRF", "cluster_crf"),
        ("linear probe (supervised)", "linear"),
        ("linear probe + CRF", "linear_crf"),
        ("k-means on backbone tokens", "kmeans"),
        ("k-means on head features", "kmeans_head"),
    ]
    lines = [f"{'':30s} {'mIoU':>7s} {'pAcc':>7s}"]
    for title, key in rows:
        if key in result:
            lines.append(f"{title:30s} {result[key]['mIoU']:7.2f} {result[key]['pAcc']:7.2f}")
    lines.append(f"clusters receiving pixels: {result['clusters_used']}/{result['n_classes']}")
    lines.append(STAGE3_NOTES[result["stage3"]])
    return "\n".join(lines)


def main(args):
    run = cli.prepare(args)
    if not run.info.is_main:
        return
    run = cli.single_process(run)
    cfg, store, device = run.cfg, run.store, run.device
    if cfg.dataset == "folder" and not cfg.label_dir:
        raise InvalidInputError(
            "test.py scores predictions against labels: give --label_dir, or segment unlabelled images with predict.py"
        )
    segment, cluster = load_trained(cfg, store, run.backbone.embed_dim, device)
    out_dir = store.run_dir
    run.write_config("test", out_dir)

    loader, _ = make_loader(
        run.dataset("val", cfg.test_resolution),
        run.info,
        cfg.batch_size,
        cfg.num_workers,
        shuffle=False,
        drop_last=False,
    )
    names = class_names(cfg)
    with torch.no_grad():
        centroids = fit_baselines(cfg, loader, run.backbone, segment, device) if cfg.baseline == "kmeans" else {}
        if cfg.crf:
            with CRFPool(num_workers=cfg.crf_workers) as pool:
                metrics, used, kept = evaluate(cfg, loader, run.backbone, segment, cluster, device, centroids, pool)
        else:
            metrics, used, kept = evaluate(cfg, loader, run.backbone, segment, cluster, device, centroids, None)
    if metrics["cluster"].histogram.sum() == 0:
        raise InvalidInputError(
            "the val set has no labelled pixels (0 <= label < n_classes), so there is nothing to "
            "score; segment unlabelled images with predict.py"
        )
    result = summarise(cfg, metrics, used, names, evaluated_stage3(store))
    write_outputs(cfg, result, metrics, kept, names, out_dir, [store.mediator_dir, out_dir])
    print(results_table(result))
    if not cfg.ckpt:
        print(RANDOM_BACKBONE_NOTE)
    print(f"metrics: {os.path.join(out_dir, 'metrics.json')}")


if __name__ == "__main__":
    cli.run(main, parser(), single_process=True)
