"""The training loop (engine.loop): the optimiser step against a literal recipe, and ``fit`` in process."""

import json
import re

import pytest
import torch

import engine.loop
from engine.loop import AMP_NONFINITE_PATIENCE, FIXED_BATCH_SEED, Trainer, fit
from loader.batches import make_loader, seed_everything
from utils.atomic import OutputWriteError
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


def make_trainer(log_dir, epochs=3, save_every=0, amp=False, shared=None, local=None, max_steps=None, flags=None):
    info = DistInfo(rank=0, world_size=1, local_rank=0, device=torch.device("cpu"))
    return Trainer(
        "toy", info, str(log_dir), epochs=epochs, max_steps=max_steps, save_every=save_every, amp=amp,
        flags=flags or {}, shared=shared or {}, local=local,
    )  # fmt: skip


def run_fit(log_dir, epochs=3, save_every=0, stop_after=None, resume="no", max_steps=None):
    """Train a linear model with SGD + StepLR under ``fit``; ``stop_after``: SIGTERM received after this many
    steps of this call. A second module, per-rank state (``local``), drifts by a random step each batch.
    -> (trainer, {"model", "drift", "loss_batches": indices of every batch the loss saw},
    (fixed start, fixed end) or the Terminated raised, [(epoch, indices) of every step])."""
    seed_everything(0)
    model, drift = torch.nn.Linear(12, 1), torch.nn.Linear(1, 1)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    scheduler = torch.optim.lr_scheduler.StepLR(optimizer, 1, gamma=0.5)
    shared = {"model": model, "optimizer": optimizer, "scheduler": scheduler}
    trainer = make_trainer(log_dir, epochs, save_every, shared=shared, local={"drift": drift}, max_steps=max_steps)
    loader, sampler = make_loader(Points(), trainer.info, batch_size=3, num_workers=0, shuffle=True, drop_last=True)
    resumed = trainer.resume(resume)
    assert resumed == (resume != "no" and trainer.global_step > 0)
    calls, seen = [], []

    def loss_fn(batch):  # a random term: a resumed run must also restore the RNG
        seen.append(batch.ind.tolist())
        return (model(batch.img.flatten(1)) - 1).square().mean() + 0.01 * torch.rand(()).item()

    def train_step(epoch, batch):
        assert PREEMPTION.deferred  # a SIGTERM inside a step waits for its end
        loss = loss_fn(batch)
        trainer.step(loss, [optimizer], list(model.parameters()))
        with torch.no_grad():
            drift.bias.add_(torch.randn(1))
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
    assert not PREEMPTION.deferred
    return trainer, {"model": model, "drift": drift, "loss_batches": seen}, result, calls


def test_fit_trains_every_batch_logs_each_step_and_steps_the_schedule_per_epoch(tmp_path):
    trainer, nets, (start, end), calls = run_fit(tmp_path)
    model = nets["model"]
    assert [epoch for epoch, _ in calls] == [0] * 4 + [1] * 4 + [2] * 4  # 12 items / 3, drop_last
    for epoch in range(3):  # each epoch sees every item once, in an order of its own
        assert sorted(i for e, ind in calls if e == epoch for i in ind) == list(range(12))
    assert [ind for _, ind in calls[:4]] != [ind for _, ind in calls[4:8]]
    assert [r["step"] for r in trainer.records] == list(range(1, 13)) and trainer.global_step == 12
    assert [r["lr"] for r in trainer.records] == [0.1] * 4 + [0.05] * 4 + [0.025] * 4
    assert [r["epoch"] for r in trainer.records] == [0.0] * 4 + [1.0] * 4 + [2.0] * 4
    assert (trainer.epoch, trainer.batch) == (3, 0)
    # the fixed-batch loss: the first batch, before and after training, under a fixed RNG state
    assert trainer.fixed["ind"] == calls[0][1] and nets["loss_batches"][-1] == calls[0][1]
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
    straight, nets, (start, end), calls = run_fit(tmp_path / "a")
    (tmp_path / "b").mkdir()
    stopped, _, result, first = run_fit(tmp_path / "b", stop_after=6)
    assert isinstance(result, Terminated) and len(first) == 6
    assert stopped.saved_state == f"{tmp_path / 'b' / 'state_toy.pt'} (step 6)"
    resumed, nets_b, (start_b, end_b), rest = run_fit(tmp_path / "b", resume="yes")
    assert first + rest == calls  # no batch trained twice, none skipped
    assert resumed.records == straight.records and (start_b, end_b) == (start, end)
    for name in ("model", "drift"):
        assert all(
            torch.equal(a, b) for a, b in zip(nets[name].state_dict().values(), nets_b[name].state_dict().values())
        )
    # the resumed run's log starts with the records of the steps before the stop
    lines = (tmp_path / "b" / "toy.running.jsonl").read_text().splitlines()
    assert [json.loads(line) for line in lines] == straight.records


