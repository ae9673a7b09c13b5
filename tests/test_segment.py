import copy
import math
from collections import OrderedDict

import pytest
import torch

from modules.objectives import probe_loss
from modules.segment import (
    Cluster,
    DecoderLayer,
    HeadMLP,
    HeadTR,
    SegmentMLP,
    SegmentTR,
    ema_init,
    ema_update,
    image_to_tokens,
    linear_probe_loss,
    tokens_to_image,
)

D, R, E, C, NQ, K = 32, 8, 16, 5, 16, 10
FFN = 2048


def mlp_head_shapes(prefix):
    return {
        f"{prefix}.f1.weight": (R, D, 1, 1),
        f"{prefix}.f1.bias": (R,),
        f"{prefix}.f2.0.weight": (D, D, 1, 1),
        f"{prefix}.f2.0.bias": (D,),
        f"{prefix}.f2.2.weight": (R, D, 1, 1),
        f"{prefix}.f2.2.bias": (R,),
    }


def tr_head_shapes(prefix):
    shapes = {f"{prefix}.query_pos": (NQ, D)}
    for attn in ("self_attn", "multihead_attn"):
        shapes[f"{prefix}.tr.{attn}.in_proj_weight"] = (3 * D, D)
        shapes[f"{prefix}.tr.{attn}.in_proj_bias"] = (3 * D,)
        shapes[f"{prefix}.tr.{attn}.out_proj.weight"] = (D, D)
        shapes[f"{prefix}.tr.{attn}.out_proj.bias"] = (D,)
    shapes[f"{prefix}.tr.linear1.weight"] = (FFN, D)
    shapes[f"{prefix}.tr.linear1.bias"] = (FFN,)
    shapes[f"{prefix}.tr.linear2.weight"] = (D, FFN)
    shapes[f"{prefix}.tr.linear2.bias"] = (D,)
    for norm in ("norm1", "norm2", "norm3"):
        shapes[f"{prefix}.tr.{norm}.weight"] = (D,)
        shapes[f"{prefix}.tr.{norm}.bias"] = (D,)
    shapes.update(mlp_head_shapes(f"{prefix}.tr"))
    return shapes


def common_shapes():
    return {
        "projection_head.f.weight": (E, R, 1, 1),
        "projection_head.f.bias": (E,),
        "projection_head_ema.f.weight": (E, R, 1, 1),
        "projection_head_ema.f.bias": (E,),
        "linear.f.weight": (C, R, 1, 1),
        "linear.f.bias": (C,),
    }


def expected_shapes(kind):
    head_shapes = mlp_head_shapes if kind == "mlp" else tr_head_shapes
    return {**head_shapes("head"), **head_shapes("head_ema"), **common_shapes()}


def build(kind, codebook=None):
    if kind == "mlp":
        return SegmentMLP(D, reduced_dim=R, projection_dim=E, n_classes=C)
    segment = SegmentTR(D, reduced_dim=R, projection_dim=E, n_classes=C, num_queries=NQ)
    segment.set_codebook(torch.randn(K, D) if codebook is None else codebook)
    return segment


def random_state_dict(kind, seed=0):
    generator = torch.Generator().manual_seed(seed)
    return OrderedDict(
        (name, 0.3 * torch.randn(shape, generator=generator)) for name, shape in expected_shapes(kind).items()
    )


# literal formulations -------------------------------------------------------------------


def literal_vq(x, codebook):
    cos = torch.einsum("bnd,kd->bnk", x / x.norm(dim=-1, keepdim=True), codebook / codebook.norm(dim=-1, keepdim=True))
    return codebook[cos.argmax(dim=-1)]


def literal_attention(query, key, value, in_w, in_b, out_w, out_b):
    """Single-head scaled dot-product attention, batch-first [B, L, D]."""
    wq, wk, wv = in_w.chunk(3)
    bq, bk, bv = in_b.chunk(3)
    q = query @ wq.T + bq
    k = key @ wk.T + bk
    v = value @ wv.T + bv
    weights = torch.softmax(q @ k.transpose(1, 2) / math.sqrt(q.shape[-1]), dim=-1)
    return (weights @ v) @ out_w.T + out_b


def literal_layer_norm(x, weight, bias, eps=1e-5):
    mean = x.mean(dim=-1, keepdim=True)
    var = ((x - mean) ** 2).mean(dim=-1, keepdim=True)
    return (x - mean) / torch.sqrt(var + eps) * weight + bias


