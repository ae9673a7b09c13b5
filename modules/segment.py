"""Segmentation heads of CAUSE (SPEC §5, §6).

`SegmentMLP` / `SegmentTR` hold the student head and projection, their EMA teacher copies and the linear
probe; `Cluster` holds the concept codebook and the cluster probe. Module and parameter names follow the
released CAUSE checkpoints, so those load with `strict=True` (README, "Use the released CAUSE heads").
Tokens are `[B, N, D]` on a square, row-major `h x w` grid (`h = w = sqrt(N)`); every 1x1 convolution acts
on the `[B, D, h, w]` image of the tokens.
"""

import math

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor

from modules.ops import grid_side, vq


def tokens_to_image(x: Tensor) -> Tensor:
    """x: [B, N, D] -> [B, D, h, w] with h = w = sqrt(N), tokens row-major."""
    side = grid_side(x.shape[1])
    return x.permute(0, 2, 1).reshape(x.shape[0], x.shape[2], side, side)


def image_to_tokens(x: Tensor) -> Tensor:
    """x: [B, D, h, w] -> [B, h*w, D], row-major."""
    return x.flatten(2).permute(0, 2, 1)


def _reduce(f1: nn.Module, f2: nn.Module, drop: nn.Module, tokens: Tensor) -> Tensor:
    """tokens: [B, N, D] -> f1(drop(x)) + f2(drop(x)) [B, N, r] on their image, two independent dropout draws."""
    image = tokens_to_image(tokens)
    return image_to_tokens(f1(drop(image)) + f2(drop(image)))


def _reduction_convs(dim: int, reduced_dim: int) -> tuple[nn.Conv2d, nn.Sequential]:
    f1 = nn.Conv2d(dim, reduced_dim, kernel_size=1)
    f2 = nn.Sequential(nn.Conv2d(dim, dim, kernel_size=1), nn.ReLU(), nn.Conv2d(dim, reduced_dim, kernel_size=1))
    return f1, f2


class HeadMLP(nn.Module):
    """MLP head h(T) = f1(drop(T)) + f2(drop(T)); dropout only in train mode."""

    def __init__(self, dim: int, reduced_dim: int, dropout: float = 0.1):
        super().__init__()
        self.f1, self.f2 = _reduction_convs(dim, reduced_dim)
        self.drop = nn.Dropout(dropout)

    def forward(self, tokens: Tensor) -> Tensor:
        """tokens: [B, N, D] -> [B, N, r]"""
        return _reduce(self.f1, self.f2, self.drop, tokens)


class TokenProjection(nn.Module):
    """A 1x1 convolution applied per token: projection heads and the linear probe."""

    def __init__(self, in_dim: int, out_dim: int):
        super().__init__()
        self.f = nn.Conv2d(in_dim, out_dim, kernel_size=1)

    def forward(self, tokens: Tensor) -> Tensor:
        """tokens: [B, N, in_dim] -> [B, N, out_dim]"""
        return image_to_tokens(self.f(tokens_to_image(tokens)))


class DecoderLayer(nn.Module):
    """One DETR-style post-norm decoder layer (1 attention head) followed by the f1/f2 reduction.

    Sequence-first layout, as `nn.MultiheadAttention` with `batch_first=False`.
    """

    def __init__(self, dim: int, reduced_dim: int, hidden_dim: int = 2048, num_heads: int = 1, dropout: float = 0.1):
        super().__init__()
        self.self_attn = nn.MultiheadAttention(dim, num_heads, dropout=dropout)
        self.multihead_attn = nn.MultiheadAttention(dim, num_heads, dropout=dropout)
        self.linear1 = nn.Linear(dim, hidden_dim)
        self.dropout = nn.Dropout(dropout)
        self.linear2 = nn.Linear(hidden_dim, dim)
        self.norm1, self.norm2, self.norm3 = (nn.LayerNorm(dim) for _ in range(3))
        self.dropout1, self.dropout2, self.dropout3 = (nn.Dropout(dropout) for _ in range(3))
        self.f1, self.f2 = _reduction_convs(dim, reduced_dim)
        self.drop = nn.Dropout(dropout)

    def forward(self, query: Tensor, memory: Tensor, pos: Tensor) -> Tensor:
        """query: [N, B, D], memory: [N, B, D], pos: [N, 1, D] -> [B, N, r]"""
        t = query
        q = k = t + pos
        t = self.norm1(t + self.dropout1(self.self_attn(q, k, value=t)[0]))
        t = self.norm2(t + self.dropout2(self.multihead_attn(query=t + pos, key=memory, value=memory)[0]))
        t = t + self.dropout3(self.linear2(self.dropout(F.relu(self.linear1(t)))))
        t = memory + self.norm3(t)
        return _reduce(self.f1, self.f2, self.drop, t.transpose(0, 1))


