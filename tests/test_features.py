"""common/features.py, the Sobel front end (common/resnet.py) and eval/extract.py: Sobel by hand,
the fixed multi-layer pooling (grids, dims, values by hand), loading any checkpoint with or without
Sobel, and extract.py end to end on real images, on 1 and on 2 processes (torchrun, gloo)."""
import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torchvision.models.resnet import BasicBlock

from conftest import REPO, SAMPLE, make_subset, python, torchrun
from common import augment
from common.data import build_dataset
from common.features import (MULTI_POOL, StagePool, extract_all, feature_dims, layer_name, load_eval_backbone,
                             sobel_flag, stage_feature_fn)
from common.resnet import Sobel, SobelResNet, build_resnet, build_resnet_sobel

EXTRACT = REPO / 'eval' / 'extract.py'
ONE_THREAD = {'OMP_NUM_THREADS': '1'}  # on the shared, oversubscribed test cores 2 threads are ~100x slower


@pytest.fixture(autouse=True, scope='module')
def one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def tiny_sd(in_channels=3, num_classes=0, seed=0):
    torch.manual_seed(seed)
    return build_resnet('resnet10', num_classes, width=8, cifar_stem=True, in_channels=in_channels).state_dict()


# ============ Sobel ============

def test_sobel_by_hand():
    s = Sobel()
    assert list(s.parameters()) == [] and s.state_dict() == {}  # fixed, nothing to learn or save
    w = torch.arange(8.0)
    x = torch.zeros(1, 3, 8, 8)
    x[0, 0] = 3 * w  # R = 3w, G = B = 0: the 1/3 average is the ramp w
    out = s(x)
    assert out.shape == (1, 2, 8, 8)
    inner = (slice(None), slice(1, -1), slice(1, -1))
    # x-filter [[1,0,-1],[2,0,-2],[1,0,-1]] as a cross-correlation: 4(w-1) - 4(w+1) = -8
    assert torch.allclose(out[0, 0][inner[1:]], torch.full((6, 6), -8.0))
    assert torch.allclose(out[0, 1][inner[1:]], torch.zeros(6, 6))  # no vertical change
    y = x.transpose(2, 3)  # the ramp along the height: the y-filter answers, the x-filter does not
    assert torch.allclose(s(y)[0, 1][inner[1:]], torch.full((6, 6), -8.0))
    assert torch.allclose(s(y)[0, 0][inner[1:]], torch.zeros(6, 6))
    assert torch.allclose(s(torch.ones(1, 3, 8, 8))[:, :, 1:-1, 1:-1], torch.zeros(1, 2, 6, 6))


def test_sobel_resnet_is_a_2_channel_resnet_behind_sobel():
    sd = tiny_sd(in_channels=2)
    sob = build_resnet_sobel('resnet10', width=8, cifar_stem=True)
    assert isinstance(sob, SobelResNet) and set(sob.state_dict()) == set(sd)
    sob.load_state_dict(sd)
    plain = build_resnet('resnet10', width=8, cifar_stem=True, in_channels=2)
    plain.load_state_dict(sd)
    x = torch.randn(2, 3, 32, 32)
    sob.eval(), plain.eval()
    assert torch.allclose(sob(x), plain(Sobel()(x)), atol=1e-6)
    for a, b in zip(sob.forward_stages(x), plain.forward_stages(Sobel()(x))):
        assert torch.allclose(a, b, atol=1e-6)
    with pytest.raises(ValueError, match='in_channels=2'):
        SobelResNet(BasicBlock, [1, 1, 1, 1], 0, 8, True, 3)  # a 3-channel conv1 behind Sobel


# ============ loading ============

def test_load_eval_backbone_sobel_checkpoint(tmp_path):
    """A DeepCluster-style checkpoint: backbone under 'backbone.', a head, args sobel=True."""
    sd = tiny_sd(in_channels=2)
    model = {'backbone.' + k: v for k, v in sd.items()}
    model['head.fc.weight'] = torch.zeros(10, 64)
    torch.save({'model': model, 'backbone_prefix': 'backbone.', 'args': {'sobel': True}}, tmp_path / 'dc.pth')
    net, got, cfg, args = load_eval_backbone(tmp_path / 'dc.pth')
    assert isinstance(net, SobelResNet) and cfg['in_channels'] == 2 and args['sobel']
    assert set(got) == set(sd)
    ref = build_resnet('resnet10', width=8, cifar_stem=True, in_channels=2)
    ref.load_state_dict(sd)
    x = torch.randn(2, 3, 32, 32)
    assert torch.allclose(net.eval()(x), ref.eval()(Sobel()(x)), atol=1e-6)
    # a 2-channel state dict without args is Sobel input too; a 3-channel one is not
    torch.save(sd, tmp_path / 'plain2.pth')
    assert isinstance(load_eval_backbone(tmp_path / 'plain2.pth')[0], SobelResNet)
    torch.save(tiny_sd(), tmp_path / 'plain3.pth')
    assert not isinstance(load_eval_backbone(tmp_path / 'plain3.pth')[0], SobelResNet)


