"""Stage 1 — the mediator: a concept codebook learnt by maximising soft modularity (SPEC §4).

python train_mediator.py --dataset cocostuff27 --data_dir DATA --ckpt checkpoint/dino_vitbase8_pretrain.pth
"""

import os

import numpy as np
import torch

from engine import cli
from engine.config import build_parser
from engine.loop import fit
from modules.objectives import mediator_loss
from modules.segment import init_codebook


def parser():
    p = build_parser(__doc__, stage="mediator")
    p.add_argument("--overwrite", action="store_true", help="retrain even if the codebook exists")
    return p


def main(args):
    run = cli.prepare(args)
    cfg, store = run.cfg, run.store
    if os.path.isfile(store.path("codebook")) and not cfg.overwrite:
        if run.info.is_main:
            print(f"codebook {store.path('codebook')} exists, skipping stage 1 (--overwrite to retrain)")
        return
    run.write_config("mediator")
    codebook = torch.nn.Parameter(init_codebook(cfg.num_codebook, run.backbone.embed_dim).to(run.device))
    optimizer = torch.optim.Adam([codebook], lr=run.lr)
    scheduler = torch.optim.lr_scheduler.StepLR(optimizer, step_size=1, gamma=0.2)
    trainer = run.trainer(shared={"codebook": codebook, "optimizer": optimizer, "scheduler": scheduler})
    tokens = run.tokens()

    def loss_of(batch):
        with trainer.autocast():
            return mediator_loss(codebook, tokens(batch.img, batch.ind), grid=cfg.grid, temp=cfg.modularity_temp)

    def train_step(epoch, batch):
        loss = loss_of(batch)
        trainer.step(loss, [optimizer], [codebook])
        return {"loss": loss.item(), "lr": optimizer.param_groups[0]["lr"]}

    loader, sampler = run.train_loader()
    trainer.resume(cfg.resume)
    with trainer.interruptible():
        start, end = fit(trainer, loader, sampler, train_step, loss_of, [scheduler], desc="[mediator]")
        if run.info.is_main:
            store.save("codebook", codebook.detach().float().cpu().numpy().astype(np.float32), run.flags())
            where = f"{tuple(codebook.shape)} saved to {store.path('codebook')}"
            print(f"[mediator] codebook {where}; fixed-batch modularity loss {start:.4f} -> {end:.4f}")
        trainer.remove_states()
    trainer.finish({"codebook": store.path("codebook"), **trainer.loss_summary("loss", start, end)}, ["loss"])


if __name__ == "__main__":
    cli.run(main, parser())