class HeadTR(nn.Module):
    """TR head: codebook-quantised tokens attend to the tokens (SPEC §5).

    The codebook (the frozen stage-1 mediator) is a non-persistent buffer set by `set_codebook`, so it stays
    out of the state dict.
    """

    codebook: Tensor | None

    def __init__(self, dim: int, reduced_dim: int, num_queries: int, dropout: float = 0.1):
        super().__init__()
        self.num_queries = num_queries
        self.query_pos = nn.Parameter(torch.randn(num_queries, dim))
        self.tr = DecoderLayer(dim, reduced_dim, dropout=dropout)
        self.register_buffer("codebook", None, persistent=False)

    def set_codebook(self, codebook: Tensor) -> None:
        """codebook: [K, D], stored detached on the head's device and dtype."""
        dim = self.query_pos.shape[1]
        if codebook.dim() != 2 or codebook.shape[1] != dim:
            raise ValueError(f"codebook must have shape [K, {dim}], got {list(codebook.shape)}")
        self.codebook = codebook.detach().to(device=self.query_pos.device, dtype=self.query_pos.dtype)

    def forward(self, tokens: Tensor) -> Tensor:
        """tokens: [B, N, D] -> [B, N, r]; N must equal num_queries."""
        if (n := tokens.shape[1]) != self.num_queries:
            side = math.isqrt(self.num_queries)
            built = f"the TR head was built for train resolution {side}x{side} patches ({self.num_queries} tokens)"
            raise ValueError(f"{built}, got {n} tokens; use the train resolution (image side = {side} x patch size)")
        if self.codebook is None:
            raise RuntimeError("the TR head has no codebook: call set_codebook() with the stage-1 modular.npy first")
        query = vq(tokens, self.codebook)
        return self.tr(query.transpose(0, 1), tokens.transpose(0, 1), self.query_pos.unsqueeze(1))


@torch.no_grad()
def ema_init(student: nn.Module, teacher: nn.Module) -> None:
    """Copy the student's parameters into the teacher (new storage) and freeze the teacher."""
    ours, theirs = dict(student.named_parameters()), dict(teacher.named_parameters())
    if ours.keys() != theirs.keys():
        raise ValueError(f"student and teacher differ in parameters: {sorted(ours.keys() ^ theirs.keys())}")
    for name, param in ours.items():
        if param.shape != (target := theirs[name]).shape:
            raise ValueError(f"parameter {name}: student shape {list(param.shape)} != teacher {list(target.shape)}")
        target.copy_(param).requires_grad_(False)


@torch.no_grad()
def ema_update(student: nn.Module, teacher: nn.Module, momentum: float = 0.99, tied: bool = False) -> None:
    """teacher <- momentum * teacher + (1 - momentum) * student, in place.

    ``tied``: the teacher still shares the student's values, as the reference's teacher shares the student's
    storage from its initialisation until its first update (so the first update, after the first optimiser
    step, gives momentum * student + (1 - momentum) * student).
    """
    for student_param, teacher_param in zip(student.parameters(), teacher.parameters(), strict=True):
        previous = student_param if tied else teacher_param
        teacher_param.copy_(momentum * previous + (1 - momentum) * student_param)


