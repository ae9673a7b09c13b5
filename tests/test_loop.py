"""The training loop's optimiser step (engine.loop.Trainer.step) against a literal recipe."""

import pytest
import torch

from engine.loop import Trainer
from utils.distributed import DistInfo
from utils.errors import NonFiniteLossError


@pytest.mark.parametrize("grad_clip", [None, 0.5])
def test_step_clips_the_gradient_norm_then_steps_every_optimiser(tmp_path, grad_clip):
    """backward, clip the joint gradient norm of the parameters to ``grad_clip`` (when given), then step each
    optimiser: with SGD at lr 1 every parameter moves by minus its (clipped) gradient."""
    torch.manual_seed(0)
    first, second = torch.nn.Linear(4, 3), torch.nn.Linear(3, 2)
    params = [*first.parameters(), *second.parameters()]
    before = [p.detach().clone() for p in params]
    info = DistInfo(rank=0, world_size=1, local_rank=0, device=torch.device("cpu"))
    trainer = Trainer(
        "loop", info, str(tmp_path), epochs=1, max_steps=None, save_every=0, amp=False, flags={}, shared={}
    )
    optimizers = [torch.optim.SGD(first.parameters(), lr=1.0), torch.optim.SGD(second.parameters(), lr=1.0)]
    x = torch.randn(5, 4)
    loss = 10 * second(first(x)).square().sum()
    grads = torch.autograd.grad(loss, params, retain_graph=True)
    norm = torch.sqrt(sum(g.square().sum() for g in grads))
    factor = min(1.0, grad_clip / (norm.item() + 1e-6)) if grad_clip else 1.0
    assert trainer.step(loss, optimizers, params, grad_clip=grad_clip)
    assert trainer.global_step == 1 and (grad_clip is None or norm > grad_clip)
    for p, old, g in zip(params, before, grads):
        torch.testing.assert_close(p.detach(), old - factor * g, rtol=1e-5, atol=1e-6)


def test_a_non_finite_loss_is_refused_before_any_step(tmp_path):
    model = torch.nn.Linear(2, 1)
    info = DistInfo(rank=0, world_size=1, local_rank=0, device=torch.device("cpu"))
    trainer = Trainer(
        "loop", info, str(tmp_path), epochs=1, max_steps=None, save_every=0, amp=False, flags={}, shared={}
    )
    before = [p.detach().clone() for p in model.parameters()]
    optimizer = torch.optim.SGD(model.parameters(), lr=1.0)
    loss = model(torch.ones(1, 2)).sum() * float("nan")
    with pytest.raises(NonFiniteLossError, match=r"\[loop\] non-finite loss at step 1: loss=nan"):
        trainer.step(loss, [optimizer], list(model.parameters()))
    assert all(torch.equal(p, b) for p, b in zip(model.parameters(), before))
