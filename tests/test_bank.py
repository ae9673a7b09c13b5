import math
import re

import pytest
import torch
import torch.nn.functional as F

from modules.bank import ConceptBank
from modules.objectives import _row_statistics, front_door_loss
from modules.ops import vq_index

TOLERANCES = {torch.float32: dict(rtol=1e-5, atol=1e-6), torch.float64: dict(rtol=1e-12, atol=1e-12)}


def literal_term(anchor, keys, anchor_codes, key_codes, self_cols, temp, pos, neg):
    """SPEC §5 for one anchor image, pair by pair; None when there is no positive pair."""
    logits = anchor @ keys.t() / temp
    shifted = logits - logits.max(dim=1, keepdim=True).values.detach()
    codes = anchor_codes @ key_codes.t()
    losses = []
    for i in range(anchor.shape[0]):
        positives = [j for j in range(keys.shape[0]) if codes[i, j] > pos and j != self_cols.get(i)]
        counted = positives + [j for j in range(keys.shape[0]) if codes[i, j] < neg]
        if not positives:
            continue
        log_sum = torch.log(torch.stack([shifted[i, j].exp() for j in counted]).sum())
        losses.extend(-shifted[i, j] + log_sum for j in positives)
    return torch.stack(losses).mean() if losses else None


def literal_front_door_loss(feat, proj, proj_ema, codebook, bank_feats, bank_idx, temp=0.07, pos=0.3, neg=0.1):
    batch, tokens, _ = proj.shape
    cosine = F.cosine_similarity(feat.unsqueeze(2), codebook.view(1, 1, *codebook.shape), dim=-1)
    quantised = F.normalize(codebook[cosine.argmax(dim=-1)], dim=-1)
    student = F.normalize(proj, dim=-1)
    teacher = F.normalize(proj_ema.detach(), dim=-1).reshape(batch * tokens, -1)
    bank = F.normalize(bank_feats, dim=-1)
    bank_codes = F.normalize(codebook[bank_idx], dim=-1)
    terms = []
    for b in range(batch):
        self_cols = {i: b * tokens + i for i in range(tokens)}
        terms.append(
            literal_term(
                student[b], teacher, quantised[b], quantised.reshape(batch * tokens, -1), self_cols, temp, pos, neg
            )
        )
        if bank.shape[0]:
            terms.append(literal_term(student[b], bank, quantised[b], bank_codes, {}, temp, pos, neg))
    terms = [term for term in terms if term is not None]
    return sum(terms) / len(terms)


def structured_codebook(dtype):
    """Codebook whose pairwise cosines are far from both thresholds, plus one row (index 6)
    at cosine 0.2 to rows 0-3: a token of concept 6 among those is neither positive nor
    negative to them."""
    codebook = torch.zeros(8, 8, dtype=dtype)
    codebook[:6, :6] = torch.eye(6, dtype=dtype) * torch.arange(1, 7, dtype=dtype).unsqueeze(1)
    codebook[6, :4] = 0.2
    codebook[6, 7] = math.sqrt(1 - 4 * 0.04)
    codebook[7] = codebook[0] + 0.9 * codebook[1]  # cosine ~0.74 to row 0, ~0.67 to row 1
    return codebook


def tokens_for(concepts, codebook, dim, gen, dtype):
    """Backbone tokens that quantise to the given concepts (a codebook row plus small noise)."""
    rows = F.normalize(codebook[concepts], dim=-1)
    return rows + 0.01 * torch.randn(*rows.shape[:-1], dim, generator=gen, dtype=dtype)


