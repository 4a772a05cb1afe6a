"""Parity of simsiam.py with the official facebookresearch/simsiam code (a7bc177, methods-modern.md §12).

The checkout is $SSL_REFS/facebookresearch__simsiam (the module is skipped without it). Their model
(simsiam/builder.py SimSiam on a torchvision ResNet-18 built, as theirs, with num_classes=dim and
zero_init_residual=True), their training iteration (train() of main_simsiam.py: forward, the
CosineSimilarity loss, zero_grad, backward, SGD step) and their per-epoch schedule
(adjust_learning_rate, with the fix_lr predictor group of main_worker) run next to ours in float64
for 3 steps (one per epoch of a 4-epoch cosine, so the two groups' LRs part after the first), from the
same weights on the same two views. Compared after every step: the loss, every gradient, every
parameter and BN buffer, every momentum buffer, every group's LR.

Shims, all in this file: builder.py is loaded by file path (its package `simsiam` would collide with
our simsiam.py); train(), AverageMeter, ProgressMeter and adjust_learning_rate are compiled out of
main_simsiam.py by its syntax tree (the script parses arguments and imports its packages at the top);
train() gets a one-batch list for its DataLoader, args.gpu = None (no .cuda), and a CosineSimilarity
subclass that records its outputs so the loss it formed can be read back exactly; the param groups
are those main_worker builds for --fix-pred-lr (not callable without DistributedDataParallel), built
the same way here.
"""
import argparse
import ast
import contextlib
import io
import math
import time

import torch
import torch.nn as nn
import torch.nn.functional as F

import simsiam
from common.resnet import build_resnet
from simsiam import SimSiam, build_optimizer, set_epoch_lr

from .refs import checkout, load, rel

REF = checkout('facebookresearch__simsiam', 'simsiam/builder.py')

TOL = 1e-10  # float64; a difference is divided by the tensor's largest magnitude when that exceeds 1


def load_builder():
    return load('ss_builder', REF / 'simsiam' / 'builder.py')


def reference_functions():
    """train, adjust_learning_rate (and the meters train() uses), compiled from main_simsiam.py's source."""
    tree = ast.parse((REF / 'main_simsiam.py').read_text())
    keep = {'train', 'adjust_learning_rate', 'AverageMeter', 'ProgressMeter'}
    body = [n for n in tree.body if isinstance(n, (ast.FunctionDef, ast.ClassDef)) and n.name in keep]
    assert {n.name for n in body} == keep
    ns = {'math': math, 'time': time, 'torch': torch}
    exec(compile(ast.Module(body=body, type_ignores=[]), str(REF / 'main_simsiam.py'), 'exec'), ns)
    return ns['train'], ns['adjust_learning_rate']


B = load_builder()
TRAIN, ADJUST_LR = reference_functions()
DIM, PRED_DIM, EPOCHS, INIT_LR, WD = 32, 8, 4, 0.2, 1e-4


class RecordingCosine(nn.CosineSimilarity):
    """nn.CosineSimilarity(dim=1) that keeps its outputs (the reference's criterion, observed)."""

    def __init__(self):
        super().__init__(dim=1)
        self.outputs = []

    def forward(self, a, b):
        out = super().forward(a, b)
        self.outputs.append(out.detach())
        return out


def our_name(name):
    """Reference name -> ours: encoder.fc.* -> encoder.projector.*, the rest of encoder -> encoder.backbone."""
    if name.startswith('encoder.fc.'):
        return 'encoder.projector.' + name[len('encoder.fc.'):]
    if name.startswith('encoder.'):
        return 'encoder.backbone.' + name[len('encoder.'):]
    return name


def pair():
    import torchvision
    torch.manual_seed(0)
    ref = B.SimSiam(torchvision.models.resnet18, DIM, PRED_DIM).double()
    backbone = build_resnet('resnet18', 0, 64, False, init='fan_out', zero_init_residual=True)
    ours = SimSiam(backbone, DIM, PRED_DIM, proj_layers=3).double()
    ours.load_state_dict({our_name(k): v for k, v in ref.state_dict().items()})  # strict: every key maps
    return ref, ours


