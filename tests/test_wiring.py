"""Every method flag reaches the code that uses it.

Each training stage runs a few steps with non-default values of its flags while the functions
and classes it calls are spied on; a flag that a stage read from a constant instead would leave
the published value in the spy's record.
"""

import inspect

import pytest

import fine_tuning
import train_front_door
import train_mediator
from engine.loop import Trainer
from modules.bank import ConceptBank
from modules.segment import SegmentBase
from tests._stage_flags import flags, parse


def spy(monkeypatch, owner, name):
    """Replace ``owner.name`` by a wrapper that records each call's arguments by parameter name
    (defaults included); returns the list of records."""
    calls = []
    real = getattr(owner, name)
    signature = inspect.signature(real)

    def wrapper(*args, **kwargs):
        bound = signature.bind(*args, **kwargs)
        bound.apply_defaults()
        calls.append(bound.arguments)
        return real(*args, **kwargs)

    monkeypatch.setattr(owner, name, wrapper)
    return calls


@pytest.fixture(scope="module")
def stage_runs(tmp_path_factory, toy_dirs, dino_ckpt):
    """The three training stages, each with its method flags away from the published values."""
    out = tmp_path_factory.mktemp("wiring") / "CAUSE"
    monkeypatch = pytest.MonkeyPatch()
    base = flags(out, dino_ckpt, toy_dirs["train"], "mlp", ["--epoch", "1", "--max_steps", "3"])
    records = {"banks": []}

    class RecordedBank(ConceptBank):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            records["banks"].append(self)

    try:
        records["mediator_loss"] = spy(monkeypatch, train_mediator, "mediator_loss")
        train_mediator.main(parse(train_mediator, base + ["--modularity_temp", "0.25"]))

        records["front_door_step"] = spy(monkeypatch, train_front_door, "front_door_step")
        records["update_bank"] = spy(monkeypatch, train_front_door, "update_bank")
        records["update_teacher"] = spy(monkeypatch, SegmentBase, "update_teacher")
        records["stage2_step"] = spy(monkeypatch, Trainer, "step")
        monkeypatch.setattr(train_front_door, "ConceptBank", RecordedBank)
        train_front_door.main(
            parse(
                train_front_door,
                base
                + [
                    "--contrastive_temp",
                    "0.2",
                    "--pos_thresh",
                    "0.4",
                    "--neg_thresh",
                    "0.05",
                    "--bank_capacity",
                    "7",
                    "--bank_keep_ratio",
                    "0.25",
                    "--ema_momentum",
                    "0.9",
                    "--grad_clip",
                    "0.7",
                ],
            )
        )
        monkeypatch.undo()

        records["fine_tuning_step"] = spy(monkeypatch, fine_tuning, "fine_tuning_step")
        records["stage3_step"] = spy(monkeypatch, Trainer, "step")
        fine_tuning.main(
            parse(fine_tuning, base + ["--modularity_temp", "0.3", "--reference_stage3", "no", "--grad_clip", "0.6"])
        )
    finally:
        monkeypatch.undo()
    return records


def test_stage1_modularity_temperature(stage_runs):
    calls = stage_runs["mediator_loss"]  # three steps, and the fixed batch before and after them
    assert len(calls) >= 3 and all(call["temp"] == 0.25 for call in calls)


def test_stage2_loss_thresholds_temperature_and_clipping(stage_runs):
    calls = stage_runs["front_door_step"]
    assert len(calls) >= 3 and all((call["temp"], call["pos"], call["neg"]) == (0.2, 0.4, 0.05) for call in calls)
    assert [call["grad_clip"] for call in stage_runs["stage2_step"]] == [0.7] * 3


def test_stage2_bank_and_teacher_follow_their_flags(stage_runs):
    (bank,) = stage_runs["banks"]
    assert (bank.capacity, bank.keep_ratio) == (7, 0.25)
    assert len(stage_runs["update_bank"]) == 3 and len(bank) > 0  # filled once per step
    assert [call["momentum"] for call in stage_runs["update_teacher"]] == [0.9] * 3
    # the reference's teacher shares the student's storage until its first update
    assert [call["tied"] for call in stage_runs["update_teacher"]] == [True, False, False]


def test_stage3_protocol_temperature_and_clipping(stage_runs):
    calls = stage_runs["fine_tuning_step"]
    assert len(calls) >= 3 and all((call["temp"], call["reference"]) == (0.3, False) for call in calls)
    assert [call["grad_clip"] for call in stage_runs["stage3_step"]] == [0.6] * 3
    # As the reference, the norm clipped is the segment's alone: the cluster probe steps unclipped.
    for call in stage_runs["stage3_step"]:
        probe = call["params"][-1]
        assert probe.dim() == 2 and probe.shape[0] == 6  # [C, r]: the toy's six classes
        assert [id(p) for p in call["clip_params"]] == [id(p) for p in call["params"][:-1]]
