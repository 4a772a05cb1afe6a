"""Parity of barlowtwins.py with the official facebookresearch/barlowtwins code (8e8d284,
methods-modern.md §13).

The checkout is $SSL_REFS/facebookresearch__barlowtwins (the module is skipped without it). Its
main.py's BarlowTwins (backbone, projector, loss BN and loss in forward), LARS (with
exclude_bias_and_norm and both filters on, as main_worker builds it) and adjust_learning_rate run next
to ours in float64 for 3 steps, from the same weights and on the same inputs (the forward has no
randomness); the loss, every gradient, every parameter and BN buffer after each step, and every LARS
momentum buffer are compared. The 3 steps are steps 9, 10 and 11 of a 12-epoch run of 1 iteration per
epoch: the last warm-up step, the start of the cosine and its middle.

Shims, all in this file:
  * main.py is loaded by file path under another name (it only builds its argparse parser at import);
  * `torchvision.models.resnet50` is, while the reference model is built, a torchvision ResNet of
    Bottleneck blocks [1, 1, 1, 1] (resnet50's names and its 2048-d feature, which the reference's
    projector assumes, at a fraction of the cost); ours is common.resnet.ResNet of the same blocks;
  * an argparse namespace stands for its parsed flags (projector, lambd, batch_size, epochs and the
    two learning rates), a list of length 1 for its loader in adjust_learning_rate;
  * a 1-process gloo group stands for its 16-GPU NCCL group (its forward calls
    torch.distributed.all_reduce; ours then takes its distributed path too).
Not compared: the running statistics of the reference's loss BN (`bn.*`), which it updates but never
reads; ours keeps none. The two LRs are 25x the reference's defaults (5.0 and 0.12, as the flags
allow) and the weight decay 1e-3, so that 3 steps move the weights well above float64 rounding.
"""
import argparse

import pytest
import torch
import torchvision
from torchvision.models.resnet import Bottleneck

import barlowtwins as bt
from common import optim
from common.resnet import ResNet

from .refs import checkout, load, one_process_group, rel

REF = checkout('facebookresearch__barlowtwins', 'main.py')

TOL = 1e-9  # on differences divided by the largest magnitude of their tensor (when above 1)
LR_W, LR_B, WD = 5.0, 0.12, 1e-3


M = load('bt_reference_main', REF / 'main.py')


@pytest.fixture(scope='module', autouse=True)
def process_group():
    """The reference all-reduces C over torch.distributed: one gloo process."""
    with one_process_group():
        yield


def small_resnet50(**kw):
    return torchvision.models.resnet.ResNet(Bottleneck, [1, 1, 1, 1], **kw)


def pair(monkeypatch, batch):
    ref_args = argparse.Namespace(projector='64-64-32', lambd=0.0051, batch_size=batch, epochs=12,
                                  learning_rate_weights=LR_W, learning_rate_biases=LR_B)
    monkeypatch.setattr(torchvision.models, 'resnet50', small_resnet50)
    torch.manual_seed(0)
    ref = M.BarlowTwins(ref_args)
    monkeypatch.undo()
    ours = bt.BarlowTwins(ResNet(Bottleneck, [1, 1, 1, 1], init='fan_out', zero_init_residual=True),
                          [64, 64, 32], lambd=0.0051)
    sd = {k: v for k, v in ref.state_dict().items() if not k.startswith('bn.')}
    ours.load_state_dict(sd)  # strict: every one of our keys
    return ref.double(), ours.double(), ref_args


def reference_optimizer(ref):
    """As M.main_worker: groups by ndim, LARS with both filters."""
    weights = [p for p in ref.parameters() if p.ndim != 1]
    biases = [p for p in ref.parameters() if p.ndim == 1]
    return M.LARS([{'params': weights}, {'params': biases}], lr=0, weight_decay=WD, weight_decay_filter=True,
                  lars_adaptation_filter=True)


def compare(monkeypatch, lambd=None, lr_b=LR_B, batch=8, steps=3):
    """Runs both for `steps` steps; returns the max relative differences per kind and the number of
    gradients compared. lambd / lr_b perturb our side (negative controls)."""
    ref, ours, ref_args = pair(monkeypatch, batch)
    if lambd is not None:
        ours.lambd = lambd
    ropt = reference_optimizer(ref)
    oopt = optim.FairLARS(bt.param_groups(ours, LR_W, lr_b), 0.0, weight_decay=WD)
    ref_names = {id(p): n for n, p in ref.named_parameters()}
    our_params = dict(ours.named_parameters())
    assert set(our_params) == set(ref_names.values())
    for g, h in zip(ropt.param_groups, oopt.param_groups):  # the same split, and FairLARS's exemption is theirs
        assert [ref_names[id(p)] for p in g['params']] == [n for n, q in our_params.items()
                                                           if any(q is r for r in h['params'])]
        assert all(ropt.exclude_bias_and_norm(p) == (p.ndim <= 1) for p in g['params'])
    gen = torch.Generator().manual_seed(1)
    diff = dict(loss=0., grad=0., state=0., mu=0., lr=0.)
    n_grads = 0
    ref.train(), ours.train()
    loader = [None]  # 1 iteration per epoch
    for step in range(9, 9 + steps):
        M.adjust_learning_rate(ref_args, ropt, loader, step)
        optim.set_lr(oopt, bt.lr_at(step, len(loader), ref_args.epochs, 10, batch))
        diff['lr'] = max(diff['lr'], *(abs(g['lr'] - h['lr']) for g, h in zip(ropt.param_groups, oopt.param_groups)))
        y1, y2 = (torch.randn(batch, 3, 16, 16, generator=gen, dtype=torch.float64) for _ in range(2))
        loss_ref = ref(y1, y2)
        loss = ours(y1, y2)
        diff['loss'] = max(diff['loss'], rel(loss_ref.detach(), loss.detach()))
        ropt.zero_grad(), oopt.zero_grad()
        loss_ref.backward()
        loss.backward()
        for p in ref.parameters():
            q = our_params[ref_names[id(p)]]
            assert p.grad is not None and q.grad is not None, ref_names[id(p)]
            diff['grad'] = max(diff['grad'], rel(p.grad, q.grad))
            n_grads += 1
        ropt.step(), oopt.step()
        ours_sd = ours.state_dict()
        for k, v in ref.state_dict().items():  # parameters and BN buffers (backbone, projector)
            if not k.startswith('bn.'):
                diff['state'] = max(diff['state'], rel(v, ours_sd[k]))
        for p in ref.parameters():
            diff['mu'] = max(diff['mu'], rel(ropt.state[p]['mu'], oopt.state[our_params[ref_names[id(p)]]]['mu']))
    return diff, n_grads, len(our_params)


def test_parity_three_steps(monkeypatch):
    diff, n, n_params = compare(monkeypatch)
    print(f'max relative differences over 3 steps {diff}, {n} gradients compared')
    assert n == 3 * n_params and n > 0
    assert all(v < TOL for v in diff.values()), diff


def test_negative_controls(monkeypatch):
    """The comparison can fail: lambda 0.0052 instead of 0.0051 changes the loss and every gradient;
    a bias LR 1% off changes the updated biases / BN parameters (not the loss of step 1)."""
    diff, _, _ = compare(monkeypatch, lambd=0.0052, steps=1)
    assert diff['loss'] > 1e-6 and diff['grad'] > 1e-6, diff
    diff, _, _ = compare(monkeypatch, lr_b=LR_B * 1.01, steps=1)
    assert diff['loss'] < TOL and diff['lr'] > 1e-6 and diff['state'] > 1e-8, diff
