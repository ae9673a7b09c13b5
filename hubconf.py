"""torch.hub entries: a trained CAUSE segmenter from local files. ``source="local"`` reads this clone's folder
and every argument is a path on your disk: nothing is fetched.

    segmenter = torch.hub.load(
        "/path/to/this/clone", "cause_tr", source="local",  # a folder on disk, never a repository name
        ckpt="/data/checkpoint/dinov2_vitb14_reg4_pretrain.pth", segment="/data/CAUSE/segment_tr.pth",
        cluster="/data/CAUSE/cluster_tr.pth", codebook="/data/CAUSE/modular.npy",
    )

Both take the arguments of ``engine.segmenter.CauseSegmenter.from_files`` and return that module.
"""

from engine.segmenter import CauseSegmenter

dependencies = ["torch", "torchvision", "timm", "numpy", "scipy", "PIL", "pydensecrf", "safetensors"]


def cause_mlp(ckpt, segment, cluster, codebook=None, **options):
    """CAUSE with the MLP head: backbone checkpoint, segment_mlp.pth and cluster_mlp.pth by path."""
    return CauseSegmenter.from_files(ckpt, segment, cluster, codebook, head="mlp", **options)


def cause_tr(ckpt, segment, cluster, codebook, **options):
    """CAUSE with the transformer head: backbone checkpoint, segment_tr.pth, cluster_tr.pth and modular.npy."""
    return CauseSegmenter.from_files(ckpt, segment, cluster, codebook, head="tr", **options)