def make_case(dtype, concepts, bank_concepts=(), proj_dim=5, seed=0):
    gen = torch.Generator().manual_seed(seed)
    codebook = structured_codebook(dtype)
    concepts = torch.tensor(concepts)
    feat = tokens_for(concepts, codebook, codebook.shape[1], gen, dtype)
    proj = torch.randn(*concepts.shape, proj_dim, generator=gen, dtype=dtype)
    proj_ema = proj + 0.3 * torch.randn(proj.shape, generator=gen, dtype=dtype)
    bank_idx = torch.tensor(bank_concepts, dtype=torch.long)
    bank_feats = torch.randn(len(bank_concepts), proj_dim, generator=gen, dtype=dtype)
    return feat, proj, proj_ema, codebook, bank_feats, bank_idx


def loss_and_grad(fn, feat, proj, proj_ema, codebook, bank_feats, bank_idx):
    proj = proj.clone().requires_grad_(True)
    loss = fn(feat, proj, proj_ema, codebook, bank_feats, bank_idx)
    loss.backward()
    return loss.detach(), proj.grad


CASES = {
    "plain": ([[0, 0, 1, 2], [1, 2, 3, 0], [7, 4, 4, 5]], ()),
    "image_without_positive": ([[0, 0, 1, 1], [0, 1, 0, 1], [2, 3, 4, 5]], ()),
    "no_pos_no_neg_row": ([[0, 1, 2, 3], [6, 0, 1, 2], [3, 3, 0, 1]], ()),
    "bank": ([[0, 0, 1, 2], [1, 2, 3, 0], [7, 4, 4, 5]], (0, 0, 1, 3, 3, 5, 7)),
    "bank_image_without_positive": ([[0, 1, 2, 3], [0, 1, 2, 3], [5, 4, 5, 4]], (0, 1, 2, 6)),
}


@pytest.mark.filterwarnings("error")  # the loss computes without a warning
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("case", sorted(CASES))
def test_front_door_loss_matches_literal(dtype, case):
    concepts, bank_concepts = CASES[case]
    inputs = make_case(dtype, concepts, bank_concepts)
    loss, grad = loss_and_grad(front_door_loss, *inputs)
    ref_loss, ref_grad = loss_and_grad(literal_front_door_loss, *inputs)
    assert loss.dtype == dtype
    assert torch.isfinite(grad).all() and grad.abs().max() > 0
    torch.testing.assert_close(loss, ref_loss, **TOLERANCES[dtype])
    torch.testing.assert_close(grad, ref_grad, **TOLERANCES[dtype])


def test_front_door_loss_skips_terms_without_positive():
    # Image 0's concepts appear nowhere else: its in-batch term has no positive pair, so
    # the loss is the mean of the two other terms, not of three.
    feat, proj, proj_ema, codebook, bank_feats, bank_idx = make_case(
        torch.float64, [[2, 3, 4, 5], [0, 0, 1, 1], [1, 0, 7, 7]]
    )
    quantised = F.normalize(codebook[torch.tensor([[2, 3, 4, 5], [0, 0, 1, 1], [1, 0, 7, 7]])], dim=-1)
    student = F.normalize(proj, dim=-1)
    teacher = F.normalize(proj_ema, dim=-1).reshape(12, -1)
    terms = [
        literal_term(
            student[b],
            teacher,
            quantised[b],
            quantised.reshape(12, -1),
            {i: 4 * b + i for i in range(4)},
            0.07,
            0.3,
            0.1,
        )
        for b in range(3)
    ]
    assert terms[0] is None and terms[1] is not None and terms[2] is not None
    loss = front_door_loss(feat, proj, proj_ema, codebook, bank_feats, bank_idx)
    torch.testing.assert_close(loss, (terms[1] + terms[2]) / 2, rtol=1e-12, atol=0)


