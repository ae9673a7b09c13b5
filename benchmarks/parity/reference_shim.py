"""Run-time patches that let the authors' CAUSE scripts train on a CPU, in one process, on the toy data.

Applied by ``run_reference.py`` inside the process that executes an authors' stage script; the
authors' files are never edited for these (the one textual patch, on a scratch copy, is in
``parity.py``: ``CLIP_PATCH``). Every patch is listed in ``PATCHES`` with its reason, and none
touches a line of the method: losses, heads, optimisers, schedules and the data pipeline run
as the authors wrote them.
"""

import argparse
import contextlib
import functools
import os
import sys
import types

import numpy as np
import torch
import torch.nn as nn

PATCHES = (
    (
        "cuda",
        "Tensor.cuda / Module.cuda return the CPU object; torch.cuda.set_device is a no-op; torch.load maps "
        "to the CPU: the scripts call .cuda() everywhere",
    ),
    (
        "amp",
        "torch.cuda.amp.autocast is off and GradScaler disabled: CPU runs are float32 (the project's CPU runs too)",
    ),
    (
        "timm",
        "the authors' PatchEmbed subclass ignores keyword arguments that timm >= 0.9 passes and it does "
        "not know (dynamic_img_pad=False and the like: no effect on the tokens)",
    ),
    (
        "tiny",
        "models.dinomaevit.dino_vit_tiny_16: the DINO ViT of the authors' file at width 192 and 3 heads, "
        "for the toy backbone; args.dim is read from the checkpoint when the file name names no size",
    ),
    (
        "toy",
        "loader.dataloader.dataloader for --dataset toy: the toy images through the authors' own "
        "ContrastiveSegDataset / CroppedDataset and transforms, from a crop-style folder the harness wrote",
    ),
    ("tensorboardX", "an inert SummaryWriter when tensorboardX is not installed (used only with --distributed yes)"),
)

TOY_CLASSES = 6


def install_cpu():
    torch.Tensor.cuda = lambda self, *args, **kwargs: self
    nn.Module.cuda = lambda self, *args, **kwargs: self
    torch.cuda.set_device = lambda *args, **kwargs: None
    load = torch.load

    @functools.wraps(load)
    def load_on_cpu(*args, **kwargs):
        kwargs["map_location"] = "cpu"
        kwargs.setdefault("weights_only", False)
        return load(*args, **kwargs)

    torch.load = load_on_cpu


def install_no_amp():
    import torch.cuda.amp as cuda_amp

    cuda_amp.autocast = lambda *args, **kwargs: contextlib.nullcontext()
    cuda_amp.GradScaler = lambda *args, **kwargs: torch.amp.GradScaler("cpu", enabled=False)


def install_timm_compat():
    import models.dinomaevit as dinomaevit

    base_init = dinomaevit.PatchEmbed_DimensionFree.__init__
    known = ("img_size", "patch_size", "in_chans", "embed_dim", "norm_layer", "flatten", "bias")

    def init(self, *args, **kwargs):
        base_init(self, *args, **{k: v for k, v in kwargs.items() if k in known})

    dinomaevit.PatchEmbed_DimensionFree.__init__ = init


def install_tiny_vit():
    import models.dinomaevit as dinomaevit

    def dino_vit_tiny_16(**kwargs):
        return dinomaevit.DINOMAEVisionTransformer(
            patch_size=16,
            embed_dim=192,
            depth=12,
            num_heads=3,
            mlp_ratio=4,
            qkv_bias=True,
            norm_layer=functools.partial(nn.LayerNorm, eps=1e-6),
            **kwargs,
        )

    dinomaevit.dino_vit_tiny_16 = dino_vit_tiny_16
    parse_args = argparse.ArgumentParser.parse_args

    def parse_with_dim(self, *args, **kwargs):
        parsed = parse_args(self, *args, **kwargs)
        ckpt = getattr(parsed, "ckpt", "")
        if ckpt and os.path.isfile(ckpt) and not hasattr(parsed, "dim"):
            parsed.dim = int(torch.load(ckpt, map_location="cpu", weights_only=True)["cls_token"].shape[-1])
        return parsed

    argparse.ArgumentParser.parse_args = parse_with_dim


def install_tensorboard_stub():
    try:
        import tensorboardX  # noqa: F401
    except ImportError:
        stub = types.ModuleType("tensorboardX")

        class SummaryWriter:
            def __init__(self, *args, **kwargs):
                pass

            def add_scalar(self, *args, **kwargs):
                pass

            def close(self):
                pass

        stub.SummaryWriter = SummaryWriter
        sys.modules["tensorboardX"] = stub


def install_toy_loader(toy_crops):
    """--dataset toy reads ``toy_crops/{img,label}/{train,val}/<i>.{jpg,png}`` (labels stored + 1)."""
    from torch.utils.data import DataLoader
    from torchvision import transforms

    import loader.dataloader as dataloader_module
    from utils.utils import get_cococity_transform

    original = dataloader_module.dataloader

    class ToyCrops(dataloader_module.CroppedDataset):
        def __init__(self, split, transform, target_transform):
            self.dataset_name = "toy"
            self.split = split
            self.root = toy_crops
            self.transform = transform
            self.target_transform = target_transform
            self.img_dir = os.path.join(toy_crops, "img", split)
            self.label_dir = os.path.join(toy_crops, "label", split)
            self.num_images = len(os.listdir(self.img_dir))

    def toy_set(split, resolution):
        wrapped = dataloader_module.ContrastiveSegDataset.__new__(dataloader_module.ContrastiveSegDataset)
        wrapped.image_set = split
        wrapped.dataset_name = "toy"
        wrapped.extra_transform = None
        wrapped.normalize = transforms.Normalize([0.485, 0.456, 0.406], [0.229, 0.224, 0.225])
        wrapped.dataset = ToyCrops(
            split, get_cococity_transform(resolution, False), get_cococity_transform(resolution, True)
        )
        return wrapped

    def dataloader(args, no_ddp_train_shuffle=True):
        if args.dataset != "toy":
            return original(args, no_ddp_train_shuffle)
        args.n_classes = TOY_CLASSES
        splits = (("train", args.train_resolution, no_ddp_train_shuffle), ("val", args.test_resolution, False))
        train, test = (
            DataLoader(toy_set(split, res), args.batch_size, shuffle=shuffle, num_workers=args.num_workers)
            for split, res, shuffle in splits
        )
        return train, test, None

    dataloader_module.dataloader = dataloader


def seed_all(seed):
    import random

    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def install(reference_root, toy_crops):
    """Every patch of ``PATCHES``; ``reference_root`` is put first on ``sys.path``."""
    sys.path.insert(0, reference_root)
    install_cpu()
    install_no_amp()
    install_tensorboard_stub()
    install_timm_compat()
    install_tiny_vit()
    install_toy_loader(toy_crops)