def test_resume_says_where_it_continues_and_reports_whether_it_did(tmp_path, capsys):
    run_fit(tmp_path, stop_after=5)
    _, _, result, _ = run_fit(tmp_path, resume="yes", stop_after=1)  # resumes, then stops again at step 6
    assert f"[toy] resuming from {tmp_path / 'state_toy.pt'} (step 5): epoch 2" in capsys.readouterr().err
    assert isinstance(result, Terminated)
    fresh = make_trainer(tmp_path / "none")
    assert fresh.resume("auto") is False and fresh.saved_state is None
    trainer, _, _, _ = run_fit(tmp_path, resume="auto", epochs=3)
    assert trainer.global_step == 12 and len(trainer.records) == 12


def test_max_steps_caps_the_batches_of_each_epoch_also_when_resumed_inside_it(tmp_path):
    trainer, _, _, calls = run_fit(tmp_path, epochs=2, max_steps=3)
    assert [epoch for epoch, _ in calls] == [0, 0, 0, 1, 1, 1] and trainer.global_step == 6
    run_fit(tmp_path / "b", epochs=2, max_steps=3, stop_after=2)
    trainer, _, _, rest = run_fit(tmp_path / "b", epochs=2, max_steps=3, resume="yes")
    assert [epoch for epoch, _ in rest] == [0, 1, 1, 1] and trainer.global_step == 6


def test_resume_no_starts_over_and_removes_the_saved_state(tmp_path):
    run_fit(tmp_path, stop_after=5)
    assert (tmp_path / "state_toy.pt").exists()
    trainer, _, _, calls = run_fit(tmp_path, resume="no")
    assert len(calls) == 12 and trainer.records[0]["step"] == 1


def test_the_loss_scaler_state_is_saved_and_resumed(tmp_path):
    trainer = make_trainer(tmp_path, shared={"model": torch.nn.Linear(2, 1)})
    trainer.scaler = torch.amp.GradScaler("cpu", init_scale=1024.0, enabled=True)
    trainer.save_state()
    again = make_trainer(tmp_path, shared={"model": torch.nn.Linear(2, 1)})
    again.scaler = torch.amp.GradScaler("cpu", init_scale=2.0, enabled=True)
    assert again.resume("yes") and again.scaler.get_scale() == 1024.0


def test_fit_saves_the_resumable_state_every_n_steps_and_at_each_epoch_end(tmp_path, monkeypatch):
    saved = []
    monkeypatch.setattr(Trainer, "save_state", lambda self: saved.append((self.global_step, self.epoch, self.batch)))
    run_fit(tmp_path, epochs=2, save_every=3)
    # every 3rd step, then after each epoch's last batch (position: next epoch, batch 0)
    assert saved == [(3, 0, 3), (4, 1, 0), (6, 1, 2), (8, 2, 0)]


def test_finish_renames_the_running_files_and_writes_the_summary_and_the_loss_plot(tmp_path):
    trainer, _, (start, end), _ = run_fit(tmp_path, epochs=1)
    (tmp_path / "config_toy.running.json").write_text("{}")
    summary = trainer.loss_summary("loss", start, end)
    losses = [r["loss"] for r in trainer.records]
    assert summary == {"loss_first": losses[0], "loss_last": losses[-1], "fixed_batch_loss_start": start,
                       "fixed_batch_loss_end": end}  # fmt: skip
    assert trainer.loss_summary("absent", 1.0, 2.0)["absent_first"] is None
    written = trainer.finish({"extra": 1}, ["loss"])
    on_disk = json.loads((tmp_path / "toy_summary.json").read_text())
    assert on_disk == written and on_disk["extra"] == 1
    assert (on_disk["stage"], on_disk["steps"], on_disk["amp_skipped_steps"]) == ("toy", 4, 0)
    assert 0 <= on_disk["seconds"] < 600
    assert (tmp_path / "toy.jsonl").exists() and (tmp_path / "config_toy.json").read_text() == "{}"
    assert not list(tmp_path.glob("*.running.*"))
    assert (tmp_path / "toy_loss.png").read_bytes()[:4] == b"\x89PNG"


