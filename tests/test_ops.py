import pytest
import torch
import torch.nn.functional as F

from modules.objectives import modularity_loss, modularity_matrix, soft_comembership
from modules.ops import cosine_similarity_matrix, grid_sample_tokens, vq, vq_index

DTYPES = [torch.float32, torch.float64]
TOLERANCES = {torch.float32: dict(rtol=1e-4, atol=1e-7), torch.float64: dict(rtol=1e-10, atol=1e-14)}


def literal_comembership(concepts, feats, temp):
    """Δ through the full [B, K, P, P] tensor, as the reference writes it."""
    assignment = (F.normalize(feats, dim=2) @ F.normalize(concepts, dim=1).t()).clamp(0)
    by_concept = assignment.transpose(2, 1)
    return torch.tanh(by_concept.unsqueeze(3) @ by_concept.unsqueeze(2) / temp).max(dim=1).values


def literal_modularity_loss(concepts, feats, temp=0.1):
    """SPEC §3 term by term: A, d, e, W = A − d dᵀ/e, Q = Σ_ij W_ij Δ_ji / e."""
    feats = feats.detach()
    normed = F.normalize(feats, dim=2)
    affinity = (normed @ normed.transpose(1, 2)).clamp(min=0)
    eye = torch.eye(feats.shape[1], dtype=torch.bool)
    affinity = affinity.masked_fill(eye, 0)
    degree = affinity.sum(dim=2)
    edges = affinity.sum(dim=(1, 2))
    weights = affinity - degree.unsqueeze(2) * degree.unsqueeze(1) / edges[:, None, None]
    delta = literal_comembership(concepts, feats, temp)
    modularity = (weights * delta.transpose(1, 2)).sum(dim=(1, 2)) / edges
    return -modularity.mean()


def make_inputs(dtype, batch=3, concepts=11, tokens=9, dim=6, seed=0):
    gen = torch.Generator().manual_seed(seed)
    feats = torch.randn(batch, tokens, dim, generator=gen, dtype=dtype)
    codebook = torch.randn(concepts, dim, generator=gen, dtype=dtype)
    return codebook, feats


def grad_of(loss_fn, codebook, feats, **kwargs):
    codebook = codebook.clone().requires_grad_(True)
    loss = loss_fn(codebook, feats, **kwargs)
    loss.backward()
    return loss.detach(), codebook.grad


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("chunk_size", [1, 3, 4, 11, 64, None])
def test_modularity_loss_matches_literal(dtype, chunk_size):
    codebook, feats = make_inputs(dtype)
    loss, grad = grad_of(modularity_loss, codebook, feats, chunk_size=chunk_size)
    ref_loss, ref_grad = grad_of(literal_modularity_loss, codebook, feats)
    assert loss.dtype == dtype
    torch.testing.assert_close(loss, ref_loss, **TOLERANCES[dtype])
    torch.testing.assert_close(grad, ref_grad, **TOLERANCES[dtype])
    assert grad.abs().max() > 0


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("chunk_size", [1, 4, 7, 11])
def test_comembership_is_bit_identical_to_literal(dtype, chunk_size):
    codebook, feats = make_inputs(dtype, batch=2, concepts=11, tokens=16, dim=5, seed=1)
    delta = soft_comembership(codebook, feats, temp=0.1, chunk_size=chunk_size)
    assert torch.equal(delta, literal_comembership(codebook, feats, 0.1))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("chunk_size", [1, 5, 7, 16])
