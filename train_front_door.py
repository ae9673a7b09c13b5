"""Stage 2 — front-door adjustment: concept-wise contrastive training of the segment head (SPEC §5).

python train_front_door.py --dataset cocostuff27 --data_dir DATA --ckpt checkpoint/dino_vitbase8_pretrain.pth --head tr
"""

import torch

from engine import cli
from engine.build import build_segment, read_codebook
from engine.config import build_parser
from engine.loop import fit
from modules.bank import ConceptBank
from modules.objectives import front_door_step, update_bank


def parser():
    return build_parser(__doc__, stage="front_door")


def main(args):
    run = cli.prepare(args)
    cfg, store = run.cfg, run.store
    codebook = read_codebook(store, cfg, run.backbone.embed_dim).to(run.device)
    run.write_config("front_door")
    segment = build_segment(cfg, run.backbone.embed_dim, codebook).to(run.device)
    bank = ConceptBank(cfg.num_codebook, cfg.projection_dim, cfg.bank_capacity, cfg.bank_keep_ratio).to(run.device)
    params = [p for p in segment.parameters() if p.requires_grad]
    optimizer = torch.optim.Adam(params, lr=run.lr, weight_decay=cfg.weight_decay)
    trainer = run.trainer(shared={"segment": segment, "optimizer": optimizer}, local={"bank": bank})
    tokens = run.tokens()
    method = {"grid": cfg.grid, "temp": cfg.contrastive_temp, "pos": cfg.pos_thresh, "neg": cfg.neg_thresh}

    def losses(batch, bank_):
        with trainer.autocast():
            feats = tokens(batch.img, batch.ind)
            return front_door_step(segment, feats, batch.label, codebook, bank_, cfg.n_classes, **method)

    def train_step(epoch, batch):
        out = losses(batch, bank)
        terms = {k: out[k] for k in ("loss_front", "loss_linear")}
        trainer.step(out["loss"], [optimizer], params, grad_clip=cfg.grad_clip, terms=terms)
        # The reference's teacher shares the student's storage until its first update.
        segment.update_teacher(cfg.ema_momentum, tied=trainer.global_step == 1)
        update_bank(bank, codebook, out["sampled_tokens"], out["teacher_proj"])
        logged = {k: out[k].item() for k in ("loss", "loss_front", "loss_linear")}
        return {**logged, "probe_acc": out["probe_acc"], "bank": len(bank), "lr": optimizer.param_groups[0]["lr"]}

    loader, sampler = run.train_loader()
    trainer.resume(cfg.resume)
    segment.train()
    with trainer.interruptible():
        fixed_loss = lambda batch: losses(batch, None)["loss_front"]  # noqa: E731
        start, end = fit(trainer, loader, sampler, train_step, fixed_loss, desc=f"[front door {cfg.head}]")
        if run.info.is_main:
            store.save("segment", segment.state_dict(), run.flags())
        trainer.remove_states()
    summary = {"segment": store.path("segment"), **trainer.loss_summary("loss_front", start, end)}
    summary["probe_acc_last"] = trainer.records[-1]["probe_acc"]
    if run.info.is_main:
        losses_ = f"{summary['fixed_batch_loss_front_start']:.4f} -> {summary['fixed_batch_loss_front_end']:.4f}"
        print(f"[front door {cfg.head}] saved {store.path('segment')}; fixed-batch contrastive loss {losses_}")
    trainer.finish(summary, ["loss_front", "loss_linear", "probe_acc"])


if __name__ == "__main__":
    cli.run(main, parser())