def test_front_door_loss_excludes_self_pair():
    # One image; only tokens 0 and 1 share a concept, tokens 2 and 3 are alone: two
    # positive pairs in all, and no token counts itself in its sum.
    inputs = make_case(torch.float64, [[0, 0, 1, 2]])
    feat, proj, proj_ema, codebook, bank_feats, bank_idx = inputs
    s = F.normalize(proj[0], dim=-1) @ F.normalize(proj_ema[0], dim=-1).t() / 0.07
    s = s - s.max(dim=1, keepdim=True).values
    pair0 = -s[0, 1] + torch.logsumexp(s[0, [1, 2, 3]], dim=0)
    pair1 = -s[1, 0] + torch.logsumexp(s[1, [0, 2, 3]], dim=0)
    torch.testing.assert_close(front_door_loss(*inputs), (pair0 + pair1) / 2, rtol=1e-12, atol=0)


def test_front_door_loss_without_any_positive_is_connected_zero():
    inputs = make_case(torch.float32, [[0, 1, 2], [3, 4, 5]])
    loss, grad = loss_and_grad(front_door_loss, *inputs)
    assert float(loss) == 0.0
    assert torch.equal(grad, torch.zeros_like(grad))


def test_front_door_loss_gradients_reach_proj_only():
    feat, proj, proj_ema, codebook, bank_feats, bank_idx = make_case(
        torch.float32, [[0, 0, 1, 2], [1, 2, 3, 0]], (0, 1, 1)
    )
    for tensor in (feat, proj, proj_ema, codebook, bank_feats):
        tensor.requires_grad_(True)
    front_door_loss(feat, proj, proj_ema, codebook, bank_feats, bank_idx).backward()
    assert proj.grad is not None and proj.grad.abs().max() > 0
    assert all(t.grad is None for t in (feat, proj_ema, codebook, bank_feats))


def test_front_door_loss_rejects_bad_shapes():
    feat, proj, proj_ema, codebook, bank_feats, bank_idx = make_case(torch.float32, [[0, 1]], (0,))
    shapes = re.escape("front_door_loss needs feat [B, P, D] and proj, proj_ema [B, P, E] of matching B, P, E, got")
    with pytest.raises(ValueError, match=f"^{shapes} "):
        front_door_loss(feat, proj, proj_ema[..., :3], codebook, bank_feats, bank_idx)
    with pytest.raises(ValueError, match="bank"):
        front_door_loss(feat, proj, proj_ema, codebook, bank_feats[:, :2], bank_idx)
    with pytest.raises(ValueError, match="codebook size"):
        front_door_loss(feat, proj, proj_ema, codebook, bank_feats, bank_idx + codebook.shape[0])


def stored(bank):
    feats, concepts = bank.contents()
    return feats[:, 0].tolist(), concepts.tolist()


def test_bank_fifo_keeps_newest_oldest_first():
    bank = ConceptBank(num_concepts=3, dim=2, capacity=3, keep_ratio=1.0)
    bank.update(torch.tensor([1, 1]), torch.tensor([[1.0, 0], [2.0, 0]]))
    bank.update(torch.tensor([1, 0, 1]), torch.tensor([[3.0, 0], [10.0, 0], [4.0, 0]]))
    assert stored(bank) == ([10.0, 2.0, 3.0, 4.0], [0, 1, 1, 1])
    bank.update(torch.tensor([1] * 5), torch.arange(5, 10, dtype=torch.float32).unsqueeze(1).repeat(1, 2))
    assert stored(bank) == ([10.0, 7.0, 8.0, 9.0], [0, 1, 1, 1])
    assert len(bank) == 4


def test_bank_matches_dict_of_lists_reference():
    gen = torch.Generator().manual_seed(0)
    bank = ConceptBank(num_concepts=5, dim=1, capacity=4, keep_ratio=1.0)
    expected = {k: [] for k in range(5)}
    value = 0.0
    for _ in range(20):
        count = int(torch.randint(0, 9, (1,), generator=gen))
        concepts = torch.randint(0, 5, (count,), generator=gen)
        values = value + torch.arange(count, dtype=torch.float32)
        value += count
        bank.update(concepts, values.unsqueeze(1))
        for k, v in zip(concepts.tolist(), values.tolist()):
            expected[k] = (expected[k] + [v])[-4:]
        assert stored(bank) == ([v for k in range(5) for v in expected[k]], [k for k in range(5) for _ in expected[k]])