def compare(fix_pred_lr=True, steps=3):
    """Runs both for `steps` iterations; returns the max relative differences per kind and the number of
    gradients compared."""
    ref, ours = pair()
    names = {id(p): our_name(n) for n, p in ref.named_parameters()}
    ref_params = [p for p in ref.parameters() if p.requires_grad]
    our_params = dict(ours.named_parameters())
    assert len(ref_params) == sum(p.requires_grad for p in ours.parameters())
    groups = [{'params': ref.encoder.parameters(), 'fix_lr': False},  # main_worker with --fix-pred-lr
              {'params': ref.predictor.parameters(), 'fix_lr': True}]
    ropt = torch.optim.SGD(groups, INIT_LR, momentum=0.9, weight_decay=WD)
    args = argparse.Namespace(param_group=[], fix_pred_lr=fix_pred_lr, momentum=0.9, wd=WD)
    oopt = build_optimizer(ours, args, INIT_LR, log=lambda *a: None)
    ref_args = argparse.Namespace(epochs=EPOCHS, gpu=None, print_freq=1)
    gen = torch.Generator().manual_seed(1)
    diff = dict(loss=0., grad=0., state=0., momentum=0., lr=0.)
    n_grads = 0
    for epoch in range(steps):
        x1, x2 = (torch.randn(4, 3, 16, 16, generator=gen, dtype=torch.float64) for _ in range(2))
        ADJUST_LR(ropt, INIT_LR, epoch, ref_args)
        set_epoch_lr(oopt, INIT_LR, epoch, EPOCHS)
        lr_of = {id(q): g['lr'] for g in oopt.param_groups for q in g['params']}  # per parameter
        diff['lr'] = max(diff['lr'], *(abs(g['lr'] - lr_of[id(our_params[names[id(p)]])])
                                       for g in ropt.param_groups for p in g['params'] if p.requires_grad))
        criterion = RecordingCosine()
        with contextlib.redirect_stdout(io.StringIO()):
            TRAIN([([x1, x2], None)], ref, criterion, ropt, epoch, ref_args)
        c12, c21 = criterion.outputs
        loss_ref = -(c12.mean() + c21.mean()) * 0.5
        ours.train()
        loss = ours(x1, x2)
        oopt.zero_grad()
        loss.backward()
        diff['loss'] = max(diff['loss'], rel(loss_ref, loss.detach()))
        for p in ref_params:  # the reference's SGD leaves its gradients in place
            q = our_params[names[id(p)]]
            assert p.grad is not None and q.grad is not None, names[id(p)]
            diff['grad'] = max(diff['grad'], rel(p.grad, q.grad))
            n_grads += 1
        assert ref.encoder.fc[6].bias.grad is None and our_params['encoder.projector.6.bias'].grad is None
        oopt.step()
        ours_sd = ours.state_dict()
        for k, v in ref.state_dict().items():  # parameters and BN buffers
            diff['state'] = max(diff['state'], rel(v, ours_sd[our_name(k)]))
        for p in ref_params:
            rs, us = ropt.state[p], oopt.state[our_params[names[id(p)]]]
            diff['momentum'] = max(diff['momentum'], rel(rs['momentum_buffer'], us['momentum_buffer']))
    return diff, n_grads


def test_parity_three_steps():
    diff, n = compare()
    ref, _ = pair()
    trainable = len([p for p in ref.parameters() if p.requires_grad])
    print(f'max relative differences over 3 steps {diff}, {n} gradients compared ({trainable} per step)')
    assert n == 3 * trainable and n > 0
    assert all(v < TOL for v in diff.values()), diff


def test_negative_controls(monkeypatch):
    """Each perturbation of our side is caught: the predictor on the cosine (--no-fix-pred-lr) moves the
    weights after the first step; a loss without the stop-gradient changes the gradients."""
    diff, _ = compare(fix_pred_lr=False)
    assert diff['state'] > 1e-6 and diff['lr'] > 1e-3, diff
    monkeypatch.setattr(simsiam, 'negative_cosine', lambda p, z: -F.cosine_similarity(p, z, dim=1).mean())
    diff, _ = compare(steps=1)
    assert diff['loss'] < TOL and diff['grad'] > 1e-6, diff