class SegmentBase(nn.Module):
    """Student head + projection, EMA teacher copies and linear probe (set by subclasses).

    What differs between the heads lives in the subclasses: ``needs_codebook`` (the TR head's queries are
    codebook-quantised tokens), ``fixed_grid`` (the TR head only takes the patch grid it was trained on, so
    evaluation and whole pictures use that grid) and ``contrastive_views`` (where stage 2 samples the grid).
    """

    needs_codebook = False
    fixed_grid = False
    head: nn.Module
    projection_head: TokenProjection
    head_ema: nn.Module
    projection_head_ema: TokenProjection
    linear: TokenProjection

    @classmethod
    def create(cls, dim: int, reduced_dim: int, projection_dim: int, n_classes: int, num_queries: int):
        """The head for these sizes; ``num_queries`` (the training grid's tokens) matters to the TR head only."""
        return cls(dim, reduced_dim, projection_dim, n_classes)

    def set_codebook(self, codebook: Tensor) -> None:
        """codebook: [K, D], the frozen mediator; the MLP head does not read it."""

    def build(self, make_head, reduced_dim: int, projection_dim: int, n_classes: int) -> None:
        """Student head and projection, their teacher copies and the probe, in the released order."""
        self.head = make_head()
        self.projection_head = TokenProjection(reduced_dim, projection_dim)
        self.head_ema = make_head()
        self.projection_head_ema = TokenProjection(reduced_dim, projection_dim)
        self.linear = TokenProjection(reduced_dim, n_classes)
        self.init_teacher()

    def init_teacher(self) -> None:
        """Teacher := copy of the student, frozen."""
        ema_init(self.head, self.head_ema)
        ema_init(self.projection_head, self.projection_head_ema)

    def update_teacher(self, momentum: float = 0.99, tied: bool = False) -> None:
        """EMA step of head_ema and projection_head_ema towards the student (``tied``: see ``ema_update``)."""
        ema_update(self.head, self.head_ema, momentum, tied)
        ema_update(self.projection_head, self.projection_head_ema, momentum, tied)


class SegmentMLP(SegmentBase):
    """The MLP segmentation head of CAUSE: backbone tokens [B, N, dim] -> features [B, N, reduced_dim]."""

    def __init__(self, dim, reduced_dim=90, projection_dim=2048, n_classes=27, dropout=0.1):
        super().__init__()
        self.build(lambda: HeadMLP(dim, reduced_dim, dropout), reduced_dim, projection_dim, n_classes)

    def contrastive_views(self, tokens: Tensor, sample) -> tuple[Tensor, ...]:
        """SPEC §5 step 2, MLP: the head works per token, so both projections see only the sampled tokens.

        tokens: [B, N, D]; sample(x, order=None) -> (x at the grid picks, order). Returns the teacher features
        of every token for the probe [B, N, r], the sampled tokens [B, P, D], the student and teacher
        projections [B, P, E] (the teacher's without gradient).
        """
        teacher_feats = self.head_ema(tokens)
        sampled, _ = sample(tokens)
        with torch.no_grad():
            proj_ema = self.projection_head_ema(self.head_ema(sampled))
        return teacher_feats, sampled, self.projection_head(self.head(sampled)), proj_ema