def test_bank_keeps_floor_half_of_each_concept():
    bank = ConceptBank(num_concepts=4, dim=1, capacity=100)
    concepts = torch.tensor([2, 0, 2, 1, 2, 2, 2, 3, 3, 0, 0])
    values = torch.arange(11, dtype=torch.float32).unsqueeze(1)
    bank.update(concepts, values, generator=torch.Generator().manual_seed(0))
    feats, kept_concepts = bank.contents()
    assert torch.bincount(kept_concepts, minlength=4).tolist() == [1, 0, 2, 1]
    for k in range(4):
        picked = feats[kept_concepts == k, 0].long().tolist()
        assert set(picked) <= set((concepts == k).nonzero().squeeze(1).tolist())
        assert picked == sorted(picked)


def test_bank_random_choice_is_reproducible_and_uniform():
    num_concepts, per_concept = 2000, 4
    concepts = torch.arange(num_concepts).repeat_interleave(per_concept)
    position = torch.arange(per_concept).repeat(num_concepts).float().unsqueeze(1)

    def kept_positions(seed):
        bank = ConceptBank(num_concepts=num_concepts, dim=1, capacity=10)
        bank.update(concepts, position, generator=torch.Generator().manual_seed(seed))
        return bank.contents()[0][:, 0].long()

    first = kept_positions(1)
    assert torch.equal(first, kept_positions(1))
    assert not torch.equal(first, kept_positions(2))
    assert first.numel() == num_concepts * 2
    counts = torch.bincount(first, minlength=per_concept).double()
    expected = first.numel() / per_concept
    # 3 degrees of freedom: P(chi² > 16.3) = 0.001
    assert float(((counts - expected) ** 2 / expected).sum()) < 16.3


def test_bank_buffers_follow_module_dtype_and_stay_out_of_state_dict():
    bank = ConceptBank(num_concepts=3, dim=2, capacity=2)
    assert bank.state_dict() == {}
    assert bank.contents()[0].dtype == torch.float32
    bank = bank.double()
    bank.update(torch.tensor([1, 1, 1, 1]), torch.randn(4, 2, dtype=torch.float32))
    feats, concepts = bank.contents()
    assert feats.dtype == torch.float64 and concepts.dtype == torch.long
    assert feats.shape == (2, 2) and concepts.tolist() == [1, 1]
    meta = ConceptBank(num_concepts=3, dim=2).to("meta")
    assert {buffer.device.type for buffer in meta.buffers()} == {"meta"}


def test_bank_stores_raw_vectors():
    bank = ConceptBank(num_concepts=2, dim=3, capacity=5, keep_ratio=1.0)
    raw = torch.tensor([[3.0, 4.0, 0.0], [0.0, 0.0, -2.0]])
    bank.update(torch.tensor([1, 0]), raw)
    feats, concepts = bank.contents()
    assert torch.equal(feats, raw[[1, 0]]) and concepts.tolist() == [0, 1]


def test_bank_rejects_bad_input():
    bank = ConceptBank(num_concepts=3, dim=2)
    with pytest.raises(ValueError, match=r"\[0, 3\)"):
        bank.update(torch.tensor([0, 3]), torch.zeros(2, 2))
    with pytest.raises(ValueError, match="feats"):
        bank.update(torch.tensor([0, 1]), torch.zeros(2, 5))
    with pytest.raises(ValueError, match="keep_ratio"):
        ConceptBank(num_concepts=3, dim=2, keep_ratio=1.5)


def random_case(dtype, batch=3, tokens=5, bank_size=40, seed=1):
    """Random concepts over the structured codebook, a bank of `bank_size` vectors."""
    gen = torch.Generator().manual_seed(seed)
    concepts = torch.randint(0, 8, (batch, tokens), generator=gen).tolist()
    bank_concepts = sorted(torch.randint(0, 8, (bank_size,), generator=gen).tolist())
    return make_case(dtype, concepts, bank_concepts, proj_dim=6, seed=seed)


