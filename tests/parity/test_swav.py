"""Parity of swav.py with facebookresearch/swav (commit 06b1b7c, methods-modern.md §14) in float64.

The reference is imported from $SSL_REFS/facebookresearch__swav (skipped without it): its model class
(src/resnet50.py ResNet with its Bottleneck, one block per stage instead of [3, 4, 6, 3], its stem
with ConstantPad2d(1) + padding 2, its projection head and prototypes) and main_swav.py's train()
and distributed_sinkhorn, which run the whole iteration: LR from the schedule array, prototype
normalisation, multi-resolution forward, queue rescoring / shift / fill, Sinkhorn, swapped loss,
backward, prototype-gradient cancel, LARC step. Our side runs swav.train_one_epoch with a stand-in
for common.run.Run. Both get the same weights (the reference loads ours: the same names without our
'backbone.' prefix), the same crops (2x32 + 2x16 px, batch 4, as tensors) and the same queue tensors
(zeros created at epoch 1 as main_swav.py:225-231 does). Three steps, one per epoch: prototypes
frozen in step 1 (--freeze-prototypes-niters 1), the queue (4 rows) created and filled in step 2 and
used, rescored against the current prototypes, in step 3; a warm-up step from --start-warmup and
then the cosine. Compared after every step: the loss, every raw gradient and every gradient as
LARC rewrote it (the count asserted: all 58 tensors, 57 in the frozen step), every parameter, the BN
running statistics, the SGD momentum buffers, the queue and the normalised prototypes the forward
saw. Negative controls (one step each): epsilon 0.06 instead of 0.05; the prototypes not renormalised.

Shims (the reference needs apex and CUDA; nothing of its code is changed):
  * `apex`, `apex.parallel`, `apex.parallel.LARC`: stub modules; LARC is ApexLARC below, written
    here from apex's LARC (clip=False path: adaptive lr eta ||w|| / (||g|| + wd ||w|| + eps), g <-
    (g + wd w) x that, inner SGD with wd 0), with a record of the raw gradients (our
    common.optim.LARC is therefore compared with an independent port, not with itself);
  * `pandas`: an empty stub module (src/logger.py imports it for PD_Stats, which train() never uses);
  * `torch.Tensor.cuda` returns the tensor itself while the reference runs (its ResNet.forward moves
    each resolution's batch with .cuda(non_blocking=True));
  * main_swav.args: a Namespace with the flags train() reads (main() is not run);
  * torch.distributed: a real 1-process gloo group (distributed_sinkhorn all-reduces), no shim;
  * model.module: the reference's model inside a plain nn.Module wrapper (it is DDP in main()).
"""
import argparse
import importlib
import math
import sys
import types
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn as nn

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))

import swav  # noqa: E402
from common import optim  # noqa: E402
from common.resnet import Bottleneck, ResNet  # noqa: E402

from .refs import checkout, import_isolated, one_process_group  # noqa: E402

REF = checkout('facebookresearch__swav', 'main_swav.py')

B, K, D, HIDDEN, EPOCHS = 4, 20, 16, 32, 3
LR = dict(base_lr=0.5, final_lr=0.05, warmup_epochs=1, start_warmup=0.1)
TOL = 1e-10


class ApexLARC:
    """apex.parallel.LARC.LARC around an optimizer (clip=False as SwAV uses it), written from apex's
    source semantics; records the raw gradients at each step."""

    def __init__(self, optimizer, trust_coefficient=0.02, clip=True, eps=1e-8):
        self.optim, self.trust_coefficient, self.clip, self.eps = optimizer, trust_coefficient, clip, eps
        self.raw = {}

    @property
    def param_groups(self):
        return self.optim.param_groups

    @property
    def state(self):
        return self.optim.state

    def zero_grad(self):
        self.optim.zero_grad()

    def step(self):
        self.raw = {p: p.grad.clone() for g in self.optim.param_groups for p in g['params'] if p.grad is not None}
        with torch.no_grad():
            decays = []
            for group in self.optim.param_groups:
                wd = group.get('weight_decay', 0)
                decays.append(wd)
                group['weight_decay'] = 0
                for p in group['params']:
                    if p.grad is None:
                        continue
                    w_norm, g_norm = torch.norm(p.data), torch.norm(p.grad.data)
                    if w_norm != 0 and g_norm != 0:
                        adaptive = self.trust_coefficient * w_norm / (g_norm + w_norm * wd + self.eps)
                        if self.clip:
                            adaptive = min(adaptive / group['lr'], 1)
                        p.grad.data += wd * p.data
                        p.grad.data *= adaptive
        self.optim.step()
        for group, wd in zip(self.optim.param_groups, decays):
            group['weight_decay'] = wd