def literal_reduce(t, sd, prefix):
    """f1(t) + f2(t) as per-token linear maps: [B, N, D] -> [B, N, R]."""
    w1, b1 = sd[f"{prefix}.f1.weight"].flatten(1), sd[f"{prefix}.f1.bias"]
    w20, b20 = sd[f"{prefix}.f2.0.weight"].flatten(1), sd[f"{prefix}.f2.0.bias"]
    w22, b22 = sd[f"{prefix}.f2.2.weight"].flatten(1), sd[f"{prefix}.f2.2.bias"]
    return t @ w1.T + b1 + torch.relu(t @ w20.T + b20) @ w22.T + b22


def literal_tr_head(tokens, codebook, sd, prefix):
    p = f"{prefix}.tr"
    pos = sd[f"{prefix}.query_pos"]

    def attn(name, q, k, v):
        return literal_attention(
            q,
            k,
            v,
            sd[f"{p}.{name}.in_proj_weight"],
            sd[f"{p}.{name}.in_proj_bias"],
            sd[f"{p}.{name}.out_proj.weight"],
            sd[f"{p}.{name}.out_proj.bias"],
        )

    def norm(name, x):
        return literal_layer_norm(x, sd[f"{p}.{name}.weight"], sd[f"{p}.{name}.bias"])

    t = literal_vq(tokens, codebook)
    t = norm("norm1", t + attn("self_attn", t + pos, t + pos, t))
    t = norm("norm2", t + attn("multihead_attn", t + pos, tokens, tokens))
    hidden = torch.relu(t @ sd[f"{p}.linear1.weight"].T + sd[f"{p}.linear1.bias"])
    t = t + hidden @ sd[f"{p}.linear2.weight"].T + sd[f"{p}.linear2.bias"]
    t = tokens + norm("norm3", t)
    return literal_reduce(t, sd, p)


def literal_bilinear(x, out_h, out_w):
    """Bilinear upsampling with align_corners=False: [B, C, h, w] -> [B, C, out_h, out_w]."""

    def axis(in_size, out_size):
        src = ((torch.arange(out_size, dtype=torch.float64) + 0.5) * (in_size / out_size) - 0.5).clamp(min=0)
        i0 = src.floor().long()
        i1 = torch.where(i0 < in_size - 1, i0 + 1, i0)
        return i0, i1, (src - i0).to(x.dtype)

    y0, y1, ly = axis(x.shape[2], out_h)
    x0, x1, lx = axis(x.shape[3], out_w)
    rows = x[:, :, y0] * (1 - ly)[:, None] + x[:, :, y1] * ly[:, None]
    return rows[..., x0] * (1 - lx) + rows[..., x1] * lx


# state dicts -----------------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["mlp", "tr"])
def test_state_dict_names_and_shapes(kind):
    state = build(kind).state_dict()
    assert {name: tuple(t.shape) for name, t in state.items()} == expected_shapes(kind)


@pytest.mark.parametrize("kind", ["mlp", "tr"])
def test_strict_load_of_independently_written_state_dict(kind):
    segment = build(kind)
    written = random_state_dict(kind)
    segment.load_state_dict(written, strict=True)
    for name, tensor in segment.state_dict().items():
        assert torch.equal(tensor, written[name]), name


def test_codebook_is_kept_out_of_the_state_dict_but_used_by_both_heads():
    segment = build("tr")
    codebook = torch.randn(K, D)
    segment.set_codebook(codebook)
    assert not any("codebook" in name for name in segment.state_dict())
    assert torch.equal(segment.head.codebook, codebook)
    assert torch.equal(segment.head_ema.codebook, codebook)


def test_cluster_state_dict_and_init_ranges():
    cluster = Cluster(D, R, num_codebook=64, n_classes=C)
    state = cluster.state_dict()
    assert {name: tuple(t.shape) for name, t in state.items()} == {"codebook": (64, D), "cluster_probe": (C, R)}
    assert cluster.codebook.abs().max() <= 1 / 64
    assert cluster.codebook.abs().max() > 0.9 / 64
    assert cluster.cluster_probe.abs().max() <= 1 / C
    assert cluster.cluster_probe.abs().max() > 0.5 / C
    assert cluster.codebook.requires_grad and cluster.cluster_probe.requires_grad