@pytest.mark.parametrize("chunk_elements", [1, 39, 41, 81, 10**6])
def test_front_door_loss_chunking_matches_literal(chunk_elements):
    # 40 bank keys and 15 batch keys: 1 element -> one anchor row per block; 39 -> one row
    # against the bank, two against the batch; 41 and 81 split the 15 rows unevenly.
    inputs = random_case(torch.float64)
    ref_loss, ref_grad = loss_and_grad(literal_front_door_loss, *inputs)

    def chunked(*args):
        return front_door_loss(*args, chunk_elements=chunk_elements)

    loss, grad = loss_and_grad(chunked, *inputs)
    torch.testing.assert_close(loss, ref_loss, **TOLERANCES[torch.float64])
    torch.testing.assert_close(grad, ref_grad, **TOLERANCES[torch.float64])


def test_front_door_loss_without_grad_has_the_same_value():
    inputs = random_case(torch.float32)
    with torch.no_grad():
        value = front_door_loss(*inputs)
    assert value.grad_fn is None
    torch.testing.assert_close(value, literal_front_door_loss(*inputs), **TOLERANCES[torch.float32])


def test_front_door_loss_ignores_empty_slots():
    feat, proj, proj_ema, codebook, bank_feats, bank_idx = random_case(torch.float64)
    padded_feats = torch.cat([bank_feats, 1e3 * torch.randn(5, bank_feats.shape[1], dtype=torch.float64)])
    padded_idx = torch.cat([bank_idx, torch.full((5,), -1)])
    expected = loss_and_grad(front_door_loss, feat, proj, proj_ema, codebook, bank_feats, bank_idx)
    padded = loss_and_grad(front_door_loss, feat, proj, proj_ema, codebook, padded_feats, padded_idx)
    torch.testing.assert_close(padded, expected, rtol=1e-12, atol=1e-12)


def test_front_door_loss_rejects_bad_chunk():
    with pytest.raises(ValueError, match="chunk_elements"):
        front_door_loss(*random_case(torch.float32), chunk_elements=0)


@pytest.mark.parametrize("updates", [1, 3])
def test_bank_slots_give_the_loss_of_contents(updates):
    # One update half-fills some concepts; three fill them past capacity (the ring wraps).
    gen = torch.Generator().manual_seed(0)
    feat, proj, proj_ema, codebook, _, _ = random_case(torch.float64)
    bank = ConceptBank(num_concepts=8, dim=6, capacity=4, keep_ratio=1.0).double()
    for _ in range(updates):
        bank.update(torch.randint(0, 8, (12,), generator=gen), torch.randn(12, 6, generator=gen, dtype=torch.float64))
    slot_feats, slot_idx = bank.slots()
    assert slot_feats.data_ptr() == bank.storage.data_ptr()
    feats, concepts = bank.contents()
    assert torch.equal(slot_idx[slot_idx >= 0].sort().values, concepts)
    from_slots = loss_and_grad(front_door_loss, feat, proj, proj_ema, codebook, slot_feats, slot_idx)
    from_contents = loss_and_grad(front_door_loss, feat, proj, proj_ema, codebook, feats, concepts)
    torch.testing.assert_close(from_slots, from_contents, rtol=1e-12, atol=1e-12)
    keys, _ = bank.loss_keys()
    assert (keys.data_ptr() == bank.storage.data_ptr()) == (2 * len(bank) >= 32)


