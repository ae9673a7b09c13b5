"""The shared command line: published defaults per stage, head, dataset and patch size."""

import argparse

import pytest

from engine.config import build_parser, resolve, round_to_patch


def resolved(stage, argv, patch=16, n_classes=27):
    return resolve(build_parser("t", stage).parse_args(argv), patch, n_classes)


def head(name):
    return [] if name is None else ["--head", name]


def test_round_to_patch():
    assert round_to_patch(320, 14) == 322 and round_to_patch(224, 14) == 224 and round_to_patch(320, 8) == 320


@pytest.mark.parametrize(
    "stage,name,epochs,train_res",
    [
        ("mediator", None, 1, 320),
        ("front_door", "mlp", 2, 224),
        ("front_door", "tr", 2, 320),
        ("fine_tuning", "mlp", 1, 224),
        ("fine_tuning", "tr", 5, 320),
    ],
)
def test_published_training_defaults(stage, name, epochs, train_res):
    args = resolved(stage, ["--dataset", "cocostuff27"] + head(name))
    assert (args.epoch, args.train_resolution, args.num_codebook) == (epochs, train_res, 2048)
    assert args.batch_size == 16 and args.lr == 1e-3 and args.grid is True
    assert args.num_queries == (train_res // 16) ** 2
    if name is not None:
        assert args.reduced_dim == 90 and args.projection_dim == 2048


@pytest.mark.parametrize(
    "stage,name,train_res,test_res", [("test", "mlp", 224, 320), ("test", "tr", 320, 320), ("predict", "tr", 320, 320)]
)
def test_published_evaluation_defaults(stage, name, train_res, test_res):
    args = resolved(stage, ["--dataset", "cocostuff27", "--head", name])
    assert (args.train_resolution, args.test_resolution, args.num_queries) == (
        train_res,
        test_res,
        (train_res // 16) ** 2,
    )


def test_patch14_backbones_use_322():
    args = resolved("front_door", ["--head", "tr"], patch=14)
    assert args.train_resolution == 322 and args.num_queries == 23 * 23
    assert resolved("test", ["--head", "tr"], patch=14).test_resolution == 322
    assert resolved("mediator", [], patch=14).train_resolution == 322


@pytest.mark.parametrize(
    "stage,unknown",
    [
        ("mediator", "--head"),
        ("mediator", "--reduced_dim"),
        ("mediator", "--grad_clip"),
        ("mediator", "--test_resolution"),
        ("front_door", "--test_resolution"),
        ("test", "--lr"),
        ("test", "--epoch"),
        ("test", "--grad_clip"),
        ("test", "--max_steps"),
        ("test", "--feature_cache"),
        ("predict", "--lr"),
        ("predict", "--seed"),
        ("predict", "--resume"),
    ],
)
def test_each_script_takes_only_the_flags_it_uses(stage, unknown):
    with pytest.raises(SystemExit):
        build_parser("t", stage).parse_args([unknown, "1"])


@pytest.mark.parametrize(
    "stage,flag,value",
    [
        ("front_door", "--lr", "nan"),
        ("front_door", "--lr", "-1"),
        ("front_door", "--lr", "0"),
        ("front_door", "--lr", "inf"),
        ("mediator", "--num_workers", "-1"),
        ("front_door", "--grad_clip", "-2"),
        ("front_door", "--weight_decay", "nan"),
        ("front_door", "--bank_keep_ratio", "1.5"),
        ("front_door", "--ema_momentum", "-0.1"),
        ("test", "--crf_alpha", "0"),
        ("fine_tuning", "--modularity_temp", "0"),
        ("test", "--batch_size", "0"),
        ("mediator", "--dist_timeout", "nan"),
    ],
)
def test_numbers_without_meaning_are_refused_when_parsed(stage, flag, value, capsys):
    with pytest.raises(SystemExit) as stop:
        build_parser("t", stage).parse_args([flag, value])
    assert stop.value.code == 2 and flag in capsys.readouterr().err.strip().splitlines()[-1]


def test_the_resolved_configuration_is_read_only():
    cfg = resolved("front_door", [])
    with pytest.raises(AttributeError, match="read-only"):
        cfg.lr = 1.0
    assert cfg.as_dict()["lr"] == 1e-3 and "_frozen" not in cfg.as_dict()


@pytest.mark.parametrize(
    "dataset,head,clip,wd",
    [
        ("cocostuff27", "mlp", 0.1, 1e-4),
        ("cocostuff27", "tr", 2.0, 1e-4),
        ("cityscapes", "mlp", 1.0, 0.0),
        ("cityscapes", "tr", 1.0, 0.0),
        ("coco171", "mlp", 0.1, 1e-4),
        ("coco81", "tr", 2.0, 1e-4),
        ("pascalvoc", "mlp", 1.0, 1e-4),
        ("toy", "tr", 1.0, 1e-4),
    ],
)
def test_grad_clip_and_weight_decay_per_dataset(dataset, head, clip, wd):
    args = resolved("front_door", ["--dataset", dataset, "--head", head])
    assert args.grad_clip == clip and args.weight_decay == wd


@pytest.mark.parametrize(
    "dataset,head,clip",
    [
        ("cocostuff27", "mlp", 0.1),
        ("cocostuff27", "tr", 2.0),
        ("cityscapes", "mlp", 1.0),
        ("cityscapes", "tr", 1.0),
        ("coco171", "mlp", 0.0),
        ("coco81", "tr", 0.0),
        ("pascalvoc", "mlp", 0.0),
        ("toy", "tr", 0.0),
    ],
)
def test_stage3_clips_as_the_reference(dataset, head, clip):
    args = resolved("fine_tuning", ["--dataset", dataset, "--head", head])
    assert args.grad_clip == clip and args.reference_stage3 is True


def test_method_constants_are_flags_of_their_stage():
    front = resolved("front_door", [])
    assert (front.contrastive_temp, front.pos_thresh, front.neg_thresh) == (0.07, 0.3, 0.1)
    assert (front.bank_capacity, front.bank_keep_ratio, front.ema_momentum) == (100, 0.5, 0.99)
    assert resolved("mediator", []).modularity_temp == resolved("fine_tuning", []).modularity_temp == 0.1
    assert (
        build_parser("t", "test").parse_args([]).crf_alpha
        == 3.0
        == build_parser("t", "predict").parse_args([]).crf_alpha
    )
    assert not hasattr(resolved("mediator", []), "contrastive_temp")
    assert resolved("fine_tuning", ["--reference_stage3", "no"]).reference_stage3 is False


@pytest.mark.parametrize(
    "stage,expected",
    [
        ("mediator", {"modularity_temp"}),
        (
            "front_door",
            {"contrastive_temp", "pos_thresh", "neg_thresh", "bank_capacity", "bank_keep_ratio", "ema_momentum"},
        ),
        ("fine_tuning", {"modularity_temp", "reference_stage3"}),
        ("test", {"crf_alpha"}),
        ("predict", {"crf_alpha"}),
    ],
)
def test_each_stage_has_exactly_its_method_flags(stage, expected):
    parser = build_parser("t", stage)
    group = next(g for g in parser._action_groups if g.title.startswith("method"))
    assert {action.dest for action in group._group_actions} == expected
    if stage == "front_door":
        with pytest.raises(SystemExit):
            parser.parse_args(["--bank_capacity", "0"])  # a bank holds at least one vector per concept


def test_explicit_flags_win_and_aliases():
    args = resolved("front_door", ["--head", "detr", "--grad_clip", "5", "--epoch", "7", "--grid", "no"])
    assert args.head == "tr" and args.grad_clip == 5.0 and args.epoch == 7 and args.grid is False
    assert build_parser("t", "test").parse_args(["--head", "cnn"]).head == "mlp"
    with pytest.raises(SystemExit):
        build_parser("t", "test").parse_args(["--head", "unet"])
    with pytest.raises(SystemExit):
        build_parser("t", "mediator").parse_args(["--max_steps", "0"])


def test_every_flag_has_help():
    parser = build_parser("t", "front_door")
    for action in parser._actions:
        if not isinstance(action, argparse._HelpAction):
            assert action.help, action.dest
