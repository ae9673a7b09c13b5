"""The stage wiring of modules/objectives.py against literal recipes written from SPEC §5-7.

The units (grid sampling, vq, the modularity and front-door losses, the bank) have their own
oracles; here each step is recomputed from SPEC's wording with the same grid picks (one
seeded generator drawing exactly what SPEC §1 draws), and losses and gradients must match.
Heads are built without dropout so that only the grid picks are random.
"""

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from modules.bank import ConceptBank
from modules.inference import flip_tta_features, upsample
from modules.objectives import (
    fine_tuning_step,
    front_door_loss,
    front_door_step,
    mediator_loss,
    modularity_loss,
    probe_loss,
    update_bank,
)
from modules.segment import SegmentMLP, SegmentTR, tokens_to_image
from tests._stub_backbone import PatchBackbone

B, SIDE, D, R, E, C, K = 2, 8, 16, 8, 12, 5, 4
CELL = 4
TOL = dict(rtol=1e-5, atol=1e-6)


def make_segment(head, dropout=0.0):
    torch.manual_seed(3)
    if head == "mlp":
        segment = SegmentMLP(D, R, E, C, dropout=dropout)
    else:
        segment = SegmentTR(D, R, E, C, SIDE * SIDE, dropout=dropout)
    # Teacher != student, so that mixing them up changes the numbers.
    with torch.no_grad():
        for p in [*segment.head_ema.parameters(), *segment.projection_head_ema.parameters()]:
            p.add_(0.1 * torch.randn_like(p))
    segment.train()
    # Everything may receive a gradient: only the wiring keeps it away from the teacher.
    segment.requires_grad_(True)
    return segment


def make_batch(seed=0):
    gen = torch.Generator().manual_seed(seed)
    codebook = torch.randn(K, D, generator=gen)
    tokens = torch.randn(B, SIDE * SIDE, D, generator=gen)
    label = torch.randint(-1, C + 1, (B, 20, 20), generator=gen)  # -1 and C are not counted
    return codebook, tokens, label


def draw_picks(seed, batch, cells):
    """SPEC §1: one pick in [0, k²) per (image, cell), image-major, as torch.randint draws it."""
    return torch.randint(CELL * CELL, (batch * cells,), generator=torch.Generator().manual_seed(seed))