def test_sobel_flag_refuses_contradictions(tmp_path):
    cfg3 = dict(arch='resnet10', width=8, cifar_stem=True, in_channels=3)
    cfg2 = dict(cfg3, in_channels=2)
    assert sobel_flag(cfg2, {}) and sobel_flag(cfg2, {'sobel': True}) and not sobel_flag(cfg3, None)
    with pytest.raises(ValueError, match='Sobel'):
        sobel_flag(cfg3, {'sobel': True})
    with pytest.raises(ValueError, match='sobel=False'):
        sobel_flag(cfg2, {'sobel': False})
    model = {'backbone.' + k: v for k, v in tiny_sd().items()}
    torch.save({'model': model, 'backbone_prefix': 'backbone.', 'args': {'sobel': True}}, tmp_path / 'bad.pth')
    with pytest.raises(ValueError, match='Sobel'):
        load_eval_backbone(tmp_path / 'bad.pth')


# ============ pooling ============

def test_layer_names():
    assert [layer_name(s) for s in ('stem', 'layer1', 'layer4', 'feat3', 'avgpool')] == \
        ['feat1', 'feat2', 'feat5', 'feat3', 'avgpool']
    with pytest.raises(Exception, match='unknown layer'):
        layer_name('layer5')


def test_multi_pooling_resnet50_224_matches_the_benchmark():
    """OSS multi_pooling.py: grids 12, 6, 4, 3, 2 and 9216/9216/8192/9216/8192 dims for a ResNet-50."""
    layers = ['feat1', 'feat2', 'feat3', 'feat4', 'feat5', 'avgpool']
    r50 = build_resnet('resnet50')
    assert feature_dims(r50, layers, 224) == dict(feat1=9216, feat2=9216, feat3=8192, feat4=9216, feat5=8192,
                                                  avgpool=2048)
    assert feature_dims(r50, layers, 224, pool='avg') == dict(feat1=64, feat2=256, feat3=512, feat4=1024,
                                                              feat5=2048, avgpool=2048)
    small = build_resnet('resnet50', width=4).eval()  # same map sizes, 16x fewer channels
    with torch.no_grad():
        out = StagePool(layers, 224)(small.forward_stages(torch.randn(1, 3, 224, 224)))
    assert [tuple(o.shape[1:]) for o in out] == [(4, 12, 12), (16, 6, 6), (32, 4, 4), (64, 3, 3), (128, 2, 2),
                                                 (128, 1, 1)]


def test_multi_pooling_cifar_32():
    m = build_resnet('resnet50', cifar_stem=True)
    assert feature_dims(m, ['feat1', 'feat2', 'feat3', 'feat4', 'feat5'], 32) == \
        dict(feat1=4096, feat2=4096, feat3=4608, feat4=4096, feat5=8192)
    tiny = build_resnet('resnet10', width=8, cifar_stem=True).eval()
    with torch.no_grad():
        out = StagePool(['feat1', 'feat2', 'feat3', 'feat4', 'feat5'], 32)(tiny.forward_stages(torch.randn(2, 3, 32, 32)))
    assert [o.shape[-1] for o in out] == [8, 4, 3, 2, 2]


def test_pooling_values_by_hand():
    x = torch.randn(1, 2, 112, 112)  # stem map at 224 px: kernel 10, stride 10, padding 4
    maps = [x, None, None, None, torch.randn(1, 3, 7, 7)]
    f1, f5 = StagePool(['feat1', 'feat5'], 224)(maps)
    # padded zeros count: the corner window covers rows/cols -4..5, i.e. real 0..5, divided by 100
    assert torch.allclose(f1[0, :, 0, 0], x[0, :, :6, :6].sum((1, 2)) / 100, atol=1e-6)
    assert torch.allclose(f1[0, :, 1, 2], x[0, :, 6:16, 16:26].mean((1, 2)), atol=1e-6)
    # layer4: kernel 6, stride 1 on 7x7 -> 2x2 overlapping windows
    assert torch.allclose(f5[0, :, 1, 0], maps[4][0, :, 1:7, 0:6].mean((1, 2)), atol=1e-6)
    g, = StagePool(['feat5'], 224, pool='avg')(maps)
    assert torch.allclose(g.flatten(), maps[4].mean((2, 3)).flatten(), atol=1e-6)
    with pytest.raises(ValueError, match='expects a 7x7 map'):
        StagePool(['feat5'], 224)([None] * 4 + [torch.randn(1, 3, 4, 4)])
    with pytest.raises(ValueError, match='--pool avg'):
        StagePool(['feat5'], 96)
    StagePool(['avgpool'], 96)  # global pooling works at any size
    assert set(MULTI_POOL) == {224, 32}


