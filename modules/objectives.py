"""One training step of each CAUSE stage, as functions of tensors and modules (SPEC §4-7).

The stage scripts call these inside their loops; nothing here knows about optimisers,
logging or distribution.
"""

import torch
import torch.nn.functional as F

from modules.bank import front_door_loss
from modules.ops import grid_sample_tokens, modularity_loss, vq_index
from modules.segment import linear_probe_loss, tokens_to_image


def probe_loss(segment, teacher_feats, label, n_classes, detach=True):
    """Linear probe on teacher features [B, N, r] -> ``(loss, n_correct, n_counted)``.

    ``detach=True`` keeps the labels out of the features (SPEC §5 step 4, stage 3 label-free);
    ``detach=False`` lets the probe's gradient reach the teacher head (stage 3 as the reference).
    """
    logits = tokens_to_image(segment.linear(teacher_feats.detach() if detach else teacher_feats))
    return linear_probe_loss(logits, label, n_classes)


def mediator_loss(codebook, tokens, grid=True, generator=None, temp=0.1):
    """Stage 1: codebook [K, D], backbone tokens [B, N, D] -> modularity loss (SPEC §4)."""
    if grid:
        tokens, _ = grid_sample_tokens(tokens, generator=generator)
    return modularity_loss(codebook, tokens.detach(), temp=temp)


def front_door_step(segment, tokens, label, codebook, bank, head, n_classes, grid=True, generator=None,
                    temp=0.07, pos=0.3, neg=0.1):
    """Stage 2 losses for one batch (SPEC §5 "One training step", steps 2-4).

    tokens: [B, N, D] frozen backbone tokens; label: [B, H, W]; codebook: [K, D]; bank: a
    ConceptBank, or None for the loss without the bank term.
    Returns a dict with ``loss``, ``loss_front``, ``loss_linear``, ``n_correct``, ``n_counted``
    and what the bank update needs afterwards: ``sampled_tokens`` [B, P, D] and
    ``teacher_proj`` [B, P, E].
    """
    def sample(x, order=None):
        return grid_sample_tokens(x, order=order, generator=generator) if grid else (x, None)

    if head == "mlp":
        teacher_feats = segment.head_ema(tokens)
        sampled, _ = sample(tokens)
        with torch.no_grad():
            proj_ema = segment.projection_head_ema(segment.head_ema(sampled))
        proj = segment.projection_head(segment.head(sampled))
    else:
        teacher_feats = segment.head_ema(tokens)
        with torch.no_grad():
            proj_ema = segment.projection_head_ema(teacher_feats)
        proj = segment.projection_head(segment.head(tokens))
        sampled, order = sample(tokens)
        proj, _ = sample(proj, order)
        proj_ema, _ = sample(proj_ema, order)

    if bank is None:
        bank_feats, bank_idx = proj.new_zeros(0, proj.shape[-1]), torch.zeros(0, dtype=torch.long, device=proj.device)
    else:
        bank_feats, bank_idx = bank.loss_keys()
    loss_front = front_door_loss(sampled, proj, proj_ema.detach(), codebook, bank_feats, bank_idx,
                                 temp=temp, pos=pos, neg=neg)
    loss_linear, n_correct, n_counted = probe_loss(segment, teacher_feats, label, n_classes)
    return {"loss": loss_front + loss_linear, "loss_front": loss_front, "loss_linear": loss_linear,
            "n_correct": n_correct, "n_counted": n_counted,
            "sampled_tokens": sampled.detach(), "teacher_proj": proj_ema.detach()}


def update_bank(bank, codebook, sampled_tokens, teacher_proj, generator=None):
    """SPEC §5 step 6: store teacher projections [B, P, E] under their tokens' concepts."""
    concept_idx = vq_index(sampled_tokens, codebook).reshape(-1)
    bank.update(concept_idx, teacher_proj.reshape(-1, teacher_proj.shape[-1]), generator=generator)


def fine_tuning_step(segment, cluster_probe, tokens, label, n_classes, grid=True, generator=None,
                     reference=True, temp=0.1):
    """Stage 3 losses (SPEC §6): modularity of the teacher features against the cluster probe.

    cluster_probe: [C, r]; tokens: [B, N, D]. The teacher head runs in train mode (dropout on).
    The modularity loss detaches the features, so it trains ``cluster_probe`` only.
    ``reference=True``: the supervised probe reads the teacher features undetached, so its
    cross-entropy trains the teacher head, as the published CAUSE; ``False``: label-free, the
    probe reads detached features and the teacher head gets no gradient.
    """
    teacher_feats = segment.head_ema(tokens)
    feats = grid_sample_tokens(teacher_feats, generator=generator)[0] if grid else teacher_feats
    loss_mod = modularity_loss(cluster_probe, feats, temp=temp)
    loss_linear, n_correct, n_counted = probe_loss(segment, teacher_feats, label, n_classes, detach=not reference)
    return {"loss": loss_mod + loss_linear, "loss_mod": loss_mod, "loss_linear": loss_linear,
            "n_correct": n_correct, "n_counted": n_counted}


@torch.no_grad()
def flip_tta_features(backbone, teacher_head, img):
    """SPEC §7: u = (h(T(x)) + flip(h(T(flip x)))) / 2 on the patch grid.

    img: [B, 3, H, W] normalised -> u: [B, r, h, w]. Also returns the plain tokens [B, N, D].
    """
    tokens = backbone(img)
    feats = tokens_to_image(teacher_head(tokens))
    flipped = tokens_to_image(teacher_head(backbone(img.flip(dims=[3]))))
    return (feats + flipped.flip(dims=[3])) / 2, tokens


def upsample(x, size):
    """Bilinear, align_corners=False: [B, C, h, w] -> [B, C, H, W]."""
    return F.interpolate(x, size=size, mode="bilinear", align_corners=False)
