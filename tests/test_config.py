"""The shared command line: published defaults per stage, head, dataset and patch size."""

import argparse

import pytest

from utils.config import build_parser, resolve, round_to_patch


def resolved(stage, argv, patch=16, n_classes=27):
    return resolve(build_parser("t", stage).parse_args(argv), patch, n_classes)


def test_round_to_patch():
    assert round_to_patch(320, 14) == 322 and round_to_patch(224, 14) == 224 and round_to_patch(320, 8) == 320


@pytest.mark.parametrize("stage,head,epochs,train_res,test_res", [
    ("mediator", "mlp", 1, 320, 320), ("front_door", "mlp", 2, 224, 320), ("front_door", "tr", 2, 320, 320),
    ("fine_tuning", "mlp", 1, 224, 320), ("fine_tuning", "tr", 5, 320, 320), ("test", "tr", 1, 320, 320)])
def test_published_defaults(stage, head, epochs, train_res, test_res):
    args = resolved(stage, ["--dataset", "cocostuff27", "--head", head])
    assert (args.epoch, args.train_resolution, args.test_resolution) == (epochs, train_res, test_res)
    assert args.num_codebook == 2048 and args.reduced_dim == 90 and args.projection_dim == 2048
    assert args.batch_size == 16 and args.lr == 1e-3 and args.grid is True
    assert args.num_queries == (train_res // 16) ** 2


def test_patch14_backbones_use_322():
    args = resolved("front_door", ["--head", "tr"], patch=14)
    assert args.train_resolution == 322 and args.test_resolution == 322 and args.num_queries == 23 * 23
    assert resolved("mediator", [], patch=14).train_resolution == 322


@pytest.mark.parametrize("dataset,head,clip,wd", [
    ("cocostuff27", "mlp", 0.1, 1e-4), ("cocostuff27", "tr", 2.0, 1e-4), ("cityscapes", "mlp", 1.0, 0.0),
    ("cityscapes", "tr", 1.0, 0.0), ("coco171", "mlp", 0.1, 1e-4), ("coco81", "tr", 2.0, 1e-4),
    ("pascalvoc", "mlp", 1.0, 1e-4), ("toy", "tr", 1.0, 1e-4)])
def test_grad_clip_and_weight_decay_per_dataset(dataset, head, clip, wd):
    args = resolved("front_door", ["--dataset", dataset, "--head", head])
    assert args.grad_clip == clip and args.weight_decay == wd


@pytest.mark.parametrize("dataset,head,clip", [
    ("cocostuff27", "mlp", 0.1), ("cocostuff27", "tr", 2.0), ("cityscapes", "mlp", 1.0), ("cityscapes", "tr", 1.0),
    ("coco171", "mlp", 0.0), ("coco81", "tr", 0.0), ("pascalvoc", "mlp", 0.0), ("toy", "tr", 0.0)])
def test_stage3_clips_as_the_reference(dataset, head, clip):
    args = resolved("fine_tuning", ["--dataset", dataset, "--head", head])
    assert args.grad_clip == clip and args.reference_stage3 is True


def test_method_constants_are_flags_of_their_stage():
    front = resolved("front_door", [])
    assert (front.contrastive_temp, front.pos_thresh, front.neg_thresh) == (0.07, 0.3, 0.1)
    assert (front.bank_capacity, front.bank_keep_ratio, front.ema_momentum) == (100, 0.5, 0.99)
    assert resolved("mediator", []).modularity_temp == resolved("fine_tuning", []).modularity_temp == 0.1
    assert build_parser("t", "test").parse_args([]).crf_alpha == 3.0
    assert not hasattr(resolved("mediator", []), "contrastive_temp")
    assert resolved("fine_tuning", ["--reference_stage3", "no"]).reference_stage3 is False


@pytest.mark.parametrize("stage,expected", [
    ("mediator", {"modularity_temp"}),
    ("front_door", {"contrastive_temp", "pos_thresh", "neg_thresh", "bank_capacity", "bank_keep_ratio",
                    "ema_momentum"}),
    ("fine_tuning", {"modularity_temp", "reference_stage3"}),
    ("test", {"crf_alpha"}),
])
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
