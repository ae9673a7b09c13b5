"""Stage 2 — front-door adjustment: concept-wise contrastive training of the segment head (SPEC §5).

    python train_front_door.py --dataset cocostuff27 --data_dir DATA \
        --ckpt checkpoint/dino_vitbase8_pretrain.pth --head tr
"""

import torch

from loader.netloader import (build_segment, load_codebook, provenance, run_dir, save_artifact, segment_path,
                              trainable)
from modules.bank import ConceptBank
from modules.objectives import front_door_step, update_bank
from utils import cli
from utils.config import build_parser
from utils.checkpoint import TrainState
from utils.engine import Stage, fixed_batch_loss


def parser():
    return build_parser(__doc__.strip().splitlines()[0], stage="front_door")


def main(args):
    info, backbone = cli.prepare(args)
    codebook = load_codebook(args, backbone.embed_dim).to(info.device)
    log_dir = run_dir(args)
    if info.is_main:
        cli.write_config(args, log_dir, "front_door")

    loader, sampler = cli.train_loader(args, info, backbone)
    segment = build_segment(args, backbone.embed_dim).to(info.device)
    if args.head == "tr":
        segment.set_codebook(codebook)
    bank = ConceptBank(args.num_codebook, args.projection_dim, args.bank_capacity, args.bank_keep_ratio).to(info.device)
    params = trainable(segment)
    optimizer = torch.optim.Adam(params, lr=args.lr * info.world_size, weight_decay=args.weight_decay)
    stage = Stage("front_door", info, log_dir, args.amp)

    tokens_of = cli.token_source(args, info, backbone, "train", args.train_resolution)

    def losses(img, label, ind, bank_):
        with stage.autocast():
            return front_door_step(segment, tokens_of(img, ind), label, codebook, bank_, args.head, args.n_classes,
                                   grid=args.grid, temp=args.contrastive_temp, pos=args.pos_thresh,
                                   neg=args.neg_thresh)

    def contrastive(img, label, ind, bank_):
        return losses(img, label, ind, bank_)["loss_front"]

    state = TrainState(stage, args, loader, sampler, shared={"segment": segment, "optimizer": optimizer},
                       local={"bank": bank},
                       fixed_loss=lambda img, label, ind: fixed_batch_loss(contrastive, img, label, ind, None))
    state.resume(args.resume)
    segment.train()
    with state.interruptible():
        for epoch in state.epochs():
            for img, label, ind, bar in state.batches(epoch, f"[front door {args.head}]"):
                out = losses(img, label, ind, bank)
                stage.step(out["loss"], [optimizer], params, grad_clip=args.grad_clip,
                           terms={k: out[k] for k in ("loss_front", "loss_linear")})
                # The reference's teacher shares the student's storage until its first update.
                segment.update_teacher(args.ema_momentum, tied=stage.global_step == 1)
                update_bank(bank, codebook, out["sampled_tokens"], out["teacher_proj"])
                acc = 100.0 * float(out["n_correct"]) / max(1, float(out["n_counted"]))
                stage.log(epoch=epoch, loss=out["loss"].item(), loss_front=out["loss_front"].item(),
                          loss_linear=out["loss_linear"].item(), probe_acc=acc, bank=len(bank),
                          lr=optimizer.param_groups[0]["lr"])
                bar.set_postfix(front=f"{out['loss_front'].item():.3f}", lin=f"{out['loss_linear'].item():.3f}",
                                acc=f"{acc:.1f}")

        start, end = state.fixed_batch_losses()
        if info.is_main:
            save_artifact(segment.state_dict(), segment_path(args), provenance(args, "segment"))
        state.finish()
    summary = {"segment": segment_path(args), **stage.loss_summary("loss_front", start, end),
               "probe_acc_last": stage.records[-1]["probe_acc"]}
    if info.is_main:
        print(f"[front door {args.head}] saved {segment_path(args)}; fixed-batch contrastive loss "
              f"{summary['fixed_batch_loss_front_start']:.4f} -> {summary['fixed_batch_loss_front_end']:.4f}")
    stage.finish(summary, plot_keys=["loss_front", "loss_linear", "probe_acc"])

if __name__ == "__main__":
    cli.run(main, parser())
