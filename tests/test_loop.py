"""The training loop (engine.loop): the optimiser step against a literal recipe, and ``fit`` in process."""

import json

import pytest
import torch

from engine.loop import FIXED_BATCH_SEED, Trainer, fit
from loader.batches import make_loader, seed_everything
from utils.distributed import PREEMPTION, DistInfo, Terminated
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


# -- fit: the whole loop, in process, on a toy regression ----------------------------------------------------


class Points(torch.utils.data.Dataset):
    """12 items of the shape the loop expects: a 3x2x2 'image', a 2x2 label and the index."""

    def __init__(self):
        self.x = torch.randn(12, 3, 2, 2, generator=torch.Generator().manual_seed(3))

    def __len__(self):
        return 12

    def __getitem__(self, i):
        return {"img": self.x[i], "label": torch.zeros(2, 2, dtype=torch.long), "ind": i}


def run_fit(log_dir, epochs=3, save_every=0, stop_after=None, resume="no"):
    """Train a linear model with SGD + StepLR under ``fit``; ``stop_after``: SIGTERM received after this many
    steps of this call. -> (trainer, model, (fixed start, fixed end) or the Terminated raised)."""
    info = DistInfo(rank=0, world_size=1, local_rank=0, device=torch.device("cpu"))
    seed_everything(0)
    model = torch.nn.Linear(12, 1)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    scheduler = torch.optim.lr_scheduler.StepLR(optimizer, 1, gamma=0.5)
    shared = {"model": model, "optimizer": optimizer, "scheduler": scheduler}
    trainer = Trainer(
        "toy",
        info,
        str(log_dir),
        epochs=epochs,
        max_steps=None,
        save_every=save_every,
        amp=False,
        flags={},
        shared=shared,
    )
    loader, sampler = make_loader(Points(), info, batch_size=3, num_workers=0, shuffle=True, drop_last=True)
    trainer.resume(resume)
    calls = []

    def loss_fn(batch):  # a random term: a resumed run must also restore the RNG
        return (model(batch.img.flatten(1)) - 1).square().mean() + 0.01 * torch.rand(()).item()

    def train_step(epoch, batch):
        loss = loss_fn(batch)
        trainer.step(loss, [optimizer], list(model.parameters()))
        calls.append((epoch, batch.ind.tolist()))
        if stop_after is not None and len(calls) == stop_after:
            PREEMPTION.received = True
        return {"loss": loss.item(), "lr": optimizer.param_groups[0]["lr"]}

    try:
        result = fit(trainer, loader, sampler, train_step, loss_fn, schedulers=[scheduler])
    except Terminated as stop:
        result = stop
    finally:
        PREEMPTION.received = False
    return trainer, model, result, calls


def test_fit_trains_every_batch_logs_each_step_and_steps_the_schedule_per_epoch(tmp_path):
    trainer, model, (start, end), calls = run_fit(tmp_path)
    assert [epoch for epoch, _ in calls] == [0] * 4 + [1] * 4 + [2] * 4  # 12 items / 3, drop_last
    for epoch in range(3):  # each epoch sees every item once, in an order of its own
        assert sorted(i for e, ind in calls if e == epoch for i in ind) == list(range(12))
    assert [ind for _, ind in calls[:4]] != [ind for _, ind in calls[4:8]]
    assert [r["step"] for r in trainer.records] == list(range(1, 13)) and trainer.global_step == 12
    assert [r["lr"] for r in trainer.records] == [0.1] * 4 + [0.05] * 4 + [0.025] * 4
    assert [r["epoch"] for r in trainer.records] == [0.0] * 4 + [1.0] * 4 + [2.0] * 4
    assert (trainer.epoch, trainer.batch) == (3, 0)
    # the fixed-batch loss: the first batch, before and after training, under a fixed RNG state
    assert trainer.fixed["ind"] == calls[0][1]
    x = Points().x[calls[0][1]].flatten(1)
    with torch.random.fork_rng():
        torch.manual_seed(FIXED_BATCH_SEED)
        noise = 0.01 * torch.rand(()).item()
    with torch.no_grad():
        assert end == pytest.approx(float((model(x) - 1).square().mean() + noise), rel=1e-6)
    assert start > end
    # the log on disk holds the same records (running name until the trainer finishes)
    lines = (tmp_path / "toy.running.jsonl").read_text().splitlines()
    assert [json.loads(line) for line in lines] == trainer.records


def test_an_interrupted_fit_saves_at_the_step_and_resumes_to_the_uninterrupted_result(tmp_path):
    straight, model, (start, end), calls = run_fit(tmp_path / "a")
    (tmp_path / "b").mkdir()
    stopped, _, result, first = run_fit(tmp_path / "b", stop_after=6)
    assert isinstance(result, Terminated) and len(first) == 6
    assert stopped.saved_state == f"{tmp_path / 'b' / 'state_toy.pt'} (step 6)"
    resumed, model_b, (start_b, end_b), rest = run_fit(tmp_path / "b", resume="yes")
    assert first + rest == calls  # no batch trained twice, none skipped
    assert resumed.records == straight.records and (start_b, end_b) == (start, end)
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), model_b.state_dict().values()))


def test_fit_saves_the_resumable_state_every_n_steps_and_at_each_epoch_end(tmp_path, monkeypatch):
    saved = []
    monkeypatch.setattr(Trainer, "save_state", lambda self: saved.append((self.global_step, self.epoch, self.batch)))
    run_fit(tmp_path, epochs=2, save_every=3)
    # every 3rd step, then after each epoch's last batch (position: next epoch, batch 0)
    assert saved == [(3, 0, 3), (4, 1, 0), (6, 1, 2), (8, 2, 0)]