# forward passes --------------------------------------------------------------------------


def test_tokens_image_layout_is_row_major():
    x = torch.randn(2, 12, 3)
    with pytest.raises(ValueError, match="square grid"):
        tokens_to_image(x)
    x = torch.randn(2, 9, 3)
    image = tokens_to_image(x)
    assert image.shape == (2, 3, 3, 3)
    assert torch.equal(image[1, :, 2, 1], x[1, 2 * 3 + 1])
    assert torch.equal(image_to_tokens(image), x)


def test_mlp_head_matches_literal_in_eval():
    segment = build("mlp")
    sd = random_state_dict("mlp")
    segment.load_state_dict(sd)
    segment.eval()
    tokens = torch.randn(2, 16, D)
    for prefix in ("head", "head_ema"):
        out = getattr(segment, prefix)(tokens)
        assert out.shape == (2, 16, R)
        torch.testing.assert_close(out, literal_reduce(tokens, sd, prefix), rtol=1e-5, atol=1e-5)


def test_tr_head_matches_literal_in_eval():
    codebook = torch.randn(K, D)
    segment = build("tr", codebook)
    sd = random_state_dict("tr")
    segment.load_state_dict(sd)
    segment.eval()
    tokens = torch.randn(3, NQ, D)
    for prefix in ("head", "head_ema"):
        out = getattr(segment, prefix)(tokens)
        assert out.shape == (3, NQ, R)
        torch.testing.assert_close(out, literal_tr_head(tokens, codebook, sd, prefix), rtol=1e-4, atol=1e-4)


def test_tr_head_uses_raw_codebook_rows_as_queries():
    codebook = torch.randn(K, D)
    segment = build("tr", codebook)
    segment.load_state_dict(random_state_dict("tr"))
    segment.eval()
    tokens = torch.randn(2, NQ, D)
    scaled = build("tr", codebook * 3.0)
    scaled.load_state_dict(segment.state_dict())
    scaled.eval()
    # Same argmax, different query vectors: the raw rows must reach the decoder.
    assert not torch.allclose(segment.head(tokens), scaled.head(tokens), atol=1e-4)


@pytest.mark.parametrize("kind", ["mlp", "tr"])
def test_projection_and_linear_probe_are_per_token_linear_maps(kind):
    segment = build(kind)
    sd = random_state_dict(kind)
    segment.load_state_dict(sd)
    feats = torch.randn(2, NQ, R)
    for name in ("projection_head", "projection_head_ema", "linear"):
        out = getattr(segment, name)(feats)
        expected = feats @ sd[f"{name}.f.weight"].flatten(1).T + sd[f"{name}.f.bias"]
        assert out.shape == expected.shape
        torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("kind", ["mlp", "tr"])