# ============ extraction ============

@pytest.fixture(scope='module')
def data(tmp_path_factory):
    return make_subset(tmp_path_factory.mktemp('data_extract'), 0, 3)  # 30 val images


def test_extract_all_matches_direct_computation(data, tmp_path):
    torch.save(tiny_sd(num_classes=5), tmp_path / 'bb.pth')
    model, _, _, _ = load_eval_backbone(tmp_path / 'bb.pth')
    model.eval()
    ds = build_dataset(data, augment.eval_transform(32), 'val')
    pool = StagePool(['feat1', 'feat5', 'avgpool'], 32)
    feats, labels = extract_all(stage_feature_fn(model, pool), ds, batch_size=7, workers=0)
    assert labels.tolist() == [i // 3 for i in range(30)]
    x = torch.stack([ds[i][0] for i in (0, 13, 29)])
    with torch.no_grad():
        st = model.forward_stages(x)
        want = dict(feat1=F.avg_pool2d(st[0], 4, 4).flatten(1), feat5=F.avg_pool2d(st[4], 3, 1).flatten(1),
                    avgpool=model.pooled(x))
    for k, v in want.items():
        assert feats[k].shape == (30, v.shape[1])
        assert np.allclose(feats[k][[0, 13, 29]], v.numpy(), atol=1e-5)


def test_extract_script_one_and_two_processes(data, tmp_path):
    """extract.py on a 31-image list (uneven shares over 2 processes): the same rows, in dataset
    order, with 1 process and with 2 (torchrun, gloo); labels and file order written too."""
    files = sorted((data / 'val').glob('*/*.jpg'))[:30] + [SAMPLE / 'train' / 'cat' / '0000.jpg']
    lst = tmp_path / 'list.txt'
    lst.write_text(''.join(f'{f} {i % 4}\n' for i, f in enumerate(files)))
    model = {'encoder_q.' + k: v for k, v in tiny_sd(num_classes=16).items()}
    torch.save({'model': model, 'backbone_prefix': 'encoder_q.', 'args': {}}, tmp_path / 'ckpt.pth')
    common = ['--pretrained', tmp_path / 'ckpt.pth', lst, '--layers', 'stem', 'layer4', 'avgpool', '-b', '4',
              '--workers', '0', '--device', 'cpu']
    p = python(EXTRACT, *common, '--output-dir', tmp_path / 'one', env=ONE_THREAD)
    assert 'written to' in p.stdout
    torchrun(2, EXTRACT, *common, '--output-dir', tmp_path / 'two')
    meta = json.loads((tmp_path / 'one' / 'train_meta.json').read_text())
    assert meta['layers'] == ['feat1', 'feat5', 'avgpool'] and meta['dims'] == dict(feat1=512, feat5=256, avgpool=64)
    assert meta['images'] == 31 and meta['pool'] == 'multi' and meta['crop_size'] == 32
    for n, d in meta['dims'].items():
        one, two = np.load(tmp_path / 'one' / f'train_{n}.npy'), np.load(tmp_path / 'two' / f'train_{n}.npy')
        assert one.shape == (31, d) and np.abs(one).sum(1).min() > 0  # every row written
        assert np.allclose(one, two, atol=1e-5)
    assert np.load(tmp_path / 'two' / 'train_labels.npy').tolist() == [i % 4 for i in range(31)]
    assert (tmp_path / 'two' / 'train_files.txt').read_text().split() == [str(f) for f in files]
    # the same rows as the in-process extraction
    net, _, _, _ = load_eval_backbone(tmp_path / 'ckpt.pth')
    ds = build_dataset(lst, augment.eval_transform(32))
    feats, _ = extract_all(stage_feature_fn(net.eval(), StagePool(['avgpool'], 32)), ds, 8, 0)
    assert np.allclose(feats['avgpool'], np.load(tmp_path / 'one' / 'train_avgpool.npy'), atol=1e-5)


def test_extract_script_refuses_fixed_pooling_at_other_sizes(data, tmp_path):
    torch.save(tiny_sd(), tmp_path / 'bb.pth')
    p = python(EXTRACT, '--pretrained', tmp_path / 'bb.pth', data, '--split', 'val', '--crop-size', '40',
               '--workers', '0', '--device', 'cpu', check=False, env=ONE_THREAD)
    assert p.returncode != 0 and '--pool avg' in p.stderr and 'Traceback' not in p.stderr