def test_bank_defaults_and_smallest_sizes():
    bank = ConceptBank(num_concepts=1, dim=1, capacity=1, keep_ratio=0.0)
    bank.update(torch.tensor([0, 0]), torch.ones(2, 1))
    assert len(bank) == 0
    defaults = ConceptBank(num_concepts=2, dim=3)
    assert defaults.capacity == 100 and defaults.keep_ratio == 0.5
    for sizes in ((0, 1, 1), (1, 0, 1), (1, 1, 0)):
        with pytest.raises(
            ValueError,
            match=r"^ConceptBank needs num_concepts, dim, capacity >= 1, got " + ", ".join(map(str, sizes)) + "$",
        ):
            ConceptBank(*sizes)


def test_bank_follows_its_buffers_device_not_the_default_device():
    concepts = torch.tensor([2, 0, 2, 1, 2, 2, 0, 0])
    values = torch.arange(8, dtype=torch.float32).unsqueeze(1)
    expected = ConceptBank(num_concepts=3, dim=1, capacity=3)
    expected.update(concepts, values, generator=torch.Generator().manual_seed(0))
    torch.manual_seed(1)
    expected.update(concepts, values)
    bank = ConceptBank(num_concepts=3, dim=1, capacity=3)
    with torch.device("meta"):
        bank.update(concepts, values, generator=torch.Generator().manual_seed(0))
        torch.manual_seed(1)
        bank.update(concepts, values)
        feats, kept = bank.contents()
    assert feats.device.type == "cpu"
    assert torch.equal(feats, expected.contents()[0]) and torch.equal(kept, expected.contents()[1])


def test_front_door_loss_counts_a_term_with_a_single_positive_pair():
    # Orthogonal concepts: image 0's in-batch term has one positive pair (its concept-0 token
    # and image 1's), and so does image 1's; the bank holds one vector of concept 1, a single
    # positive of image 0's concept-1 token.
    inputs = make_case(torch.float64, [[0, 1], [0, 2]], (1,))
    loss, grad = loss_and_grad(front_door_loss, *inputs)
    ref_loss, ref_grad = loss_and_grad(literal_front_door_loss, *inputs)
    assert float(loss) != 0.0
    torch.testing.assert_close(loss, ref_loss, **TOLERANCES[torch.float64])
    torch.testing.assert_close(grad, ref_grad, **TOLERANCES[torch.float64])


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_front_door_loss_of_low_precision_inputs_is_computed_in_float32(dtype):
    inputs = random_case(torch.float32)
    low = [tensor.to(dtype) if tensor.is_floating_point() else tensor for tensor in inputs]
    widened = [tensor.float() if tensor.is_floating_point() else tensor for tensor in low]
    loss, grad = loss_and_grad(front_door_loss, *low)
    ref_loss, ref_grad = loss_and_grad(front_door_loss, *widened)
    assert loss.dtype == torch.float32 and grad.dtype == dtype
    assert torch.equal(loss, ref_loss)
    assert torch.equal(grad, ref_grad.to(dtype))


def threshold_codebook(dtype):
    """Rows 0 and 1 at cosine exactly 0.6 (3/5: every other product is 0), rows 2-3 orthogonal."""
    codebook = torch.zeros(4, 4, dtype=dtype)
    codebook[0, 0] = 1.0
    codebook[1, :2] = torch.tensor([3.0, 4.0])
    codebook[2, 2] = codebook[3, 3] = 1.0
    return codebook


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("pos,neg", [(0.6, 0.1), (0.9, 0.6)])
def test_front_door_loss_thresholds_are_strict(dtype, pos, neg):
    # A cosine equal to `pos` is not positive; one equal to `neg` is not negative.
    gen = torch.Generator().manual_seed(3)
    codebook = threshold_codebook(dtype)
    concepts = torch.tensor([[0, 0, 1, 2], [1, 3, 0, 2]])
    feat = tokens_for(concepts, codebook, 4, gen, dtype)
    proj = torch.randn(2, 4, 5, generator=gen, dtype=dtype)
    proj_ema = proj + 0.3 * torch.randn(proj.shape, generator=gen, dtype=dtype)
    bank_feats, bank_idx = torch.randn(3, 5, generator=gen, dtype=dtype), torch.tensor([0, 1, 3])
    code_sim = F.normalize(codebook, dim=1) @ F.normalize(codebook, dim=1).t()
    assert code_sim[0, 1] == torch.tensor(0.6, dtype=dtype)

    def with_thresholds(fn):
        return lambda *args: fn(*args, pos=pos, neg=neg)

    inputs = (feat, proj, proj_ema, codebook, bank_feats, bank_idx)
    loss, grad = loss_and_grad(with_thresholds(front_door_loss), *inputs)
    ref_loss, ref_grad = loss_and_grad(with_thresholds(literal_front_door_loss), *inputs)
    torch.testing.assert_close(loss, ref_loss, **TOLERANCES[dtype])
    torch.testing.assert_close(grad, ref_grad, **TOLERANCES[dtype])