def test_a_failed_log_write_keeps_the_log_line_complete_and_says_so(tmp_path, monkeypatch):
    trainer = make_trainer(tmp_path)
    trainer.log(loss=1.0)
    before = (tmp_path / "toy.running.jsonl").read_bytes()

    class Full:
        def __init__(self, path, mode):
            self.file = open(path, mode)

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            self.file.close()

        def write(self, text):
            self.file.write(text[:5])
            self.file.flush()
            raise OSError(28, "No space left on device")

    monkeypatch.setattr(engine.loop, "open", Full, raising=False)  # the module's name lookup finds it first
    with pytest.raises(OutputWriteError, match=r"toy\.running\.jsonl: No space left on device; the log keeps its "
                       r"complete lines, the last resumable state is none"):  # fmt: skip
        trainer.log(loss=2.0)
    monkeypatch.undo()
    assert (tmp_path / "toy.running.jsonl").read_bytes() == before


def test_under_the_loss_scaler_a_non_finite_loss_skips_steps_until_it_persists(tmp_path):
    """AMP (here a CPU loss scaler): a step whose gradients overflow is skipped and counted; a non-finite
    loss only stops the run after AMP_NONFINITE_PATIENCE in a row, and a finite one resets the count."""
    model = torch.nn.Linear(2, 1)
    trainer = make_trainer(tmp_path)
    trainer.scaler = torch.amp.GradScaler("cpu", init_scale=2.0**16, enabled=True)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    params = list(model.parameters())
    assert trainer.step(model(torch.ones(1, 2)).sum(), [optimizer], params)
    before = [p.detach().clone() for p in params]
    nan = lambda: model(torch.ones(1, 2)).sum() * float("nan")  # noqa: E731
    for _ in range(AMP_NONFINITE_PATIENCE - 1):
        assert not trainer.step(nan(), [optimizer], params)
    assert trainer.skipped_steps == AMP_NONFINITE_PATIENCE - 1 and trainer.nonfinite_run == AMP_NONFINITE_PATIENCE - 1
    assert all(torch.equal(p, b) for p, b in zip(params, before))
    assert trainer.step(model(torch.ones(1, 2)).sum(), [optimizer], params) and trainer.nonfinite_run == 0
    for _ in range(AMP_NONFINITE_PATIENCE - 1):
        trainer.step(nan(), [optimizer], params)
    with pytest.raises(
        NonFiniteLossError, match=r"non-finite loss at step 21: loss=nan; stopped; last good state: none"
    ):
        trainer.step(nan(), [optimizer], params)


def test_the_non_finite_error_names_the_last_saved_state(tmp_path):
    model = torch.nn.Linear(2, 1)
    trainer = make_trainer(tmp_path, shared={"model": model})
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    trainer.step(model(torch.ones(1, 2)).sum(), [optimizer], list(model.parameters()))
    trainer.save_state()
    state = f"{tmp_path / 'state_toy.pt'} (step 1)"
    with pytest.raises(NonFiniteLossError, match=re.escape(f"at step 2: a=1 b=inf; stopped; last good state: {state}")):
        trainer.step(model(torch.ones(1, 2)).sum() * float("inf"), [optimizer], list(model.parameters()),
                     terms={"a": torch.tensor(1.0), "b": torch.tensor(float("inf"))})  # fmt: skip
    with torch.no_grad():
        model.weight.fill_(float("nan"))
    with pytest.raises(NonFiniteLossError, match=re.escape(f"not saved; last good state: {state}")):
        trainer.save_state()


def test_only_the_clip_params_are_clipped_and_amp_needs_cuda(tmp_path):
    first, second = torch.nn.Linear(3, 1, bias=False), torch.nn.Linear(3, 1, bias=False)
    trainer = make_trainer(tmp_path, amp=True, flags={"path": tmp_path})  # AMP is asked for, but there is no GPU
    assert not trainer.scaler.is_enabled() and trainer.state.flags == {"path": str(tmp_path)}
    optimizer = torch.optim.SGD([*first.parameters(), *second.parameters()], lr=1.0)
    before = first.weight.detach().clone(), second.weight.detach().clone()
    loss = 100 * (first(torch.ones(1, 3)) + second(torch.ones(1, 3))).sum()
    trainer.step(loss, [optimizer], [first.weight, second.weight], grad_clip=1.0, clip_params=[first.weight])
    assert torch.allclose((before[0] - first.weight).norm(), torch.tensor(1.0), atol=1e-5)
    assert torch.allclose(before[1] - second.weight, torch.full((1, 3), 100.0))
