"""Tokens of Meta-format DINOv3 files: ``models.backbone.load_backbone`` against Meta's own DINOv3 code.

    python benchmarks/check_dinov3.py --dinov3 PATH/TO/dinov3

``PATH/TO/dinov3`` is your checkout of facebookresearch/dinov3 (only imported, never copied). Tiny models of
the official recipe (RoPE base 100, 4 storage tokens, masked k bias, layer scale, LayerNorm eps 1e-5) with
the MLP FFN, the SwiGLU FFN of the ``plus`` models and the 7B's heads of 128 channels are built with Meta's
``DinoVisionTransformer``, every weight moved off its initial value, saved as state dicts in Meta's layout
and loaded by this project; the patch tokens are compared with Meta's
``forward_features(x)["x_norm_patchtokens"]`` at a square and a non-square size.
"""

import argparse
import os
import sys
import tempfile

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from models.backbone import load_backbone  # noqa: E402

RECIPE = dict(
    patch_size=16,
    pos_embed_rope_base=100,
    pos_embed_rope_normalize_coords="separate",
    pos_embed_rope_rescale_coords=2,
    pos_embed_rope_dtype="fp32",
    layerscale_init=1e-5,
    norm_layer="layernormbf16",
    n_storage_tokens=4,
    mask_k_bias=True,
)
MODELS = {
    "MLP FFN (S, B, L)": dict(embed_dim=128, depth=2, num_heads=2, ffn_ratio=4, ffn_layer="mlp"),
    "SwiGLU FFN (S+, H+)": dict(embed_dim=128, depth=2, num_heads=2, ffn_ratio=6, ffn_layer="swiglu"),
    "heads of 128 channels (7B)": dict(embed_dim=256, depth=2, num_heads=2, ffn_ratio=3, ffn_layer="swiglu64"),
}


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dinov3", required=True, help="your checkout of facebookresearch/dinov3")
    args = parser.parse_args()
    sys.path.insert(0, os.path.abspath(args.dinov3))
    from dinov3.models.vision_transformer import DinoVisionTransformer

    torch.manual_seed(0)
    print("| model | input | tokens | max abs difference |\n|---|---|---|---|")
    with tempfile.TemporaryDirectory() as folder:
        for name, sizes in MODELS.items():
            meta = DinoVisionTransformer(**RECIPE, **sizes)
            meta.init_weights()
            with torch.no_grad():
                for p in meta.parameters():
                    p.add_(0.05 * torch.randn_like(p))
            path = os.path.join(folder, "dinov3.pth")
            torch.save(meta.eval().state_dict(), path)
            ours = load_backbone(path).eval()
            for size in ((224, 224), (160, 256)):
                x = torch.randn(2, 3, *size)
                with torch.no_grad():
                    diff = (meta.forward_features(x)["x_norm_patchtokens"] - ours(x)).abs().max().item()
                print(f"| {name} | {size[0]}x{size[1]} | {tuple(ours(x).shape)} | {diff:.1e} |")


if __name__ == "__main__":
    main()
