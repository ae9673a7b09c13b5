"""Where does the gap between the stage-3 cluster probe and k-means on the same head features come from?

Loads a finished run (same flags as test.py), computes the flip-TTA head features of the
val set, and scores three sets of C centroids in the r-dim head space with the stage-3
objective itself (the modularity Q of SPEC §3, higher is better) and with Hungarian mIoU:

* ``probe``   the cluster probe learnt by fine_tuning.py,
* ``kmeans``  spherical k-means (faiss) on the same head features,
* ``oracle``  the mean head feature of each ground-truth class (uses labels; an upper reference).

Each is also described by the mean cosine of the features to the centroids and the mean soft
co-membership Δ over all token pairs (Δ near 1 everywhere makes Q near 0).

If a better-segmenting centroid set has a *lower* Q than the probe, stage 3 is not failing to
optimise: its objective prefers the probe's partition on these features.

``--centred_probe`` adds an experiment that is not part of the method: a fresh cluster probe
trained with stage 3's objective and schedule (Adam 1e-3, StepLR 2 / 0.5, same epochs, grid
sampling, teacher head in train mode) on head features from which the mean training feature
is subtracted, scored on the val features centred the same way (``centred``).

    python benchmarks/toy_gap.py --num_codebook 256 --projection_dim 256 [--head tr --train_resolution 224]
"""

import json
import os
import sys

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from engine import cli  # noqa: E402
from engine.build import load_trained  # noqa: E402
from engine.config import build_parser  # noqa: E402
from loader.batches import make_loader  # noqa: E402
from modules.inference import flip_tta_features, upsample  # noqa: E402
from modules.kmeans import fit_kmeans  # noqa: E402
from modules.objectives import modularity_loss, soft_comembership  # noqa: E402
from modules.ops import grid_sample_tokens  # noqa: E402
from utils.metrics import UnsupervisedMetrics  # noqa: E402


def head_features(run, segment):
    loader, _ = make_loader(
        run.dataset("val", run.cfg.test_resolution), run.info, run.cfg.batch_size, 0, shuffle=False, drop_last=False
    )
    backbone = run.backbone
    feats, labels = [], []
    with torch.no_grad():
        for batch in loader:
            feats.append(flip_tta_features(backbone, segment.head_ema, batch["img"])[0])
            labels.append(batch["label"])
    return torch.cat(feats), torch.cat(labels)


def centred_probe(run, segment):
    """Stage 3 again, on mean-centred head features: -> (probe [C, r], training mean [r])."""
    args, backbone = run.cfg, run.backbone
    loader, _ = run.train_loader()
    with torch.no_grad():
        mean = torch.cat([segment.head_ema(backbone(b["img"])).flatten(0, 1) for b in loader]).mean(0)
    torch.manual_seed(args.seed)
    probe = torch.empty(args.n_classes, args.reduced_dim).uniform_(-1 / args.n_classes, 1 / args.n_classes)
    probe.requires_grad_(True)
    optimizer = torch.optim.Adam([probe], lr=args.lr)
    scheduler = torch.optim.lr_scheduler.StepLR(optimizer, step_size=2, gamma=0.5)
    segment.head_ema.train()
    for _ in range(args.epoch):
        for batch in loader:
            with torch.no_grad():
                feats = segment.head_ema(backbone(batch["img"])) - mean
            sampled = grid_sample_tokens(feats)[0] if args.grid else feats
            loss = modularity_loss(probe, sampled)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
        scheduler.step()
    segment.head_ema.eval()
    return probe.detach(), mean


def class_means(feats, labels, n_classes):
    """Mean unit head feature per ground-truth class (label downsampled to the patch grid)."""
    grid = F.interpolate(labels[:, None].float(), size=feats.shape[-2:], mode="nearest")[:, 0].long()
    x = F.normalize(feats, dim=1).permute(0, 2, 3, 1).reshape(-1, feats.shape[1])
    y = grid.reshape(-1)
    return torch.stack([x[y == c].mean(0) if (y == c).any() else torch.zeros(x.shape[1]) for c in range(n_classes)])


def score(centroids, feats, labels, n_classes):
    tokens = feats.flatten(2).transpose(1, 2)
    q = -float(modularity_loss(centroids, tokens))
    cosine = torch.einsum("bnr,cr->bnc", F.normalize(tokens, dim=-1), F.normalize(centroids, dim=1))
    delta = soft_comembership(centroids, tokens)
    metrics = UnsupervisedMetrics(n_classes)
    sims = torch.einsum("brhw,cr->bchw", F.normalize(feats, dim=1), F.normalize(centroids, dim=1))
    pred = upsample(sims, labels.shape[-2:]).argmax(1)
    metrics.update(pred, labels)
    share = torch.bincount(pred.flatten(), minlength=n_classes).float()
    values = metrics.compute()
    return {
        "Q": round(q, 5),
        "mean_cos": round(float(cosine.mean()), 3),
        "mean_delta": round(float(delta.mean()), 3),
        "mIoU": round(values["mIoU"], 2),
        "pAcc": round(values["pAcc"], 2),
        "pixel_share": [round(float(s), 1) for s in 100 * share / share.sum()],
    }


def main(args):
    args.cpu = True
    run = cli.prepare(args)
    args = run.cfg
    segment, cluster = load_trained(args, run.store, run.backbone.embed_dim, run.device)
    probe = cluster.cluster_probe.detach()
    feats, labels = head_features(run, segment)
    sample = feats.flatten(2).transpose(1, 2).reshape(-1, feats.shape[1])
    centroids = {
        "probe": probe,
        "kmeans": fit_kmeans(sample, args.n_classes, seed=args.seed),
        "oracle": class_means(feats, labels, args.n_classes),
    }
    result = {name: score(c, feats, labels, args.n_classes) for name, c in centroids.items()}
    if args.centred_probe:
        probe, mean = centred_probe(run, segment)
        result["centred"] = score(probe, feats - mean[None, :, None, None], labels, args.n_classes)
    print(json.dumps(result, indent=1))


def parser():
    p = build_parser(__doc__, stage="fine_tuning")
    p.add_argument("--test_resolution", type=int, default=320, help="evaluation size")
    p.add_argument(
        "--centred_probe",
        action="store_true",
        help="also train and score a cluster probe on mean-centred head features (an experiment)",
    )
    return p


if __name__ == "__main__":
    cli.run(main, parser(), single_process=True)
