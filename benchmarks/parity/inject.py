"""Identical random draws and a step recorder for both implementations (``parity.py --mode steps``).

Installed in the process of either side before its stage script runs. Every random draw the
training step makes is taken from one dedicated generator, in call order, so both sides get
the same dropout masks, grid picks, bank subsets and data order as long as they make the same
calls in the same order; the initial cluster probe comes from a file. The recorder writes, per
optimiser step, the loss, every gradient the optimiser sees and every parameter after the step.

The project's fixed-batch loss (its summary's before/after value on the first batch, not part
of training) keeps its own generator and does not shift the stream; evaluation passes draw
nothing (eval mode).
"""

import atexit
import json
import math

import torch
import torch.nn.functional as F


def add_flags(parser):
    """The flags of an injected run, the same for both sides' runners."""
    parser.add_argument("--inject", type=int, default=None, help="seed of the injected random draws")
    parser.add_argument("--orders", default=None, help="JSON list of per-epoch sample orders to inject")
    parser.add_argument("--probe", default=None, help="initial cluster probe [C, r] (torch file) to inject")
    parser.add_argument("--record", default=None, help="write the per-step record here")
    parser.add_argument("--segment_init", default=None, help="initial segment state dict (torch file) to inject")
    parser.add_argument("--losses", default=None, help="write every training-loss term (JSON) here")


def run_script(known, rest, folder, install, log_losses):
    """Run ``folder/known.script`` as ``__main__`` with the flags ``rest``, after installing the injection and the
    loss log that ``known`` (the parsed ``add_flags``) asks for: ``install(Injection)``, ``log_losses(path)``."""
    import os
    import runpy
    import sys

    if known.inject is not None:
        install(Injection(known.inject, known.orders, known.probe, known.record, known.segment_init))
    if known.losses:
        log_losses(known.losses)
    sys.argv = [known.script] + rest
    runpy.run_path(os.path.join(folder, known.script), run_name="__main__")


class Injection:
    def __init__(self, seed, order_file=None, probe_file=None, record_file=None, segment_file=None):
        self.generator = torch.Generator().manual_seed(seed)
        self.orders = json.load(open(order_file)) if order_file else None
        self.probe = torch.load(probe_file) if probe_file else None
        self.segment = torch.load(segment_file) if segment_file else None
        self.record_file = record_file
        self.records = []
        self.loss = None
        self.suspended = False

    def active(self):
        return not self.suspended

    # -- draws ---------------------------------------------------------------------------

    def install_dropout(self):
        original = F.dropout

        def dropout(input, p=0.5, training=True, inplace=False):
            if not (training and p > 0 and self.active()):
                return original(input, p, training, inplace)
            keep = torch.rand(input.shape, generator=self.generator) >= p
            return input * keep.to(device=input.device, dtype=input.dtype) / (1 - p)

        F.dropout = dropout

    def install_randint(self):
        original = torch.randint

        def randint(*args, **kwargs):
            if kwargs.get("generator") is None and self.active():
                kwargs["generator"] = self.generator
                kwargs.pop("device", None)
            return original(*args, **kwargs)

        torch.randint = randint

    def bank_subset(self, concept_idx):
        """Rows one bank update keeps: per concept ascending, the first ⌊n/2⌋ of a permutation."""
        rows = []
        for concept in concept_idx.unique().tolist():
            members = torch.nonzero(concept_idx == concept).squeeze(1)
            order = torch.randperm(members.shape[0], generator=self.generator)
            rows.append(members[order][: int(members.shape[0] * 0.5)])
        return torch.cat(rows) if rows else concept_idx.new_zeros(0)

    def order(self, epoch):
        return self.orders[epoch % len(self.orders)]

    # -- recorder ------------------------------------------------------------------------

    def install_recorder(self):
        backward = torch.Tensor.backward
        step = torch.optim.Adam.step

        def record_backward(tensor, *args, **kwargs):
            if tensor.dim() == 0:
                self.loss = float(tensor.detach())
            return backward(tensor, *args, **kwargs)

        def record_step(optimizer, *args, **kwargs):
            params = [p for group in optimizer.param_groups for p in group["params"] if p.grad is not None]
            grads = [p.grad.detach().clone() for p in params]
            out = step(optimizer, *args, **kwargs)
            self.records.append(
                {
                    "loss": self.loss,
                    "grads": grads,
                    "params": [p.detach().clone() for p in params],
                    "lr": optimizer.param_groups[0]["lr"],
                }
            )
            return out

        torch.Tensor.backward = record_backward
        torch.optim.Adam.step = record_step
        atexit.register(self.save)

    def save(self):
        if self.record_file:
            torch.save(self.records, self.record_file)

    def install(self):
        self.install_dropout()
        self.install_randint()
        if self.record_file:
            self.install_recorder()