def test_comembership_gradient_matches_literal(dtype, chunk_size):
    codebook, feats = make_inputs(dtype, batch=2, concepts=13, tokens=16, dim=5, seed=2)
    weight = torch.randn(2, 16, 16, generator=torch.Generator().manual_seed(3), dtype=dtype)
    grads = []
    for fn in (lambda c: soft_comembership(c, feats, 0.1, chunk_size), lambda c: literal_comembership(c, feats, 0.1)):
        concepts = codebook.clone().requires_grad_(True)
        (fn(concepts) * weight).sum().backward()
        grads.append(concepts.grad)
    torch.testing.assert_close(grads[0], grads[1], **TOLERANCES[dtype])


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("chunk_size", [1, 3, 5, 8])
def test_modularity_ties_send_gradient_to_first_concept(dtype, chunk_size):
    # Concepts k and k + 4 are the same one-hot vector, so their assignments are bit-equal
    # and every maximum is tied, also across chunk borders.
    _, feats = make_inputs(dtype, batch=2, concepts=4, tokens=9, dim=4, seed=4)
    codebook = torch.cat([torch.eye(4, dtype=dtype), torch.eye(4, dtype=dtype)])
    loss, grad = grad_of(modularity_loss, codebook, feats, chunk_size=chunk_size)
    ref_loss, ref_grad = grad_of(literal_modularity_loss, codebook, feats)
    assert torch.equal(grad[4:], torch.zeros_like(grad[4:]))
    assert torch.equal(ref_grad[4:], torch.zeros_like(ref_grad[4:]))
    assert grad[:4].abs().max() > 0
    torch.testing.assert_close(grad, ref_grad, **TOLERANCES[dtype])
    torch.testing.assert_close(loss, ref_loss, **TOLERANCES[dtype])


def test_modularity_loss_never_keeps_a_concept_by_pair_tensor():
    batch, concepts, tokens = 2, 40, 16
    codebook, feats = make_inputs(torch.float32, batch=batch, concepts=concepts, tokens=tokens, dim=8)
    codebook.requires_grad_(True)
    saved = []

    def pack(tensor):
        saved.append(tensor.numel())
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        loss = modularity_loss(codebook, feats, chunk_size=8)
    loss.backward()
    assert max(saved) <= max(batch * tokens * concepts, batch * tokens * tokens)
    assert max(saved) < batch * concepts * tokens * tokens