def test_front_door_loss_forms_no_gradient_when_none_is_needed():
    feat, proj, proj_ema, codebook, bank_feats, bank_idx = random_case(torch.float32)
    student = F.normalize(proj, dim=2).reshape(-1, proj.shape[2])
    keys = proj_ema.reshape(-1, proj.shape[2])
    codes = vq_index(feat, codebook).reshape(-1)
    present, rows = torch.unique(codes, return_inverse=True)
    code_sim = F.normalize(codebook, dim=1)[present] @ F.normalize(codebook, dim=1).t()
    empty = torch.zeros(len(present), 1, dtype=torch.bool)
    tables = torch.cat([code_sim > 0.3, empty], dim=1), torch.cat([code_sim < 0.1, empty], dim=1)
    for need_grad in (False, True):
        n, row_loss, grad = _row_statistics(student, keys, codes, rows, *tables, True, 0.07, 4, need_grad)
        assert (grad is not None) == need_grad
        assert n.shape == row_loss.shape == (student.shape[0],)


def test_bank_state_round_trip_continues_identically():
    generator = torch.Generator().manual_seed(0)
    bank = ConceptBank(5, 3, capacity=4, keep_ratio=0.5)
    for _ in range(6):
        bank.update(
            torch.randint(0, 5, (20,), generator=generator),
            torch.randn(20, 3, generator=generator),
            generator=generator,
        )
    restored = ConceptBank(5, 3, capacity=4, keep_ratio=0.5)
    restored.load_state(bank.state())
    assert bank.state_dict() == {} and len(restored) == len(bank)
    assert bool((bank.heads != bank.counts % bank.capacity).any())  # some ring buffers have wrapped
    idx, feats = torch.randint(0, 5, (30,), generator=generator), torch.randn(30, 3, generator=generator)
    for step in range(2):
        # Same vectors in the same slots: the loss reads the storage in place (slots), in slot order.
        for read in ("contents", "slots"):
            for a, b in zip(getattr(bank, read)(), getattr(restored, read)()):
                assert torch.equal(a, b), (step, read)
        bank.update(idx, feats, generator=torch.Generator().manual_seed(1))
        restored.update(idx, feats, generator=torch.Generator().manual_seed(1))


def test_bank_keeps_the_rows_with_the_smallest_keys_of_one_draw():
    # One torch.rand draw of a key per row; each concept keeps its floor(n/2) rows of smallest
    # key, stored in input order.
    concepts = torch.tensor([2, 0, 2, 1, 0, 2, 2, 0, 1, 2, 0, 0])
    bank = ConceptBank(num_concepts=3, dim=1, capacity=10)
    bank.update(concepts, torch.arange(12.0).unsqueeze(1), generator=torch.Generator().manual_seed(4))
    keys = torch.rand(12, generator=torch.Generator().manual_seed(4))
    expected = []
    for concept in range(3):
        rows = (concepts == concept).nonzero().squeeze(1)
        expected += rows[keys[rows].argsort()[: len(rows) // 2]].sort().values.tolist()
    assert bank.contents()[0][:, 0].long().tolist() == expected
