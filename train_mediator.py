"""Stage 1 — the mediator: a concept codebook learnt by maximising soft modularity (SPEC §4).

    python train_mediator.py --dataset cocostuff27 --data_dir DATA --ckpt checkpoint/dino_vitbase8_pretrain.pth
"""

import os

import numpy as np
import torch

from loader.netloader import build_cluster, codebook_path, mediator_dir, provenance, save_artifact
from modules.objectives import mediator_loss
from utils import cli
from utils.config import build_parser
from utils.checkpoint import TrainState
from utils.distributed import barrier
from utils.engine import Stage, fixed_batch_loss, step_schedules


def parser():
    p = build_parser(__doc__.strip().splitlines()[0], stage="mediator")
    p.add_argument("--overwrite", action="store_true", help="retrain even if the codebook exists")
    return p


def main(args):
    info, backbone = cli.prepare(args)
    out_path = codebook_path(args)
    if os.path.isfile(out_path) and not args.overwrite:
        if info.is_main:
            print(f"codebook {out_path} exists, skipping stage 1 (--overwrite to retrain)")
        return
    log_dir = mediator_dir(args)
    if info.is_main:
        cli.write_config(args, log_dir, "mediator")

    loader, sampler = cli.train_loader(args, info, backbone)
    cluster = build_cluster(args, backbone.embed_dim).to(info.device)
    codebook = cluster.codebook  # uniform in [-1/K, 1/K]
    optimizer = torch.optim.Adam([codebook], lr=args.lr * info.world_size)
    scheduler = torch.optim.lr_scheduler.StepLR(optimizer, step_size=1, gamma=0.2)
    stage = Stage("mediator", info, log_dir, args.amp)

    tokens_of = cli.token_source(args, info, backbone, "train", args.train_resolution)

    def loss_of(img, ind):
        with stage.autocast():
            return mediator_loss(codebook, tokens_of(img, ind), grid=args.grid, temp=args.modularity_temp)

    state = TrainState(stage, args, loader, sampler, shared={"cluster": cluster, "optimizer": optimizer,
                                                             "scheduler": scheduler},
                       fixed_loss=lambda img, label, ind: fixed_batch_loss(loss_of, img, ind))
    state.resume(args.resume)
    with state.interruptible():
        for epoch in state.epochs():
            for img, _, ind, bar in state.batches(epoch, "[mediator]"):
                loss = loss_of(img, ind)
                stage.step(loss, [optimizer], [codebook])
                stage.log(epoch=epoch, loss=loss.item(), lr=optimizer.param_groups[0]["lr"])
                bar.set_postfix(loss=f"{loss.item():.4f}")
            step_schedules([scheduler])

        start, end = state.fixed_batch_losses()
        if info.is_main:
            save_artifact(codebook.detach().float().cpu().numpy().astype(np.float32), out_path,
                          provenance(args, "codebook"))
            print(f"[mediator] codebook {tuple(codebook.shape)} saved to {out_path}; fixed-batch modularity loss "
                  f"{start:.4f} -> {end:.4f}")
        state.finish()
    stage.finish({"codebook": out_path, **stage.loss_summary("loss", start, end)}, plot_keys=["loss"])
    barrier(info)

if __name__ == "__main__":
    cli.run(main, parser())
