"""Stage 3 — cluster-probe fine-tuning: C class centroids learnt by modularity (SPEC §6).

    python fine_tuning.py --dataset cocostuff27 --data_dir DATA \
        --ckpt checkpoint/dino_vitbase8_pretrain.pth --head tr
"""

import torch

from loader.netloader import (build_cluster, build_segment, cluster_path, load_codebook, load_into, provenance,
                              run_dir, save_artifact, segment_path, trainable)
from modules.objectives import fine_tuning_step
from utils import cli
from utils.config import STAGE3_NOTES, build_parser, stage3_protocol
from utils.checkpoint import TrainState
from utils.engine import Stage, fixed_batch_loss, step_schedules


def parser():
    return build_parser(__doc__.strip().splitlines()[0], stage="fine_tuning")


def main(args):
    info, backbone = cli.prepare(args)
    codebook = load_codebook(args, backbone.embed_dim)
    segment = load_into(build_segment(args, backbone.embed_dim), segment_path(args), "segment").to(info.device)
    if args.head == "tr":
        segment.set_codebook(codebook.to(info.device))
    # As in the reference, stage 3 optimises every segment parameter; only those that receive a
    # gradient move: the probe, and with --reference_stage3 yes the teacher head through the probe.
    segment.requires_grad_(True)
    cluster = build_cluster(args, backbone.embed_dim)
    cluster.codebook.data.copy_(codebook)
    cluster.codebook.requires_grad_(False)
    cluster = cluster.to(info.device)
    log_dir = run_dir(args)
    if info.is_main:
        cli.write_config(args, log_dir, "fine_tuning")

    loader, sampler = cli.train_loader(args, info, backbone)
    segment_params = trainable(segment)
    lr = args.lr * info.world_size
    optimizer_segment = torch.optim.Adam(segment_params, lr=lr, weight_decay=args.weight_decay)
    optimizer_cluster = torch.optim.Adam([cluster.cluster_probe], lr=lr)
    schedulers = [torch.optim.lr_scheduler.StepLR(opt, step_size=2, gamma=0.5)
                  for opt in (optimizer_segment, optimizer_cluster)]
    stage = Stage("fine_tuning", info, log_dir, args.amp)

    tokens_of = cli.token_source(args, info, backbone, "train", args.train_resolution)

    def losses(img, label, ind):
        with stage.autocast():
            return fine_tuning_step(segment, cluster.cluster_probe, tokens_of(img, ind), label, args.n_classes,
                                    grid=args.grid, reference=args.reference_stage3, temp=args.modularity_temp)

    def modularity(img, label, ind):
        return losses(img, label, ind)["loss_mod"]

    state = TrainState(stage, args, loader, sampler,
                       shared={"segment": segment, "cluster": cluster, "optimizer_segment": optimizer_segment,
                               "optimizer_cluster": optimizer_cluster, "scheduler_segment": schedulers[0],
                               "scheduler_cluster": schedulers[1]},
                       fixed_loss=lambda img, label, ind: fixed_batch_loss(modularity, img, label, ind))
    state.resume(args.resume)
    segment.train()
    with state.interruptible():
        for epoch in state.epochs():
            for img, label, ind, bar in state.batches(epoch, f"[fine-tuning {args.head}]"):
                out = losses(img, label, ind)
                stage.step(out["loss"], [optimizer_segment, optimizer_cluster],
                           segment_params + [cluster.cluster_probe], grad_clip=args.grad_clip,
                           clip_params=segment_params, terms={k: out[k] for k in ("loss_mod", "loss_linear")})
                acc = 100.0 * float(out["n_correct"]) / max(1, float(out["n_counted"]))
                stage.log(epoch=epoch, loss=out["loss"].item(), loss_mod=out["loss_mod"].item(),
                          loss_linear=out["loss_linear"].item(), probe_acc=acc,
                          lr=optimizer_cluster.param_groups[0]["lr"])
                bar.set_postfix(mod=f"{out['loss_mod'].item():.4f}", lin=f"{out['loss_linear'].item():.3f}",
                                acc=f"{acc:.1f}")
            step_schedules(schedulers)

        start, end = state.fixed_batch_losses()
        if info.is_main:
            save_artifact(segment.state_dict(), segment_path(args), provenance(args, "segment"))
            save_artifact(cluster.state_dict(), cluster_path(args), provenance(args, "cluster"))
        state.finish()
    protocol = stage3_protocol(args.reference_stage3)
    summary = {"segment": segment_path(args), "cluster": cluster_path(args), "stage3": protocol,
               **stage.loss_summary("loss_mod", start, end), "probe_acc_last": stage.records[-1]["probe_acc"]}
    if info.is_main:
        print(f"[fine-tuning {args.head}] saved {cluster_path(args)}; fixed-batch modularity loss "
              f"{summary['fixed_batch_loss_mod_start']:.4f} -> {summary['fixed_batch_loss_mod_end']:.4f}")
        print(f"[fine-tuning {args.head}] {STAGE3_NOTES[protocol]}")
    stage.finish(summary, plot_keys=["loss_mod", "loss_linear", "probe_acc"])

if __name__ == "__main__":
    cli.run(main, parser())
