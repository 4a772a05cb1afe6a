"""eval/lincls.py --layers: the multi-head protocol (Goyal et al. 2019; OSS r50_multihead.py) — its
defaults, the heads (BN(affine=False) + Linear on fixed-pooled maps, summed losses, only the heads
learn, the heads' BN statistics move while the backbone's do not), the lighting augmentation, an
end-to-end run with resume on real images, and Sobel backbones in the single-fc mode."""
import json
from types import SimpleNamespace

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from conftest import REPO, make_subset, python
from common import augment
from common.features import feature_dims
from common.resnet import Sobel, SobelResNet, build_resnet
from eval import lincls

LINCLS = REPO / 'eval' / 'lincls.py'
CFG = dict(arch='resnet10', width=8, cifar_stem=True, in_channels=3)
ONE_THREAD = {'OMP_NUM_THREADS': '1'}  # on the shared, oversubscribed test cores 2 threads are ~100x slower


@pytest.fixture(autouse=True, scope='module')
def one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def tiny_sd(in_channels=3):
    torch.manual_seed(0)
    return build_resnet('resnet10', width=8, cifar_stem=True, in_channels=in_channels).state_dict()


def test_multihead_defaults_and_explicit_flags_win():
    moco = lincls.parse_args(['--pretrained', 'x.pth', 'data'])
    assert (moco.lr, moco.wd, moco.epochs, moco.schedule, moco.nesterov, moco.layers) == \
        (30.0, 0.0, 100, [60, 80], False, None)
    multi = lincls.parse_args(['--pretrained', 'x.pth', 'data', '--layers', 'stem', 'layer4', 'avgpool'])
    assert multi.layers == ['feat1', 'feat5', 'avgpool']
    assert (multi.lr, multi.wd, multi.epochs, multi.schedule, multi.nesterov, multi.momentum) == \
        (0.01, 1e-4, 90, [30, 60, 90], True, 0.9)
    mine = lincls.parse_args(['--pretrained', 'x.pth', 'data', '--layers', 'feat5', '--lr', '0.1', '--no-nesterov',
                              '--epochs', '3'])
    assert (mine.lr, mine.nesterov, mine.epochs, mine.wd) == (0.1, False, 3, 1e-4)


def test_multihead_model_structure():
    model = lincls.build_multihead_model(tiny_sd(), CFG, 10, ['feat1', 'feat3', 'avgpool'], 32)
    dims = feature_dims(model.backbone, ['feat1', 'feat3', 'avgpool'], 32)
    assert dims == dict(feat1=8 * 64, feat3=16 * 9, avgpool=64) and model.dims == dims
    for head, n, ch in zip(model.fc, ['feat1', 'feat3', 'avgpool'], [8, 16, 64]):
        bn, _, fc = head
        assert isinstance(bn, nn.BatchNorm2d) and not bn.affine and bn.num_features == ch and bn.momentum == 0.1
        assert (fc.in_features, fc.out_features) == (dims[n], 10)
        assert fc.bias.abs().sum() == 0 and 0.005 < fc.weight.std() < 0.015  # N(0, 0.01), bias 0
    assert model.train().backbone.training is False and model.fc.training  # backbone stays in eval mode
    out = model(torch.randn(4, 3, 32, 32))
    assert out.shape == (3, 4, 10)
    names = [n for n, p in model.named_parameters() if n.startswith('fc.')]
    assert names == [f'fc.{i}.2.{w}' for i in range(3) for w in ('weight', 'bias')]  # BN(affine=False): none


def test_multihead_training_step_sums_losses_and_moves_only_heads():
    sd = tiny_sd()
    model = lincls.build_multihead_model(sd, CFG, 10, ['feat2', 'feat5'], 32)
    for n, p in model.named_parameters():
        p.requires_grad = n.startswith('fc.')
    params = [p for p in model.parameters() if p.requires_grad]
    assert len(params) == 4
    torch.manual_seed(1)
    x, y = torch.randn(8, 3, 32, 32), torch.arange(8)
    with torch.no_grad():  # the loss train_one_epoch must report: sum of the heads' CE (batch-stat BN)
        want = sum(F.cross_entropy(o, y) for o in model.train()(x)).item()
    bn0 = model.fc[0][0].running_mean.clone()
    fc0 = model.fc[1][2].weight.detach().clone()
    cpu = torch.device('cpu')
    args = SimpleNamespace(epochs=1, schedule=[], print_freq=1)
    amp = dict(device_type='cpu', enabled=False)
    opt = torch.optim.SGD(params, 0.0, momentum=0.9)
    loss, _ = lincls.train_one_epoch([(x, y, y)], model.eval(), opt, torch.amp.GradScaler('cpu', enabled=False), 0, 1,
                                     0.0, args, cpu, amp, SimpleNamespace(print=lambda *a: None))
    assert loss == pytest.approx(want, rel=1e-5)
    assert model.fc.training and not model.backbone.training  # train_one_epoch trains the heads' BN
    opt = torch.optim.SGD(params, 0.1, momentum=0.9)
    lincls.train_one_epoch([(x, y, y)] * 2, model, opt, torch.amp.GradScaler('cpu', enabled=False), 0, 2, 0.1, args,
                           cpu, amp, SimpleNamespace(print=lambda *a: None))
    assert not torch.equal(model.fc[1][2].weight, fc0) and not torch.equal(model.fc[0][0].running_mean, bn0)
    lincls.check_backbone_unchanged(model.backbone, sd)  # weights and BN statistics bitwise unchanged