class RecordingLARC(optim.LARC):
    """Our LARC, recording the raw gradients before it rewrites them."""
    raw = {}

    def step(self, closure=None):
        self.raw = {p: p.grad.clone() for g in self.param_groups for p in g['params'] if p.grad is not None}
        return super().step(closure)


@pytest.fixture(scope='module')
def ref():
    apex = types.ModuleType('apex')
    apex.parallel = types.ModuleType('apex.parallel')
    apex.parallel.LARC = types.ModuleType('apex.parallel.LARC')
    apex.parallel.LARC.LARC = ApexLARC
    stubs = {'apex': apex, 'apex.parallel': apex.parallel, 'apex.parallel.LARC': apex.parallel.LARC}
    if importlib.util.find_spec('pandas') is None:
        stubs['pandas'] = types.ModuleType('pandas')
    main, resnet = import_isolated(REF, ('main_swav', 'src.resnet50'), ('src', 'src.utils', 'src.logger',
                                                                     'src.multicropdataset'), stubs)
    cuda = torch.Tensor.cuda
    torch.Tensor.cuda = lambda self, *a, **k: self
    try:
        with one_process_group():
            yield types.SimpleNamespace(main=main, resnet=resnet)
    finally:
        torch.Tensor.cuda = cuda


class Wrap(nn.Module):
    """The reference's model where train() expects DDP: forward and .module."""

    def __init__(self, module):
        super().__init__()
        self.module = module

    def forward(self, x):
        return self.module(x)


class Meter:
    def __init__(self, seen):
        self.seen = seen

    def step(self, it, lr, **kw):
        self.seen.append(float(kw['loss'].detach()))

    def __getattr__(self, name):
        return lambda *a, **k: None


class FakeRun:
    def __init__(self):
        self.losses = []

    def train_meter(self, *a):
        return Meter(self.losses)

    def step_end(self, *a):
        return False


class Loader:
    """One batch per epoch, as a DataLoader of length 1."""

    def __init__(self, batch):
        self.batch = batch

    def __len__(self):
        return 1

    def __iter__(self):
        return iter([self.batch])


def crops(step):
    g = torch.Generator().manual_seed(100 + step)
    return [torch.randn(B, 3, 32, 32, generator=g, dtype=torch.float64) for _ in range(2)] + \
           [torch.randn(B, 3, 16, 16, generator=g, dtype=torch.float64) for _ in range(2)]


def ref_schedule():
    """main_swav.py:178-182 with one iteration per epoch."""
    warm = np.linspace(LR['start_warmup'], LR['base_lr'], 1 * LR['warmup_epochs'])
    n = 1 * (EPOCHS - LR['warmup_epochs'])
    cos = np.array([LR['final_lr'] + 0.5 * (LR['base_lr'] - LR['final_lr']) * (1 + math.cos(math.pi * t / n))
                    for t in np.arange(n)])
    return np.concatenate((warm, cos))


