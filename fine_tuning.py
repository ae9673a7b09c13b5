"""Stage 3 — cluster-probe fine-tuning: C class centroids learnt by modularity (SPEC §6).

python fine_tuning.py --dataset cocostuff27 --data_dir DATA --ckpt checkpoint/dino_vitbase8_pretrain.pth --head tr
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
    # As the reference, stage 3 optimises every segment parameter; only those that get a gradient move:
    # the probe, and with --reference_stage3 yes the teacher head through the probe.
    segment.requires_grad_(True)
    cluster = build_cluster(cfg, dim)
    cluster.codebook.data.copy_(codebook)
    cluster.codebook.requires_grad_(False)
    cluster = cluster.to(run.device)
    run.write_config("fine_tuning")

    segment_params = [p for p in segment.parameters() if p.requires_grad]
    optimizer_segment = torch.optim.Adam(segment_params, lr=run.lr, weight_decay=cfg.weight_decay)
    optimizer_cluster = torch.optim.Adam([cluster.cluster_probe], lr=run.lr)
    optimizers = [optimizer_segment, optimizer_cluster]
    schedulers = [torch.optim.lr_scheduler.StepLR(opt, step_size=2, gamma=0.5) for opt in optimizers]
    shared = {"segment": segment, "cluster": cluster, "optimizer_segment": optimizer_segment}
    shared.update(optimizer_cluster=optimizer_cluster, scheduler_segment=schedulers[0], scheduler_cluster=schedulers[1])
    trainer = run.trainer(shared)
    tokens = run.tokens()
    method = {"grid": cfg.grid, "reference": cfg.reference_stage3, "temp": cfg.modularity_temp}

    def losses(batch):
        with trainer.autocast():
            feats = tokens(batch.img, batch.ind)
            return fine_tuning_step(segment, cluster.cluster_probe, feats, batch.label, cfg.n_classes, **method)

    def train_step(epoch, batch):
        out = losses(batch)
        params, terms = segment_params + [cluster.cluster_probe], {k: out[k] for k in ("loss_mod", "loss_linear")}
        trainer.step(out["loss"], optimizers, params, cfg.grad_clip, segment_params, terms)
        logged = {k: out[k].item() for k in ("loss", "loss_mod", "loss_linear")}
        return {**logged, "probe_acc": out["probe_acc"], "lr": optimizer_cluster.param_groups[0]["lr"]}

    loader, sampler = run.train_loader()
    # What ran: without labels the probe trains nothing, whatever --reference_stage3 says.
    protocol = stage3_protocol(cfg.reference_stage3 and loader.dataset.labelled)
    trainer.resume(cfg.resume)
    segment.train()
    with trainer.interruptible():
        fixed_loss = lambda batch: losses(batch)["loss_mod"]  # noqa: E731
        start, end = fit(trainer, loader, sampler, train_step, fixed_loss, schedulers, f"[fine-tuning {cfg.head}]")
        if run.info.is_main:
            store.save("segment", segment.state_dict(), run.flags(stage3=protocol))
            store.save("cluster", cluster.state_dict(), run.flags(stage3=protocol))
        trainer.remove_states()
    summary = {"segment": store.path("segment"), "cluster": store.path("cluster"), "stage3": protocol}
    summary.update(trainer.loss_summary("loss_mod", start, end), probe_acc_last=trainer.records[-1]["probe_acc"])
    if run.info.is_main:
        losses_ = f"{summary['fixed_batch_loss_mod_start']:.4f} -> {summary['fixed_batch_loss_mod_end']:.4f}"
        print(f"[fine-tuning {cfg.head}] saved {store.path('cluster')}; fixed-batch modularity loss {losses_}")
        print(f"[fine-tuning {cfg.head}] {STAGE3_NOTES[protocol]}")
    trainer.finish(summary, ["loss_mod", "loss_linear", "probe_acc"])


if __name__ == "__main__":
    cli.run(main, parser())