def test_goyal_augmentation_and_lighting():
    tf = augment.goyal_linear(224)
    names = [type(t).__name__ for t in tf.transforms]
    assert names == ['RandomResizedCrop', 'RandomHorizontalFlip', 'ColorJitter', 'ToTensor', 'Lighting', 'Normalize']
    jitter = tf.transforms[2]
    assert jitter.brightness == (0.6, 1.4) and jitter.saturation == (0.6, 1.4) and jitter.hue is None
    img = torch.rand(3, 4, 4)
    assert torch.equal(augment.Lighting(0.0)(img), img)
    torch.manual_seed(3)
    out = augment.Lighting(0.1)(img)
    torch.manual_seed(3)
    alpha = torch.randn(3) * 0.1
    vec, val = torch.tensor(augment.IMAGENET_EIGVEC), torch.tensor(augment.IMAGENET_EIGVAL)
    shift = sum(vec[:, j] * alpha[j] * val[j] for j in range(3))  # eigvec @ (alpha * eigval), per channel
    assert torch.allclose(out - img, shift.view(3, 1, 1).expand(3, 4, 4), atol=1e-6)


@pytest.fixture(scope='module')
def data(tmp_path_factory):
    return make_subset(tmp_path_factory.mktemp('data_mh'), 10, 5)


def test_multihead_end_to_end_and_resume(data, tmp_path):
    model = {'encoder_q.' + k: v for k, v in tiny_sd().items()}
    torch.save({'model': model, 'backbone_prefix': 'encoder_q.', 'args': {}}, tmp_path / 'ckpt.pth')
    common = ['--pretrained', tmp_path / 'ckpt.pth', data, '--layers', 'stem', 'layer2', 'layer4', 'avgpool',
              '--batch-size', '50', '--workers', '0', '--device', 'cpu', '--output-dir', tmp_path / 'out']
    python(LINCLS, *common, '--epochs', '1', env=ONE_THREAD)
    p = python(LINCLS, *common, '--epochs', '2', '--resume', 'auto', env=ONE_THREAD)
    assert 'resumed from' in p.stdout and 'sanity check passed' in p.stdout and 'epoch 0:' not in p.stdout
    res = json.loads((tmp_path / 'out' / 'ckpt.pth.lincls.json').read_text())
    layers = ['feat1', 'feat3', 'feat5', 'avgpool']
    assert list(res['layers']) == layers and set(res['best']) == set(layers)
    for n in layers:
        assert 0 <= res['layers'][n]['top1'] <= res['layers'][n]['top5'] <= 100
        assert res['last'][n]['epoch'] == 1 and res['best'][n]['top1'] >= res['last'][n]['top1']
    pr = res['protocol']
    assert 'multi-head' in pr['protocol'] and pr['layers'] == layers
    assert pr['feat_dims'] == dict(feat1=512, feat3=144, feat5=256, avgpool=64)
    assert (pr['lr'], pr['wd'], pr['nesterov'], pr['schedule'], pr['epochs']) == (0.01, 1e-4, True, [30, 60, 90], 2)
    assert 'RandomCrop' in pr['train_aug']  # 32-px data: the padded-crop recipe, not RandomResizedCrop
    fc = torch.load(tmp_path / 'out' / 'lincls_checkpoint.pth', weights_only=True)['fc']
    assert {'0.0.running_mean', '0.2.weight', '3.2.bias'} <= set(fc)
    recs = [json.loads(line) for line in open(tmp_path / 'out' / 'lincls_log.jsonl')]
    val = [r for r in recs if r['type'] == 'lincls']
    assert [r['epoch'] for r in val] == [0, 1] and set(val[1]['val_top1']) == set(layers)


def test_single_fc_mode_with_a_sobel_backbone(tmp_path):
    sd = tiny_sd(in_channels=2)
    cfg = dict(CFG, in_channels=2)
    model = lincls.build_linear_model(sd, cfg, 10)
    assert isinstance(model, SobelResNet) and model.fc.out_features == 10
    ref = build_resnet('resnet10', 10, width=8, cifar_stem=True, in_channels=2)
    ref.load_state_dict(model.state_dict())
    x = torch.randn(2, 3, 32, 32)
    assert torch.allclose(model.eval()(x), ref.eval()(Sobel()(x)), atol=1e-6)
    mh = lincls.build_multihead_model(sd, cfg, 10, ['feat5'], 32)
    assert isinstance(mh.backbone, SobelResNet) and mh(x).shape == (1, 2, 10)
    # the checkpoint's args and its conv1 must agree
    model = {'backbone.' + k: v for k, v in tiny_sd().items()}
    torch.save({'model': model, 'backbone_prefix': 'backbone.', 'args': {'sobel': True}}, tmp_path / 'bad.pth')
    with pytest.raises(SystemExit, match='Sobel'):
        lincls.backbone_weights(tmp_path / 'bad.pth')