def test_modularity_loss_detaches_feats_and_accepts_autocast_and_half():
    codebook, feats = make_inputs(torch.float32)
    feats.requires_grad_(True)
    expected, grad = grad_of(modularity_loss, codebook, feats)
    assert feats.grad is None
    concepts = codebook.clone().requires_grad_(True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        under_autocast = modularity_loss(concepts, feats)
    under_autocast.backward()
    grad_autocast = concepts.grad
    assert under_autocast.dtype == torch.float32
    assert torch.equal(under_autocast, expected)
    assert torch.equal(grad_autocast, grad)
    half = feats.detach().to(torch.bfloat16)
    from_half = modularity_loss(codebook, half)
    assert from_half.dtype == torch.float32
    assert torch.equal(from_half, modularity_loss(codebook, half.float()))


def test_modularity_loss_rejects_bad_shapes():
    codebook, feats = make_inputs(torch.float32)
    with pytest.raises(
        ValueError, match=r"^modularity_loss needs concepts \[K, D\] and feats \[B, P, D\] of the same D"
    ):
        modularity_loss(codebook[:, :3], feats)
    with pytest.raises(ValueError, match="chunk_size"):
        modularity_loss(codebook, feats, chunk_size=0)


def literal_grid_sample(x, order, k):
    batch, tokens, _ = x.shape
    side = int(round(tokens**0.5))
    cells = side // k
    out = torch.empty(batch, cells * cells, x.shape[2], dtype=x.dtype)
    n = 0
    for b in range(batch):
        for cell_row in range(cells):
            for cell_col in range(cells):
                pick = int(order[n])
                row, col = cell_row * k + pick // k, cell_col * k + pick % k
                out[b, cell_row * cells + cell_col] = x[b, row * side + col]
                n += 1
    return out


def unfold_grid_sample(x, order, k):
    """The unfold formulation: cells as k×k patches, one row-major pick per patch."""
    batch, tokens, dim = x.shape
    side = int(round(tokens**0.5))
    image = x.transpose(1, 2).reshape(batch, dim, side, side)
    patches = image.unfold(2, k, k).unfold(3, k, k).permute(0, 2, 3, 4, 5, 1)
    patches = patches.reshape(-1, k * k, dim)
    return patches[torch.arange(patches.shape[0]), order].reshape(batch, -1, dim)


@pytest.mark.parametrize("side,k,cells", [(8, 4, 4), (15, 4, 9), (14, 4, 9), (6, 2, 9), (5, 5, 1)])
def test_grid_sample_matches_literal_loops(side, k, cells):
    gen = torch.Generator().manual_seed(side * 10 + k)
    x = torch.randn(3, side * side, 5, generator=gen)
    sampled, order = grid_sample_tokens(x, k=k, generator=gen)
    assert sampled.shape == (3, cells, 5)
    assert order.shape == (3 * cells,) and order.dtype == torch.long
    assert int(order.min()) >= 0 and int(order.max()) < k * k
    assert torch.equal(sampled, literal_grid_sample(x, order, k))
    assert torch.equal(sampled, unfold_grid_sample(x, order, k))


def test_grid_sample_drops_incomplete_cells():
    side, k = 15, 4
    positions = torch.arange(side * side, dtype=torch.float64).view(1, -1, 1).repeat(40, 1, 1)
    sampled, _ = grid_sample_tokens(positions, k=k, generator=torch.Generator().manual_seed(0))
    rows, cols = sampled.long().div(side, rounding_mode="floor"), sampled.long() % side
    assert sampled.shape == (40, 9, 1)
    assert int(rows.max()) < 12 and int(cols.max()) < 12
    cell = torch.arange(9).view(1, 9, 1).expand(40, 9, 1)
    assert torch.equal(rows // k, cell // 3) and torch.equal(cols // k, cell % 3)


def test_grid_sample_draws_exactly_torch_randint():
    x = torch.randn(2, 64, 3)
    sampled, order = grid_sample_tokens(x, generator=torch.Generator().manual_seed(7))
    assert torch.equal(order, torch.randint(16, (8,), generator=torch.Generator().manual_seed(7)))
    torch.manual_seed(11)
    _, default_order = grid_sample_tokens(x)
    torch.manual_seed(11)
    assert torch.equal(default_order, torch.randint(4**2, size=(8,)))


def test_grid_sample_is_reproducible_and_reuses_order():
    x = torch.randn(4, 144, 6)
    first, order = grid_sample_tokens(x, generator=torch.Generator().manual_seed(3))
    again, order_again = grid_sample_tokens(x, generator=torch.Generator().manual_seed(3))
    assert torch.equal(first, again) and torch.equal(order, order_again)
    positions = torch.arange(144, dtype=torch.float32).view(1, 144, 1).expand(4, 144, 2)
    picked, same_order = grid_sample_tokens(positions, order=order)
    assert same_order is order
    index = picked[..., 0].long()
    assert torch.equal(first, torch.gather(x, 1, index.unsqueeze(-1).expand(-1, -1, 6)))


def test_grid_sample_picks_are_uniform():
    x = torch.zeros(1000, 256, 1)
    _, order = grid_sample_tokens(x, generator=torch.Generator().manual_seed(5))
    counts = torch.bincount(order, minlength=16).double()
    expected = order.numel() / 16
    chi_square = float(((counts - expected) ** 2 / expected).sum())
    # 15 degrees of freedom: P(chi² > 37.7) = 0.001
    assert chi_square < 37.7
    assert counts.min() > 0


def test_grid_sample_rejects_bad_input():
    with pytest.raises(ValueError, match="square"):
        grid_sample_tokens(torch.randn(2, 50, 3))
    with pytest.raises(ValueError, match="order must be"):
        grid_sample_tokens(torch.randn(2, 64, 3), order=torch.zeros(5, dtype=torch.long))
    with pytest.raises(ValueError, match="no whole"):
        grid_sample_tokens(torch.randn(2, 9, 3), k=4)


def test_vq_matches_literal_argmax():
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(3, 20, 7, generator=gen)
    codebook = torch.randn(13, 7, generator=gen) * torch.rand(13, 1, generator=gen) * 5
    cosine = F.cosine_similarity(x.unsqueeze(2), codebook.view(1, 1, 13, 7), dim=-1)
    expected = torch.empty(3, 20, dtype=torch.long)
    for b in range(3):
        for n in range(20):
            expected[b, n] = max(range(13), key=lambda c: float(cosine[b, n, c]))
    index = vq_index(x, codebook)
    assert index.dtype == torch.long and torch.equal(index, expected)
    assert torch.equal(vq_index(x * 3.0, codebook * 0.5), expected)
    assert torch.equal(vq(x, codebook), codebook[expected])


def test_vq_rejects_mismatched_width():
    with pytest.raises(ValueError, match=r"^vq needs tokens \[\.\.\., D\] and a codebook \[K, D\] of the same D, got"):
        vq_index(torch.randn(2, 4, 5), torch.randn(3, 6))


def test_grid_sample_error_texts_and_one_token_cells():
    with pytest.raises(ValueError, match=r"^grid_sample_tokens expects tokens \[B, N, D\], got shape \(64, 3\)$"):
        grid_sample_tokens(torch.randn(64, 3))
    with pytest.raises(ValueError, match=r"^grid cell size k must be >= 1, got 0$"):
        grid_sample_tokens(torch.randn(2, 64, 3), k=0)
    with pytest.raises(ValueError, match=r"^order must be a LongTensor of shape \(8,\) for B=2 and 4 cells"):
        grid_sample_tokens(torch.randn(2, 64, 3), order=torch.zeros(5, dtype=torch.long))
    x = torch.randn(2, 16, 3)
    sampled, order = grid_sample_tokens(x, k=1)
    assert torch.equal(sampled, x) and torch.equal(order, torch.zeros(32, dtype=torch.long))


def test_ops_follow_their_inputs_device_not_the_default_device():
    codebook, feats = make_inputs(torch.float32)
    grid_x = torch.randn(2, 64, 3)
    expected_loss = modularity_loss(codebook, feats)
    expected_delta = soft_comembership(codebook, feats, chunk_size=4)
    expected_grid = grid_sample_tokens(grid_x, generator=torch.Generator().manual_seed(0))
    torch.manual_seed(1)
    expected_default = grid_sample_tokens(grid_x)
    with torch.device("meta"):
        assert torch.equal(modularity_loss(codebook, feats), expected_loss)
        assert torch.equal(soft_comembership(codebook, feats, chunk_size=4), expected_delta)
        sampled, order = grid_sample_tokens(grid_x, generator=torch.Generator().manual_seed(0))
        torch.manual_seed(1)
        default_sampled, default_order = grid_sample_tokens(grid_x)
    assert torch.equal(sampled, expected_grid[0]) and torch.equal(order, expected_grid[1])
    assert torch.equal(default_sampled, expected_default[0]) and torch.equal(default_order, expected_default[1])
    # Tokens on another device than the generator: the picks move to the tokens.
    on_meta, meta_order = grid_sample_tokens(grid_x.to("meta"), generator=torch.Generator().manual_seed(0))
    assert on_meta.device.type == "meta" and on_meta.shape == (2, 4, 3)
    assert torch.equal(meta_order, expected_grid[1])


def test_cosine_similarity_matrix_is_per_row_cosine():
    codebook, feats = make_inputs(torch.float64)
    expected = F.cosine_similarity(feats.unsqueeze(2), codebook.view(1, 1, *codebook.shape), dim=-1)
    torch.testing.assert_close(cosine_similarity_matrix(feats, codebook), expected)


def test_vq_rejects_a_one_dimensional_codebook():
    with pytest.raises(ValueError, match="same D"):
        vq_index(torch.randn(2, 4, 5), torch.randn(5))


def test_modularity_loss_shapes_dtypes_and_default_temperature():
    codebook, feats = make_inputs(torch.float64)
    with pytest.raises(ValueError, match="same D"):
        modularity_loss(codebook, feats[0])
    mixed = modularity_loss(codebook.float(), feats)
    assert mixed.dtype == torch.float64
    torch.testing.assert_close(
        mixed, literal_modularity_loss(codebook.float().double(), feats), **TOLERANCES[torch.float64]
    )
    assert torch.equal(soft_comembership(codebook, feats), soft_comembership(codebook, feats, temp=0.1))
    weights, edges = modularity_matrix(feats.to(torch.bfloat16))
    assert weights.dtype == torch.bfloat16 and edges.dtype == torch.bfloat16


@pytest.mark.parametrize("chunk_size", [1, 2])
def test_comembership_nan_wins_as_in_torch_max(chunk_size):
    codebook, feats = make_inputs(torch.float64, concepts=3)
    codebook[1] = float("nan")
    delta = soft_comembership(codebook, feats, chunk_size=chunk_size)
    expected = literal_comembership(codebook, feats, 0.1)
    assert bool(expected.isnan().all())
    torch.testing.assert_close(delta, expected, equal_nan=True)