def pick(x, order):
    """SPEC §1 literally: [B, N, D] -> [B, P, D], the token at pick o (row-major) of every cell."""
    cells_side = SIDE // CELL
    out = []
    for b in range(x.shape[0]):
        rows = []
        for cell in range(cells_side * cells_side):
            o = int(order[b * cells_side * cells_side + cell])
            row = (cell // cells_side) * CELL + o // CELL
            col = (cell % cells_side) * CELL + o % CELL
            rows.append(x[b, row * SIDE + col])
        out.append(torch.stack(rows))
    return torch.stack(out)


def probe_recipe(segment, u, label):
    """SPEC §5 step 4: CE(upsample(ℓ(u)), label) over pixels with 0 <= label < C."""
    logits = segment.linear.f(u.transpose(1, 2).reshape(u.shape[0], R, SIDE, SIDE))
    logits = F.interpolate(logits, size=label.shape[-2:], mode="bilinear", align_corners=False)
    target = torch.where((label >= 0) & (label < C), label, torch.full_like(label, -100))
    loss = F.cross_entropy(logits, target, ignore_index=-100)
    counted = target != -100
    return loss, int((logits.argmax(1) == target)[counted].sum()), int(counted.sum())


def front_door_recipe(segment, tokens, label, codebook, bank_feats, bank_idx, head, seed):
    """SPEC §5 "One training step", steps 2-4, written out."""
    u = segment.head_ema(tokens)
    order = draw_picks(seed, B, (SIDE // CELL) ** 2)
    if head == "mlp":
        sampled = pick(tokens, order)
        with torch.no_grad():
            z_bar = segment.projection_head_ema(segment.head_ema(sampled))
        z = segment.projection_head(segment.head(sampled))
    else:
        with torch.no_grad():
            z_bar_all = segment.projection_head_ema(u)
        z_all = segment.projection_head(segment.head(tokens))
        sampled, z, z_bar = pick(tokens, order), pick(z_all, order), pick(z_bar_all, order)
    loss_front = front_door_loss(sampled, z, z_bar, codebook, bank_feats, bank_idx)
    loss_linear, n_correct, n_counted = probe_recipe(segment, u.detach(), label)
    return loss_front, loss_linear, n_correct, n_counted, sampled, z_bar


@pytest.mark.parametrize("head", ["mlp", "tr"])
def test_front_door_step_with_dropout_matches_the_recipe_under_the_same_seed(head):
    """Dropout on: the MLP heads see only the sampled tokens, the TR heads the whole grid."""
    codebook, tokens, label = make_batch()
    segment = make_segment(head, dropout=0.3)
    if head == "tr":
        segment.set_codebook(codebook)
    torch.manual_seed(21)
    out = front_door_step(segment, tokens, label, codebook, None, C, generator=torch.Generator().manual_seed(11))
    torch.manual_seed(21)
    want = front_door_recipe(
        segment, tokens, label, codebook, torch.zeros(0, E), torch.zeros(0, dtype=torch.long), head, seed=11
    )
    torch.testing.assert_close(out["loss_front"], want[0], **TOL)
    torch.testing.assert_close(out["loss_linear"], want[1], **TOL)
    torch.testing.assert_close(out["teacher_proj"], want[5], **TOL)


def grads(segment, prefixes):
    """Gradients of the named parameters that received one."""
    return {
        name: p.grad.clone()
        for name, p in segment.named_parameters()
        if name.startswith(prefixes) and p.grad is not None
    }


def filled_bank(codebook, seed=5):
    gen = torch.Generator().manual_seed(seed)
    bank = ConceptBank(K, E, capacity=6)
    bank.update(torch.randint(K, (40,), generator=gen), torch.randn(40, E, generator=gen), generator=gen)
    return bank


@pytest.mark.parametrize("with_bank", [False, True], ids=["no_bank", "bank"])
@pytest.mark.parametrize("head", ["mlp", "tr"])
def test_front_door_step_matches_the_spec_recipe(head, with_bank):
    codebook, tokens, label = make_batch()
    bank = filled_bank(codebook) if with_bank else None
    bank_feats, bank_idx = bank.contents() if with_bank else (torch.zeros(0, E), torch.zeros(0, dtype=torch.long))
    assert bank_feats.shape[0] > 0 or not with_bank

    segment = make_segment(head)
    if head == "tr":
        segment.set_codebook(codebook)
    out = front_door_step(segment, tokens, label, codebook, bank, C, generator=torch.Generator().manual_seed(11))
    out["loss"].backward()
    trained = ("head.", "projection_head.", "linear.")
    got = grads(segment, trained)
    # The probe reads detached teacher features and the teacher projection is gradient-free.
    assert all(p.grad is None for name, p in segment.named_parameters() if "_ema." in name)

    segment.zero_grad(set_to_none=True)
    loss_front, loss_linear, n_correct, n_counted, sampled, z_bar = front_door_recipe(
        segment, tokens, label, codebook, bank_feats, bank_idx, head, seed=11
    )
    (loss_front + loss_linear).backward()
    want = grads(segment, trained)

    assert loss_front.item() > 0 and loss_linear.item() > 0
    torch.testing.assert_close(out["loss_front"], loss_front, **TOL)
    torch.testing.assert_close(out["loss_linear"], loss_linear, **TOL)
    torch.testing.assert_close(out["loss"], loss_front + loss_linear, **TOL)
    assert (out["probe_acc"], out["n_counted"]) == (100.0 * int(n_correct) / int(n_counted), int(n_counted))
    torch.testing.assert_close(out["sampled_tokens"], sampled, rtol=0, atol=0)
    torch.testing.assert_close(out["teacher_proj"], z_bar, **TOL)
    assert not out["sampled_tokens"].requires_grad and not out["teacher_proj"].requires_grad
    assert got.keys() == want.keys() and len(got) > 0
    for name in want:
        assert want[name].abs().sum() > 0, name
        torch.testing.assert_close(got[name], want[name], **TOL, msg=name)


@pytest.mark.parametrize("head", ["mlp", "tr"])
def test_front_door_step_with_the_default_generator_picks_one_grid(head):
    """Without a generator the picks come from the global CPU RNG, drawn once per step."""
    codebook, tokens, label = make_batch()
    segment = make_segment(head)
    if head == "tr":
        segment.set_codebook(codebook)
    torch.manual_seed(11)
    out = front_door_step(segment, tokens, label, codebook, None, C)
    torch.manual_seed(11)
    order = torch.randint(CELL * CELL, (B * (SIDE // CELL) ** 2,))
    torch.testing.assert_close(out["sampled_tokens"], pick(tokens, order), rtol=0, atol=0)
    with torch.no_grad():
        teacher = segment.projection_head_ema(segment.head_ema(tokens if head == "tr" else pick(tokens, order)))
    torch.testing.assert_close(out["teacher_proj"], pick(teacher, order) if head == "tr" else teacher, **TOL)


def test_front_door_step_without_grid_uses_every_token():
    codebook, tokens, label = make_batch()
    segment = make_segment("mlp")
    out = front_door_step(segment, tokens, label, codebook, None, C, grid=False)
    torch.testing.assert_close(out["sampled_tokens"], tokens, rtol=0, atol=0)
    with torch.no_grad():
        z_bar = segment.projection_head_ema(segment.head_ema(tokens))
        z = segment.projection_head(segment.head(tokens))
    torch.testing.assert_close(out["teacher_proj"], z_bar, **TOL)
    torch.testing.assert_close(
        out["loss_front"],
        front_door_loss(tokens, z, z_bar, codebook, torch.zeros(0, E), torch.zeros(0, dtype=torch.long)),
        **TOL,
    )


@pytest.mark.parametrize("setting", [dict(temp=0.5), dict(pos=-1.0), dict(neg=1.5)], ids=["temp", "pos", "neg"])
def test_front_door_step_passes_its_thresholds_and_temperature(setting):
    """pos=-1 makes every other token positive, neg=1.5 counts the token itself as a negative."""
    codebook, tokens, label = make_batch()
    segment = make_segment("mlp")
    out = front_door_step(segment, tokens, label, codebook, None, C, grid=False, **setting)
    with torch.no_grad():
        z_bar = segment.projection_head_ema(segment.head_ema(tokens))
        z = segment.projection_head(segment.head(tokens))
    no_bank = (torch.zeros(0, E), torch.zeros(0, dtype=torch.long))
    want = front_door_loss(tokens, z, z_bar, codebook, *no_bank, **setting)
    torch.testing.assert_close(out["loss_front"], want, **TOL)
    assert abs(want.item() - front_door_loss(tokens, z, z_bar, codebook, *no_bank).item()) > 1e-3


def test_probe_accuracy_is_a_percentage_of_the_counted_pixels_even_of_one():
    segment = make_segment("mlp")
    feats = torch.randn(1, 4, segment.linear.f.in_channels)
    predicted = int(tokens_to_image(segment.linear(feats)).argmax(1)[0, 0, 0])
    label = torch.full((1, 2, 2), -1, dtype=torch.long)
    label[0, 0, 0] = predicted  # one counted pixel, classified right (2x2 logits: no interpolation)
    assert (probe_loss(segment, feats, label, C)["probe_acc"], probe_loss(segment, feats, label, C)["n_counted"]) == (
        100.0,
        1,
    )
    label[0, 0, 0] = (predicted + 1) % C
    assert probe_loss(segment, feats, label, C)["probe_acc"] == 0.0
    assert probe_loss(segment, feats, torch.full((1, 2, 2), -1), C)["probe_acc"] == 0.0


@pytest.mark.parametrize("detach", [True, False])
def test_probe_loss_detach_switch(detach):
    codebook, tokens, label = make_batch()
    segment = make_segment("mlp")
    u = segment.head_ema(tokens)
    out = probe_loss(segment, u, label, C, detach=detach)
    loss = out["loss_linear"]
    want, want_correct, want_counted = probe_recipe(segment, u, label)
    torch.testing.assert_close(loss, want, **TOL)
    assert (out["probe_acc"], out["n_counted"]) == (100.0 * int(want_correct) / int(want_counted), int(want_counted))
    loss.backward()
    teacher = [p.grad for p in segment.head_ema.parameters()]
    assert segment.linear.f.weight.grad.abs().sum() > 0
    if detach:
        assert all(g is None for g in teacher)
    else:
        assert all(g is not None for g in teacher) and sum(g.abs().sum() for g in teacher) > 0


@pytest.mark.parametrize("reference", [True, False], ids=["reference", "label_free"])
@pytest.mark.parametrize("head", ["mlp", "tr"])
def test_fine_tuning_step_matches_the_spec_recipe(head, reference):
    """SPEC §6: modularity of the grid-sampled teacher features against Φ + the probe's CE."""
    codebook, tokens, label = make_batch()
    segment = make_segment(head)
    if head == "tr":
        segment.set_codebook(codebook)
    gen = torch.Generator().manual_seed(4)
    probe = nn.Parameter(torch.rand(C, R, generator=gen) * 0.4 - 0.2)
    out = fine_tuning_step(
        segment, probe, tokens, label, C, generator=torch.Generator().manual_seed(9), reference=reference
    )
    out["loss"].backward()
    got = {**grads(segment, ("linear.", "head_ema.")), "probe": probe.grad.clone()}
    assert all(p.grad is None for name, p in segment.named_parameters() if name.startswith(("head.", "projection")))
    segment.zero_grad(set_to_none=True)
    probe.grad = None

    u = segment.head_ema(tokens)
    loss_mod = modularity_loss(probe, pick(u, draw_picks(9, B, (SIDE // CELL) ** 2)))
    loss_linear, n_correct, n_counted = probe_recipe(segment, u if reference else u.detach(), label)
    (loss_mod + loss_linear).backward()
    want = {**grads(segment, ("linear.", "head_ema.")), "probe": probe.grad.clone()}

    torch.testing.assert_close(out["loss_mod"], loss_mod, **TOL)
    torch.testing.assert_close(out["loss_linear"], loss_linear, **TOL)
    torch.testing.assert_close(out["loss"], loss_mod + loss_linear, **TOL)
    assert (out["probe_acc"], out["n_counted"]) == (100.0 * int(n_correct) / int(n_counted), int(n_counted))
    assert got.keys() == want.keys()
    assert any(name.startswith("head_ema.") for name in want) == reference
    for name in want:
        assert want[name].abs().sum() > 0, name
        torch.testing.assert_close(got[name], want[name], **TOL, msg=name)


def test_fine_tuning_step_without_grid_and_with_its_temperature():
    codebook, tokens, label = make_batch()
    segment = make_segment("mlp")
    probe = torch.rand(C, R, generator=torch.Generator().manual_seed(4)) - 0.5
    out = fine_tuning_step(segment, probe, tokens, label, C, grid=False, temp=0.3)
    with torch.no_grad():
        want = modularity_loss(probe, segment.head_ema(tokens), temp=0.3)
    torch.testing.assert_close(out["loss_mod"], want, **TOL)
    # The default protocol is the reference's: the probe's cross-entropy reaches the teacher head.
    out["loss"].backward()
    assert all(p.grad is not None for p in segment.head_ema.parameters())


def cosine_argmax(x, codebook):
    """SPEC §2 literally: index of the most cosine-similar codebook row, per token."""
    return torch.tensor(
        [
            [max(range(codebook.shape[0]), key=lambda k: F.cosine_similarity(t, codebook[k], dim=0)) for t in image]
            for image in x
        ]
    )


def test_update_bank_stores_each_teacher_projection_under_its_tokens_concept():
    """keep_ratio 1 keeps every vector: the bank is then fully determined by the concepts."""
    codebook, tokens, _ = make_batch()
    gen = torch.Generator().manual_seed(2)
    sampled = tokens[:, :6]
    # Scale each token differently so that cosine and dot-product argmax disagree somewhere.
    sampled = sampled * torch.rand(B, 6, 1, generator=gen) * 10
    codebook = codebook * torch.arange(1, K + 1).unsqueeze(1)
    teacher_proj = torch.randn(B, 6, E, generator=gen)
    bank = ConceptBank(K, E, capacity=100, keep_ratio=1.0)
    update_bank(bank, codebook, sampled, teacher_proj)

    concepts = cosine_argmax(sampled, codebook).reshape(-1)
    assert not torch.equal(concepts, (sampled @ codebook.t()).argmax(-1).reshape(-1))
    assert len(set(concepts.tolist())) > 1
    flat = teacher_proj.reshape(-1, E)
    want_feats = torch.cat([flat[concepts == k] for k in range(K)])
    want_idx = torch.cat([concepts[concepts == k] for k in range(K)])
    feats, idx = bank.contents()
    torch.testing.assert_close(feats, want_feats, rtol=0, atol=0)
    assert torch.equal(idx, want_idx)


def test_update_bank_keeps_the_banks_random_half_with_the_given_generator():
    codebook, tokens, _ = make_batch()
    gen = torch.Generator().manual_seed(2)
    sampled = tokens[:, :12]
    teacher_proj = torch.randn(B, 12, E, generator=gen)
    bank = ConceptBank(K, E)
    update_bank(bank, codebook, sampled, teacher_proj, generator=torch.Generator().manual_seed(8))
    want = ConceptBank(K, E)
    want.update(
        cosine_argmax(sampled, codebook).reshape(-1),
        teacher_proj.reshape(-1, E),
        generator=torch.Generator().manual_seed(8),
    )
    assert len(bank) > 0
    for got_t, want_t in zip(bank.contents(), want.contents()):
        torch.testing.assert_close(got_t, want_t, rtol=0, atol=0)


def test_flip_tta_features_matches_the_spec():
    torch.manual_seed(0)
    backbone = PatchBackbone(SIDE, D)
    head = SegmentMLP(D, R, E, C).head_ema.eval()
    img = torch.randn(2, 3, 4 * SIDE, 4 * SIDE)
    u, tokens = flip_tta_features(backbone, head, img)

    def as_image(feats):
        return feats.reshape(feats.shape[0], SIDE, SIDE, R).permute(0, 3, 1, 2)

    with torch.no_grad():
        plain = as_image(head(backbone(img)))
        mirrored = as_image(head(backbone(img.flip(3)))).flip(3)
        torch.testing.assert_close(tokens, backbone(img), rtol=0, atol=0)
    # The stub is not flip-equivariant, so a missing flip-back (or one along the wrong axis) shows.
    assert (plain - mirrored).abs().max() > 0.1
    assert (mirrored - as_image(head(backbone(img.flip(3))))).abs().max() > 0.1
    assert u.shape == (2, R, SIDE, SIDE) and not u.requires_grad
    torch.testing.assert_close(u, (plain + mirrored) / 2, **TOL)


@pytest.mark.parametrize("grid", [True, False])
def test_mediator_loss_is_the_modularity_of_the_grid_sampled_tokens(grid):
    """SPEC §4: modularity loss of the codebook against the (grid-sampled, detached) tokens."""
    codebook, tokens, _ = make_batch()
    codebook = nn.Parameter(codebook)
    tokens.requires_grad_(True)
    loss = mediator_loss(codebook, tokens, grid=grid, generator=torch.Generator().manual_seed(6), temp=0.2)
    feats = pick(tokens, draw_picks(6, B, (SIDE // CELL) ** 2)) if grid else tokens
    want = modularity_loss(codebook, feats.detach(), temp=0.2)
    torch.testing.assert_close(loss, want, **TOL)
    assert abs(want.item() - modularity_loss(codebook, feats.detach()).item()) > 1e-4
    loss.backward()
    assert codebook.grad.abs().sum() > 0 and tokens.grad is None
    default = mediator_loss(codebook, tokens, generator=torch.Generator().manual_seed(6))
    torch.testing.assert_close(default, modularity_loss(codebook, pick(tokens, draw_picks(6, B, 4)).detach()), **TOL)


def test_upsample_is_bilinear_without_corner_alignment():
    x = torch.arange(8.0).reshape(1, 2, 2, 2)
    # align_corners=False: output pixel i samples (i + 0.5) / 2 - 0.5, clamped to the border.
    weights = torch.tensor([[1.0, 0.0], [0.75, 0.25], [0.25, 0.75], [0.0, 1.0]])
    torch.testing.assert_close(upsample(x, (4, 4)), weights @ x @ weights.t(), **TOL)