def test_teacher_equals_student_at_construction(kind):
    segment = build(kind).eval()
    state = segment.state_dict()
    for name, tensor in state.items():
        if name.startswith(("head.", "projection_head.")):
            teacher_name = name.replace("head.", "head_ema.", 1)
            assert torch.equal(tensor, state[teacher_name]), name
    tokens = torch.randn(2, NQ, D)
    # Not bitwise: matmul folds differently when its input requires grad (student only).
    torch.testing.assert_close(segment.head(tokens), segment.head_ema(tokens), rtol=1e-6, atol=1e-6)
    feats = torch.randn(2, NQ, R)
    torch.testing.assert_close(segment.projection_head(feats), segment.projection_head_ema(feats), rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("kind", ["mlp", "tr"])
def test_dropout_active_in_train_and_inactive_in_eval(kind):
    segment = build(kind)
    tokens = torch.randn(2, NQ, D)
    segment.train()
    assert not torch.allclose(segment.head(tokens), segment.head(tokens))
    assert not torch.allclose(segment.head_ema(tokens), segment.head_ema(tokens))
    segment.eval()
    assert torch.equal(segment.head(tokens), segment.head(tokens))
    assert torch.equal(segment.head_ema(tokens), segment.head_ema(tokens))


def test_mlp_head_draws_two_independent_dropout_masks():
    segment = SegmentMLP(D, reduced_dim=R, projection_dim=E, n_classes=C, dropout=0.5)
    head = segment.head
    # out[:, :, 0] = drop_a(x)[0] - drop_b(x)[0]: zero everywhere iff both draws share the mask.
    with torch.no_grad():
        for param in head.parameters():
            param.zero_()
        head.f1.weight[0, 0] = 1.0
        head.f2[0].weight.copy_(torch.eye(D)[:, :, None, None])
        head.f2[2].weight[0, 0] = -1.0
    tokens = torch.rand(4, 64, D) + 0.5
    head.train()
    assert head(tokens)[..., 0].abs().max() > 0.5
    head.eval()
    assert torch.equal(head(tokens)[..., 0], torch.zeros(4, 64))


# errors ----------------------------------------------------------------------------------


def test_tr_head_rejects_other_token_counts():
    segment = build("tr")
    with pytest.raises(ValueError, match=r"built for train resolution 4x4 patches \(16 tokens\), got 25 tokens"):
        segment.head(torch.randn(1, 25, D))


def test_tr_head_without_codebook_is_a_clear_error():
    segment = SegmentTR(D, reduced_dim=R, projection_dim=E, n_classes=C, num_queries=NQ)
    with pytest.raises(RuntimeError, match="set_codebook"):
        segment.head_ema(torch.randn(1, NQ, D))


def test_set_codebook_checks_width():
    segment = SegmentTR(D, reduced_dim=R, projection_dim=E, n_classes=C, num_queries=NQ)
    with pytest.raises(ValueError, match=r"codebook must have shape \[K, 32\], got \[10, 31\]"):
        segment.set_codebook(torch.randn(K, D - 1))


def test_mlp_head_rejects_non_square_token_grid():
    with pytest.raises(ValueError, match="N=15"):
        build("mlp").head(torch.randn(1, 15, D))


# EMA teacher -----------------------------------------------------------------------------


def test_ema_init_copies_and_freezes():
    segment = build("mlp")
    with torch.no_grad():
        for param in segment.head.parameters():
            param.normal_()
    ema_init(segment.head, segment.head_ema)
    before = {name: p.clone() for name, p in segment.head_ema.named_parameters()}
    for (name, student), teacher in zip(segment.head.named_parameters(), segment.head_ema.parameters()):
        assert torch.equal(student, teacher), name
        assert student.data_ptr() != teacher.data_ptr()
        assert not teacher.requires_grad
        assert student.requires_grad
    with torch.no_grad():
        for param in segment.head.parameters():
            param.add_(1.0)
    for name, teacher in segment.head_ema.named_parameters():
        assert torch.equal(teacher, before[name]), name


def test_ema_init_rejects_mismatched_modules():
    with pytest.raises(ValueError, match="student shape"):
        ema_init(torch.nn.Linear(3, 4), torch.nn.Linear(3, 5))


def student_parameters(segment):
    return [*segment.head.parameters(), *segment.projection_head.parameters()]


def teacher_modules(segment):
    return segment.head_ema, segment.projection_head_ema


@pytest.mark.parametrize("momentum", [0.99, 0.9])
def test_ema_update_formula(momentum):
    segment = build("tr")
    with torch.no_grad():
        for param in student_parameters(segment):
            param.add_(torch.randn_like(param))
    students = [p.clone() for p in student_parameters(segment)]
    teachers = [p.clone() for m in teacher_modules(segment) for p in m.parameters()]
    segment.update_teacher(momentum)
    updated = [p for m in teacher_modules(segment) for p in m.parameters()]
    assert len(updated) == len(students) == len(teachers)
    for student, teacher, new in zip(students, teachers, updated):
        assert torch.equal(new, momentum * teacher + (1 - momentum) * student)
        assert not new.requires_grad
    for student, param in zip(students, student_parameters(segment)):
        assert torch.equal(student, param)


def test_ema_update_function_on_plain_modules():
    student, teacher = torch.nn.Linear(4, 3), torch.nn.Linear(4, 3)
    ema_init(student, teacher)
    with torch.no_grad():
        student.weight.fill_(1.0)
    old = teacher.weight.clone()
    ema_update(student, teacher, momentum=0.75)
    assert torch.equal(teacher.weight, 0.75 * old + 0.25 * torch.ones(3, 4))


@pytest.mark.parametrize("kind", ["mlp", "tr"])
def test_first_teacher_update_follows_the_tied_reference_teacher(kind):
    """The reference's ``ema_init`` makes the teacher share the student's storage
    (``param_ema.data = param.data``), so the optimiser's first step moves the teacher too, and its
    first update averages the stepped student with itself; later updates average separate tensors."""
    torch.manual_seed(0)
    project = build(kind).train()
    literal = copy.deepcopy(project)
    for student, teacher in ((literal.head, literal.head_ema), (literal.projection_head, literal.projection_head_ema)):
        for param, param_ema in zip(student.parameters(), teacher.parameters()):
            param_ema.data = param.data  # the reference's tie
    tokens = torch.randn(2, NQ, D)
    for step in range(3):
        for model in (project, literal):
            optimizer = torch.optim.SGD([*model.head.parameters(), *model.projection_head.parameters()], lr=0.5)
            torch.manual_seed(step)
            model.projection_head(model.head(tokens)).square().mean().backward()
            optimizer.step()
            optimizer.zero_grad()
        project.update_teacher(0.9, tied=step == 0)
        with torch.no_grad():
            for student, teacher in (
                (literal.head, literal.head_ema),
                (literal.projection_head, literal.projection_head_ema),
            ):
                for param, param_ema in zip(student.parameters(), teacher.parameters()):
                    param_ema.data = 0.9 * param_ema.data + (1 - 0.9) * param.data  # the reference's update
        for (name, ours), theirs in zip(project.named_parameters(), literal.parameters()):
            assert torch.equal(ours, theirs), (step, name)


@pytest.mark.parametrize("kind", ["mlp", "tr"])
def test_teacher_gets_no_gradient_through_student_loss(kind):
    segment = build(kind).train()
    tokens = torch.randn(2, NQ, D)
    student = segment.projection_head(segment.head(tokens))
    teacher = segment.projection_head_ema(segment.head_ema(tokens))
    assert not teacher.requires_grad
    (student * teacher).sum().backward()
    for module in teacher_modules(segment):
        assert all(p.grad is None for p in module.parameters())
    assert all(p.grad is not None for p in student_parameters(segment))


# linear probe ----------------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["mlp", "tr"])
def test_probe_on_detached_teacher_features_reaches_only_the_probe(kind):
    segment = build(kind).train()
    # Stage 3 trains the teacher head: even then the probe must not reach it.
    segment.head_ema.requires_grad_(True)
    tokens = torch.randn(2, NQ, D)
    label = torch.randint(-1, C, (2, 12, 12))
    loss = probe_loss(segment, segment.head_ema(tokens), label, C)["loss_linear"]
    loss.backward()
    assert all(p.grad is not None for p in segment.linear.parameters())
    for module in (segment.head, segment.head_ema, segment.projection_head, segment.projection_head_ema):
        assert all(p.grad is None for p in module.parameters())


def test_linear_probe_loss_matches_literal_and_ignores_out_of_range_labels():
    torch.manual_seed(0)
    logits = torch.randn(2, C, 3, 3, requires_grad=True)
    label = torch.randint(0, C, (2, 7, 7))
    label[0, 0, :] = -1
    label[1, 3, 2] = C
    label[1, 5, 5] = 255
    loss, n_correct, n_counted = linear_probe_loss(logits, label, C)

    up = literal_bilinear(logits, 7, 7)
    log_probs = torch.log_softmax(up, dim=1)
    terms, correct = [], 0
    for b in range(2):
        for y in range(7):
            for x in range(7):
                target = int(label[b, y, x])
                if 0 <= target < C:
                    terms.append(-log_probs[b, target, y, x])
                    correct += int(up[b, :, y, x].argmax() == target)
    torch.testing.assert_close(loss, torch.stack(terms).mean(), rtol=1e-5, atol=1e-6)
    assert int(n_counted) == len(terms) == 2 * 49 - 7 - 2
    assert int(n_correct) == correct

    relabelled = label.clone()
    relabelled[relabelled == -1] = 77
    relabelled[relabelled == 255] = -5
    assert torch.equal(linear_probe_loss(logits, relabelled, C)[0], loss)


def test_linear_probe_loss_without_counted_pixels_is_zero():
    logits = torch.randn(1, C, 2, 2, requires_grad=True)
    loss, n_correct, n_counted = linear_probe_loss(logits, torch.full((1, 4, 4), -1), C)
    assert loss.item() == 0.0 and int(n_correct) == 0 and int(n_counted) == 0
    loss.backward()
    assert torch.equal(logits.grad, torch.zeros_like(logits))


def test_linear_probe_loss_input_checks():
    with pytest.raises(ValueError, match=r"logits must have shape \[B, 5, h, w\]"):
        linear_probe_loss(torch.randn(1, 4, 2, 2), torch.zeros(1, 4, 4, dtype=torch.long), C)
    with pytest.raises(ValueError, match="integer"):
        linear_probe_loss(torch.randn(1, C, 2, 2), torch.zeros(1, 4, 4), C)
    with pytest.raises(ValueError, match=r"label must have shape \[1, H, W\]"):
        linear_probe_loss(torch.randn(1, C, 2, 2), torch.zeros(2, 4, 4, dtype=torch.long), C)


# cluster ---------------------------------------------------------------------------------


def test_cluster_scores_are_cosine_similarities():
    cluster = Cluster(D, R, num_codebook=K, n_classes=C)
    feats = torch.randn(2, R, 3, 4)
    scores = cluster.scores(feats)
    assert scores.shape == (2, C, 3, 4)
    probe = cluster.cluster_probe.detach()
    for b, y, x in [(0, 0, 0), (1, 2, 3), (0, 1, 2)]:
        f = feats[b, :, y, x]
        expected = (probe @ f) / (probe.norm(dim=1) * f.norm())
        torch.testing.assert_close(scores[b, :, y, x], expected, rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match=r"feats must have shape \[B, 8, H, W\]"):
        cluster.scores(torch.randn(2, R + 1, 3, 4))


def test_cluster_scores_pass_gradient_to_probe_and_features():
    cluster = Cluster(D, R, num_codebook=K, n_classes=C)
    feats = torch.randn(1, R, 2, 2, requires_grad=True)
    cluster.scores(feats).sum().backward()
    assert cluster.cluster_probe.grad is not None and feats.grad is not None


def test_published_defaults_of_the_heads():
    mlp = SegmentMLP(8)
    assert mlp.head.f1.out_channels == 90 and mlp.projection_head.f.out_channels == 2048
    assert mlp.linear.f.out_channels == 27 and mlp.head.drop.p == 0.1
    tr = SegmentTR(8)
    assert tr.head.num_queries == 400 and tr.head.query_pos.shape == (400, 8)
    assert tr.head.tr.f1.out_channels == 90 and tr.projection_head.f.out_channels == 2048
    assert tr.linear.f.out_channels == 27 and tr.head.tr.drop.p == 0.1
    assert tr.head.tr.self_attn.dropout == 0.1 and tr.head.tr.multihead_attn.dropout == 0.1
    assert DecoderLayer(8, 4).dropout.p == 0.1 and HeadMLP(8, 4).drop.p == 0.1
    assert DecoderLayer(8, 4, dropout=0.3).self_attn.dropout == 0.3
    assert DecoderLayer(8, 4, dropout=0.3).multihead_attn.dropout == 0.3


def test_update_teacher_default_momentum_is_0_99():
    torch.manual_seed(0)
    model, reference = SegmentMLP(4, 3, 5, 2), SegmentMLP(4, 3, 5, 2)
    reference.load_state_dict(model.state_dict())
    with torch.no_grad():
        for param in [*model.head.parameters(), *reference.head.parameters()]:
            param.add_(1.0)
    model.update_teacher()
    reference.update_teacher(0.99)
    for name, value in model.state_dict().items():
        assert torch.equal(value, reference.state_dict()[name]), name


def test_cluster_init_is_symmetric_uniform():
    torch.manual_seed(0)
    cluster = Cluster(dim=6, reduced_dim=5, num_codebook=4, n_classes=3)
    for values, bound in ((cluster.codebook.detach(), 1 / 4), (cluster.cluster_probe.detach(), 1 / 3)):
        assert float(values.min()) < 0 < float(values.max())
        assert float(values.abs().max()) <= bound


def test_tr_codebook_follows_the_head_and_error_text():
    head = HeadTR(4, 3, num_queries=4).double()
    with pytest.raises(
        RuntimeError,
        match=r"^the TR head has no codebook: call set_codebook\(\) with the "
        r"stage-1 modular\.npy first$",
    ):
        head(torch.randn(1, 4, 4, dtype=torch.float64))
    head.set_codebook(torch.randn(5, 4))
    assert head.codebook.dtype == torch.float64
    meta_head = HeadTR(4, 3, num_queries=4).to("meta")
    meta_head.set_codebook(torch.randn(5, 4))
    assert meta_head.codebook.device.type == "meta"
