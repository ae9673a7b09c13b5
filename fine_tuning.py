"""Stage 3 — cluster-probe fine-tuning: C class centroids learnt by modularity (SPEC §6).

    python fine_tuning.py --dataset cocostuff27 --data_dir DATA \
        --ckpt checkpoint/dino_vitbase8_pretrain.pth --head tr
"""

import torch

from engine import cli
from engine.build import build_cluster, build_segment, load_into, read_artifact, read_codebook
from engine.config import STAGE3_NOTES, build_parser, stage3_protocol
from engine.loop import fit
from modules.objectives import fine_tuning_step


def parser():
    return build_parser(__doc__, stage="fine_tuning")


def main(args):
    run = cli.prepare(args)
    cfg, store, dim = run.cfg, run.store, run.backbone.embed_dim
    codebook = read_codebook(store, cfg, dim)
    segment = load_into(build_segment(cfg, dim), read_artifact(store, "segment", cfg, dim), store.path("segment"))
    segment = segment.to(run.device)
    segment.set_codebook(codebook.to(run.device))
    # As in the reference, stage 3 optimises every segment parameter; only those that receive a
    # gradient move: the probe, and with --reference_stage3 yes the teacher head through the probe.
    segment.requires_grad_(True)
    cluster = build_cluster(cfg, dim)
    cluster.codebook.data.copy_(codebook)
    cluster.codebook.requires_grad_(False)
    cluster = cluster.to(run.device)
    run.write_config("fine_tuning")

    segment_params = [p for p in segment.parameters() if p.requires_grad]
    lr = cfg.lr * run.info.world_size
    optimizer_segment = torch.optim.Adam(segment_params, lr=lr, weight_decay=cfg.weight_decay)
    optimizer_cluster = torch.optim.Adam([cluster.cluster_probe], lr=lr)
    schedulers = [
        torch.optim.lr_scheduler.StepLR(opt, step_size=2, gamma=0.5) for opt in (optimizer_segment, optimizer_cluster)
    ]
    trainer = run.trainer(
        shared={
            "segment": segment,
            "cluster": cluster,
            "optimizer_segment": optimizer_segment,
            "optimizer_cluster": optimizer_cluster,
            "scheduler_segment": schedulers[0],
            "scheduler_cluster": schedulers[1],
        }
    )
    tokens = run.tokens()

    def losses(batch):
        with trainer.autocast():
            return fine_tuning_step(
                segment,
                cluster.cluster_probe,
                tokens(batch.img, batch.ind),
                batch.label,
                cfg.n_classes,
                grid=cfg.grid,
                reference=cfg.reference_stage3,
                temp=cfg.modularity_temp,
            )

    def train_step(epoch, batch):
        out = losses(batch)
        trainer.step(
            out["loss"],
            [optimizer_segment, optimizer_cluster],
            segment_params + [cluster.cluster_probe],
            grad_clip=cfg.grad_clip,
            clip_params=segment_params,
            terms={k: out[k] for k in ("loss_mod", "loss_linear")},
        )
        return {
            "loss": out["loss"].item(),
            "loss_mod": out["loss_mod"].item(),
            "loss_linear": out["loss_linear"].item(),
            "probe_acc": out["probe_acc"],
            "lr": optimizer_cluster.param_groups[0]["lr"],
        }

    loader, sampler = run.train_loader()
    trainer.resume(cfg.resume)
    segment.train()
    with trainer.interruptible():
        start, end = fit(
            trainer,
            loader,
            sampler,
            train_step,
            lambda batch: losses(batch)["loss_mod"],
            schedulers,
            desc=f"[fine-tuning {cfg.head}]",
        )
        if run.info.is_main:
            store.save("segment", segment.state_dict(), run.flags())
            store.save("cluster", cluster.state_dict(), run.flags())
        trainer.remove_states()
    protocol = stage3_protocol(cfg.reference_stage3)
    summary = {
        "segment": store.path("segment"),
        "cluster": store.path("cluster"),
        "stage3": protocol,
        **trainer.loss_summary("loss_mod", start, end),
        "probe_acc_last": trainer.records[-1]["probe_acc"],
    }
    if run.info.is_main:
        print(
            f"[fine-tuning {cfg.head}] saved {store.path('cluster')}; fixed-batch modularity loss "
            f"{summary['fixed_batch_loss_mod_start']:.4f} -> {summary['fixed_batch_loss_mod_end']:.4f}"
        )
        print(f"[fine-tuning {cfg.head}] {STAGE3_NOTES[protocol]}")
    trainer.finish(summary, ["loss_mod", "loss_linear", "probe_acc"])


if __name__ == "__main__":
    cli.run(main, parser())