class SegmentTR(SegmentBase):
    """The one-layer transformer-decoder head of CAUSE; its keys come from the codebook (``set_codebook``)."""

    needs_codebook = True
    fixed_grid = True

    def __init__(self, dim, reduced_dim=90, projection_dim=2048, n_classes=27, num_queries=400, dropout=0.1):
        super().__init__()
        self.build(lambda: HeadTR(dim, reduced_dim, num_queries, dropout), reduced_dim, projection_dim, n_classes)

    @classmethod
    def create(cls, dim: int, reduced_dim: int, projection_dim: int, n_classes: int, num_queries: int):
        return cls(dim, reduced_dim, projection_dim, n_classes, num_queries)

    def set_codebook(self, codebook: Tensor) -> None:
        """codebook: [K, D], the frozen mediator used by both head and head_ema."""
        self.head.set_codebook(codebook)
        self.head_ema.set_codebook(codebook)

    def contrastive_views(self, tokens: Tensor, sample) -> tuple[Tensor, ...]:
        """SPEC §5 step 2, TR: the decoder needs the whole grid, so every token is projected and the
        tokens and both projections are then sampled at the same grid picks (see SegmentMLP)."""
        teacher_feats = self.head_ema(tokens)
        with torch.no_grad():
            proj_ema = self.projection_head_ema(teacher_feats)
        proj = self.projection_head(self.head(tokens))
        sampled, order = sample(tokens)
        return teacher_feats, sampled, sample(proj, order)[0], sample(proj_ema, order)[0]


SEGMENT_HEADS = {"mlp": SegmentMLP, "tr": SegmentTR}


def init_codebook(num_codebook: int, dim: int) -> Tensor:
    """Concepts [K, D] uniform in +-1/K: the mediator's initial codebook (SPEC §4), the cluster probe (§6)."""
    return torch.empty(num_codebook, dim).uniform_(-1.0 / num_codebook, 1.0 / num_codebook)


class Cluster(nn.Module):
    """Concept codebook `[K, D]` and cluster probe `[C, r]`, both uniform in +-1/size."""

    def __init__(self, dim: int, reduced_dim: int, num_codebook: int, n_classes: int):
        super().__init__()
        self.codebook = nn.Parameter(init_codebook(num_codebook, dim))
        self.cluster_probe = nn.Parameter(init_codebook(n_classes, reduced_dim))

    def scores(self, feats: Tensor) -> Tensor:
        """Cosine similarity of every pixel feature with every centroid: feats [B, r, H, W] -> [B, C, H, W]."""
        if feats.dim() != 4 or feats.shape[1] != self.cluster_probe.shape[1]:
            raise ValueError(f"feats must have shape [B, {self.cluster_probe.shape[1]}, H, W], got {list(feats.shape)}")
        return torch.einsum("brhw,cr->bchw", F.normalize(feats, dim=1), F.normalize(self.cluster_probe, dim=1))


def linear_probe_loss(logits: Tensor, label: Tensor, n_classes: int) -> tuple[Tensor, Tensor, Tensor]:
    """Cross-entropy of the upsampled probe logits over pixels with 0 <= label < n_classes.

    logits: [B, C, h, w], label: [B, H, W] integer -> (loss, n_correct, n_counted). The logits are upsampled
    bilinearly (align_corners=False) to the label size. With no counted pixel the loss is a zero that keeps
    the graph. Counts are int64 0-dim tensors.
    """
    if logits.dim() != 4 or logits.shape[1] != n_classes:
        raise ValueError(f"logits must have shape [B, {n_classes}, h, w], got {list(logits.shape)}")
    if label.dim() != 3 or label.shape[0] != logits.shape[0]:
        raise ValueError(f"label must have shape [{logits.shape[0]}, H, W], got {list(label.shape)}")
    if label.is_floating_point() or label.is_complex():
        raise ValueError(f"label must be an integer tensor, got {label.dtype}")
    logits = F.interpolate(logits, size=label.shape[-2:], mode="bilinear", align_corners=False)
    flat_logits, flat_label = logits.permute(0, 2, 3, 1).reshape(-1, n_classes), label.reshape(-1).long()
    counted = (flat_label >= 0) & (flat_label < n_classes)
    counted_logits, counted_label = flat_logits[counted], flat_label[counted]
    loss = F.cross_entropy(counted_logits, counted_label) if counted_label.numel() else flat_logits.sum() * 0.0
    return loss, (counted_logits.argmax(dim=1) == counted_label).sum(), counted.sum()
