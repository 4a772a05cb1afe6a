"""eval/lincls.py --protocol simsiam: SimSiam's LARS linear protocol (methods-modern.md §12.5) -- its
defaults, the LARC optimizer around SGD, one-line refusals, and a real run on the sample in which only
the fc moves."""
import json
import math

import pytest
import torch

from common import checkpoint, optim
from common.resnet import build_resnet
from conftest import refused
from eval import lincls


def protocol_args(*flags):
    argv = ['d', '--pretrained', 'x', '--protocol', 'simsiam', *flags]
    return lincls.resnet_protocol(argv, lincls.parse_args(argv), 'x')


def test_defaults_and_optimizer():
    """SS:main_lincls.py: batch 4096, lr 0.1 per 256 (1.6), wd 0, momentum 0.9, 90 epochs, cosine per
    epoch; LARC trust 0.001 (clip off) around SGD. Flags still win; without the protocol: plain SGD."""
    a = protocol_args()
    assert (a.protocol, a.epochs, a.lr, a.batch_size, a.wd, a.momentum, a.cos, a.schedule, a.nesterov) == \
        ('simsiam', 90, 0.1, 4096, 0.0, 0.9, True, [], False)
    assert protocol_args('--epochs', '5', '--lr', '0.02').epochs == 5 and protocol_args('--lr', '0.02').lr == 0.02
    lr = optim.scaled_lr(a.lr, a.batch_size)
    assert lr == pytest.approx(1.6)
    fc = torch.nn.Linear(4, 3)
    opt, text = lincls.build_optimizer(list(fc.parameters()), lr, a)
    assert isinstance(opt, optim.LARC) and text.startswith('LARC')
    (g,) = opt.param_groups
    assert (g['lr'], g['momentum'], g['weight_decay'], g['eta'], g['eps'], g['nesterov']) == (lr, 0.9, 0.0, 1e-3, 1e-8,
                                                                                            False)
    plain = lincls.parse_args(['d', '--pretrained', 'x'])
    opt, text = lincls.build_optimizer(list(fc.parameters()), 1.0, lincls.resnet_protocol([], plain, 'x'))
    assert type(opt) is torch.optim.SGD and text == 'SGD'


def test_refusals_one_line():
    with pytest.raises(SystemExit, match='drop --layers'):
        protocol_args('--layers', 'feat5')
    with pytest.raises(SystemExit, match='drop --nesterov'):
        protocol_args('--nesterov')
    argv = ['d', '--pretrained', 'x', '--protocol', 'simsiam']
    with pytest.raises(SystemExit, match='SimSiam\'s ResNet protocol; a ViT takes'):
        lincls.vit_protocol(argv, lincls.parse_args(argv), dict(method=None, arch='vit_small', depth=12))
    argv = ['d', '--pretrained', 'x', '--protocol', 'dino']
    with pytest.raises(SystemExit, match='--protocol: for ViT backbones'):
        lincls.resnet_protocol(argv, lincls.parse_args(argv), 'x')


def test_simsiam_protocol_runs_and_moves_only_fc(data64, tmp_path, capsys):
    """2 epochs (4 steps each) on real images: the protocol record names LARC, the LR per epoch is
    0.1 x 16/256 then half of it (cosine over 2 epochs); the backbone-unchanged check passes (weights
    and BN statistics, in main); the fc bias left its 0 init; LARC's momentum buffers exist for the 2
    fc tensors only."""
    torch.manual_seed(0)
    bb = tmp_path / 'backbone.pth'
    checkpoint.save_backbone(build_resnet('resnet10', width=8, cifar_stem=True), bb)
    out = tmp_path / 'lin'
    lincls.main([str(data64), '--pretrained', str(bb), '--protocol', 'simsiam', '--epochs', '2', '--batch-size', '16',
                 '--workers', '0', '--device', 'cpu', '--print-freq', '4', '--output-dir', str(out)])
    assert 'sanity check passed: backbone weights and BN statistics unchanged' in capsys.readouterr().out
    res = json.loads((out / 'backbone.pth.lincls.json').read_text())
    p = res['protocol']
    assert 'SimSiam' in p['protocol'] and p['optimizer'].startswith('LARC') and p['lr_schedule'].startswith('cosine')
    assert (p['lr'], p['wd'], p['momentum'], p['epochs'], p['trainable']) == (0.1, 0.0, 0.9, 2, 'fc.weight, fc.bias')
    recs = [json.loads(line) for line in open(out / 'lincls_log.jsonl')]
    lrs = [r['lr'] for r in recs if r['type'] == 'lincls']
    assert lrs == pytest.approx([0.1 * 16 / 256, 0.1 * 16 / 256 * 0.5 * (1 + math.cos(math.pi / 2))])
    state = torch.load(out / 'lincls_checkpoint.pth', weights_only=True)
    assert state['fc']['bias'].abs().max() > 0
    (g,) = state['optimizer']['param_groups']
    assert g['eta'] == 1e-3 and g['weight_decay'] == 0.0 and len(g['params']) == 2
    assert len(state['optimizer']['state']) == 2
    assert all('momentum_buffer' in s for s in state['optimizer']['state'].values())
    assert 0 <= res['top1'] <= 100


def test_resnet_without_protocol_is_unchanged():
    """No --protocol on a ResNet: the MoCo defaults, no refusal."""
    a = lincls.resnet_protocol([], lincls.parse_args(['d', '--pretrained', 'x']), 'x')
    assert (a.protocol, a.lr, a.epochs, a.schedule, a.cos) == (None, 30.0, 100, [60, 80], False)
    assert 'simsiam' in refused(lincls.vit_protocol, ['d', '--pretrained', 'x', '--protocol', 'simsiam'],
                                lincls.parse_args(['d', '--pretrained', 'x', '--protocol', 'simsiam']),
                                dict(method=None, arch='vit_small', depth=12))