def run_both(ref, epsilon=0.05, normalize=True, steps=EPOCHS):
    """`steps` steps (one per epoch) on both sides; returns (max differences by kind, numbers of gradients compared)."""
    torch.manual_seed(0)
    ours = swav.SwAV(ResNet(Bottleneck, [1, 1, 1, 1], init='fan_out'), HIDDEN, D, K).double()
    theirs = ref.resnet.ResNet(ref.resnet.Bottleneck, [1, 1, 1, 1], normalize=True, hidden_mlp=HIDDEN, output_dim=D,
                               nmb_prototypes=K).double()
    theirs.load_state_dict({k.removeprefix('backbone.'): v for k, v in ours.state_dict().items()})
    if not normalize:
        ours.normalize_prototypes = lambda: None
    wrap = Wrap(theirs)
    ref.main.args = argparse.Namespace(crops_for_assign=[0, 1], nmb_crops=[2, 2], temperature=0.1, epsilon=0.05,
                                       sinkhorn_iterations=3, world_size=1, rank=0, freeze_prototypes_niters=1,
                                       use_fp16=False)
    args = types.SimpleNamespace(nmb_prototypes=K, batch_size=B, crops_for_assign=[0, 1], temperature=0.1,
                                 epsilon=epsilon, sinkhorn_iterations=3, freeze_prototypes_niters=1, amp='off')
    opt_r = ApexLARC(torch.optim.SGD(wrap.parameters(), lr=LR['base_lr'], momentum=0.9, weight_decay=1e-6),
                     trust_coefficient=0.001, clip=False)
    opt_o = RecordingLARC(ours.parameters(), LR['base_lr'], momentum=0.9, weight_decay=1e-6, eta=0.001)
    lrs_r = ref_schedule()
    lrs_o = swav.lr_schedule(LR['base_lr'], LR['final_lr'], EPOCHS, 1, LR['warmup_epochs'], LR['start_warmup'])
    seen_o, seen_r = [], []
    ours.register_forward_pre_hook(lambda m, i: seen_o.append(m.prototypes.weight.detach().clone()))
    theirs.register_forward_pre_hook(lambda m, i: seen_r.append(m.prototypes.weight.detach().clone()))
    names_o, names_r = dict(ours.named_parameters()), dict(theirs.named_parameters())
    bufs_o, bufs_r = dict(ours.named_buffers()), dict(theirs.named_buffers())
    q_o = q_r = None
    diff, counts, run = {}, [], FakeRun()

    def worst(kind, a, b):
        diff[kind] = max(diff.get(kind, 0.), (a - b).abs().max().item())

    for epoch in range(steps):
        if epoch >= 1 and q_o is None:  # --epoch-queue-starts 1, queue of 4 rows
            q_o = torch.zeros(2, B, D, dtype=torch.float64)
            q_r = torch.zeros(2, B, D, dtype=torch.float64)
        batch = crops(epoch)
        swav.train_one_epoch([(batch, None, None)], ours, ours, opt_o, torch.amp.GradScaler('cpu', enabled=False),
                             lrs_o, q_o, epoch, 0, 1, 4, args, torch.device('cpu'), run)
        (_, loss_r), q_r = ref.main.train(Loader([b.clone() for b in batch]), wrap, opt_r, epoch, lrs_r, q_r)
        diff['loss'] = max(diff.get('loss', 0.), abs(run.losses[-1] - loss_r))
        n = 0
        for name, p in names_o.items():
            pr = names_r[name.removeprefix('backbone.')]
            assert (p in opt_o.raw) == (pr in opt_r.raw), name
            if p in opt_o.raw:
                worst('raw grad', opt_o.raw[p], opt_r.raw[pr])
                worst('LARC grad', p.grad, pr.grad)
                worst('momentum', opt_o.state[p]['momentum_buffer'], opt_r.state[pr]['momentum_buffer'])
                n += 1
            worst('weight', p.detach(), pr.detach())
        for name, b in bufs_o.items():
            if b.is_floating_point():
                worst('BN buffer', b, bufs_r[name.removeprefix('backbone.')])
        worst('prototypes seen', seen_o[-1], seen_r[-1])
        if q_o is not None:
            worst('queue', q_o, q_r)
        counts.append(n)
    assert steps == 1 or (q_o is not None and not torch.all(q_o == 0))
    return diff, counts


def test_three_steps_match_the_reference(ref):
    diff, counts = run_both(ref)
    print('max differences:', {k: f'{v:.2e}' for k, v in diff.items()}, 'gradients compared per step:', counts)
    n_params = 4 * 9 + 4 * 3 + 3 + 6 + 1  # 4 blocks (3 convs, 3 BNs), 4 downsamples, stem, head, prototypes
    assert counts == [n_params - 1, n_params, n_params] and counts[0] > 0  # frozen prototypes in step 1
    assert set(diff) == {'loss', 'raw grad', 'LARC grad', 'momentum', 'weight', 'BN buffer', 'prototypes seen',
                         'queue'}
    for k, v in diff.items():
        assert v < TOL, (k, v)


@pytest.mark.parametrize('kw, kind', [(dict(epsilon=0.06), 'loss'), (dict(normalize=False), 'prototypes seen')])
def test_negative_controls(ref, kw, kind):
    diff, _ = run_both(ref, **kw, steps=1)  # both show in the first step
    assert diff[kind] > 1e-6, diff