class LossLog:
    """The value of every training-loss term the method computes (autograd on), in call order."""

    def __init__(self, path):
        self.path = path
        self.values = []
        atexit.register(self.save)

    def wrap(self, owner, name, term):
        original = getattr(owner, name)

        def logged(*args, **kwargs):
            out = original(*args, **kwargs)
            if torch.is_grad_enabled():
                self.values.append((term, float(out.detach())))
            return out

        setattr(owner, name, logged)

    def save(self):
        with open(self.path, "w") as f:
            json.dump(self.values, f)


def log_project_losses(path):
    import modules.objectives as objectives

    log = LossLog(path)
    log.wrap(objectives, "modularity_loss", "modularity")
    log.wrap(objectives, "front_door_loss", "front_door")


def log_reference_losses(path):
    import modules.segment_module as segment_module

    log = LossLog(path)
    log.wrap(segment_module, "compute_modularity_based_codebook", "modularity")
    log.wrap(segment_module.Cluster, "contrastive_ema_with_codebook_bank", "front_door")


def _initial_segment(classes, injection):
    """Each class's fresh segment module starts from ``injection.segment`` (student and teacher)."""
    for cls in classes:
        init = cls.__init__

        def segment_init(self, *args, _init=init, **kwargs):
            _init(self, *args, **kwargs)
            with torch.no_grad():
                own = self.state_dict()
                for name, value in injection.segment.items():
                    own[name].copy_(value)

        cls.__init__ = segment_init


def install_project(injection):
    """The project's samplers, cluster probe and bank draw from the injection."""
    import engine.loop
    import loader.batches
    import modules.bank
    import modules.segment

    if injection.segment is not None:
        _initial_segment((modules.segment.SegmentMLP, modules.segment.SegmentTR), injection)
    fixed_batch_loss = engine.loop.fixed_batch_loss

    def outside_stream(*args, **kwargs):
        injection.suspended = True
        try:
            return fixed_batch_loss(*args, **kwargs)
        finally:
            injection.suspended = False

    engine.loop.fixed_batch_loss = outside_stream

    injection.install()
    if injection.orders is not None:

        def epoch_order(sampler):
            return iter(injection.order(sampler.epoch)[sampler.start :])

        loader.batches.EpochSampler.__iter__ = epoch_order
    if injection.probe is not None:
        init = modules.segment.Cluster.__init__

        def cluster_init(self, *args, **kwargs):
            init(self, *args, **kwargs)
            self.cluster_probe.data.copy_(injection.probe)

        modules.segment.Cluster.__init__ = cluster_init

    def subset(bank, concept_idx, generator=None):
        return injection.bank_subset(concept_idx)

    modules.bank.ConceptBank._random_subset = subset


def install_reference(injection):
    """The authors' RandomSampler, Cluster and bank permutation draw from the injection."""
    from torch.utils.data import RandomSampler

    import modules.segment
    import modules.segment_module as segment_module

    injection.install()
    if injection.segment is not None:
        _initial_segment((modules.segment.Segment_MLP, modules.segment.Segment_TR), injection)
    if injection.orders is not None:
        calls = {"n": 0}

        def epoch_order(sampler):
            epoch = calls["n"]
            calls["n"] += 1
            return iter(injection.order(epoch))

        RandomSampler.__iter__ = epoch_order
    if injection.probe is not None:
        init = segment_module.Cluster.__init__

        def cluster_init(self, *args, **kwargs):
            init(self, *args, **kwargs)
            self.cluster_probe.data.copy_(injection.probe)

        segment_module.Cluster.__init__ = cluster_init
    # The bank keeps key[perm(n)][:n/2] per concept: the same permutation as ``bank_subset``.
    segment_module.perm = lambda n: torch.randperm(n, generator=injection.generator)


def compare(project_file, reference_file):
    """Per step: |Δloss|, max |Δgrad| and max |Δparam| over every tensor of the step."""
    project, reference = torch.load(project_file), torch.load(reference_file)
    rows = []
    for i, (a, b) in enumerate(zip(project, reference)):
        same_shapes = [x.shape for x in a["grads"]] == [x.shape for x in b["grads"]]
        if not same_shapes:
            rows.append(
                {
                    "call": i,
                    "loss": (a["loss"], b["loss"]),
                    "grad": math.inf,
                    "param": math.inf,
                    "note": "different parameter sets",
                }
            )
            continue
        grad = max(((x - y).abs().max().item() for x, y in zip(a["grads"], b["grads"])), default=0.0)
        param = max(((x - y).abs().max().item() for x, y in zip(a["params"], b["params"])), default=0.0)
        scale = max((x.abs().max().item() for x in a["params"]), default=1.0)
        rows.append(
            {
                "call": i,
                "loss": (a["loss"], b["loss"]),
                "grad": grad,
                "param": param,
                "param_rel": param / max(scale, 1e-12),
                "lr": (a["lr"], b["lr"]),
            }
        )
    return rows, len(project), len(reference)
