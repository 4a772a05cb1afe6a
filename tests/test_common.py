"""common/: ResNet builder, schedules, parameter groups, datasets and sampler, checkpoints."""
import math

import pytest
import torch
import torchvision

from common import augment, checkpoint, dist, optim
from common.data import EpochSampler, build_dataset, scan
from common.resnet import build_resnet, infer_resnet_config
from conftest import SAMPLE


def test_resnet50_matches_torchvision_names_and_shapes():
    ours = build_resnet('resnet50', num_classes=1000).state_dict()
    tv = torchvision.models.resnet50().state_dict()
    assert {k: v.shape for k, v in ours.items()} == {k: v.shape for k, v in tv.items()}
    # and the same function: torchvision weights in our module give torchvision's output
    m_ours, m_tv = build_resnet('resnet18', num_classes=10).eval(), torchvision.models.resnet18(num_classes=10).eval()
    m_ours.load_state_dict(m_tv.state_dict())
    x = torch.randn(2, 3, 64, 64)
    assert torch.allclose(m_ours(x), m_tv(x), atol=1e-5)


@pytest.mark.parametrize('arch, width, cifar, cin', [('resnet10', 8, True, 3), ('resnet18', 16, False, 3),
                                                     ('resnet50', 8, False, 2), ('resnet34', 4, True, 3)])
def test_infer_resnet_config(arch, width, cifar, cin):
    sd = build_resnet(arch, width=width, cifar_stem=cifar, in_channels=cin).state_dict()
    assert infer_resnet_config(sd) == dict(arch=arch, width=width, cifar_stem=cifar, in_channels=cin)


def test_cifar_stem_keeps_resolution():
    m = build_resnet('resnet10', width=8, cifar_stem=True)
    stages = m.forward_stages(torch.randn(1, 3, 32, 32))
    assert [tuple(s.shape[1:]) for s in stages] == [(8, 32, 32), (8, 32, 32), (16, 16, 16), (32, 8, 8), (64, 4, 4)]
    assert m.feat_dim == 64 and m(torch.randn(2, 3, 32, 32)).shape == (2, 64)


def test_lr_schedules_by_hand():
    # step: x0.1 at 120 and 160 (MoCo v1), evaluated per epoch
    assert optim.lr_at(0.03, 119, 5, 10, 200, milestones=[120, 160]) == pytest.approx(0.03)
    assert optim.lr_at(0.03, 120, 0, 10, 200, milestones=[120, 160]) == pytest.approx(0.003)
    assert optim.lr_at(0.03, 199, 9, 10, 200, milestones=[120, 160]) == pytest.approx(0.0003)
    # cosine per epoch: 0.5 * lr * (1 + cos(pi * e / E)); e = E/2 -> half
    assert optim.lr_at(0.06, 100, 7, 10, 200, cos=True) == pytest.approx(0.03)
    assert optim.lr_at(0.06, 50, 0, 10, 200, cos=True) == pytest.approx(0.03 * (1 + math.cos(math.pi / 4)))
    # warm-up per iteration over 2 epochs of 10 iterations from ratio 0.1: at iteration 5 of 20,
    # lr * (1 - (1 - 5/20)(1 - 0.1)) = lr * 0.325
    assert optim.lr_at(1.0, 0, 5, 10, 100, warmup_epochs=2, warmup_ratio=0.1) == pytest.approx(0.325)
    assert optim.lr_at(1.0, 2, 0, 10, 100, warmup_epochs=2, warmup_ratio=0.1) == pytest.approx(1.0)
    assert optim.scaled_lr(0.03, 1024) == pytest.approx(0.12)


def test_param_groups_regex():
    rules = [optim.parse_param_group(r'(bn\d*|downsample\.1)\.(weight|bias):weight_decay=0,lars_exclude=true'),
             optim.parse_param_group(r'fc\.:lr_mult=10,momentum=0')]
    m = build_resnet('resnet10', num_classes=3, width=4)
    lines = []
    groups = optim.param_groups(m, rules, lines.append)
    by_opts = {tuple(sorted((k, v) for k, v in g.items() if k != 'params')): len(g['params']) for g in groups}
    n_bn = sum(1 for n, _ in m.named_parameters() if 'bn' in n or 'downsample.1' in n)
    assert by_opts == {(('lars_exclude', True), ('weight_decay', 0.0)): n_bn,
                       (('lr_mult', 10.0), ('momentum', 0.0)): 2,
                       (): sum(1 for _ in m.parameters()) - n_bn - 2}
    assert len(lines) == 3
    opt = torch.optim.SGD(groups, lr=1.0, momentum=0.9)
    optim.set_lr(opt, 0.5)
    assert sorted(g['lr'] for g in opt.param_groups) == [0.5, 0.5, 5.0]
    with pytest.raises(ValueError, match='unknown option'):
        optim.parse_param_group('bn:decay=0')
    with pytest.raises(ValueError, match='expected REGEX'):
        optim.parse_param_group('no-options')


def test_scan_layouts(tmp_path):
    samples, classes = scan(SAMPLE)  # ImageNet layout: ROOT -> ROOT/train
    assert len(samples) == 5000 and classes[0] == 'airplane' and samples[-1][1] == 9
    assert len(scan(SAMPLE, 'val')[0]) == 1000
    flat = tmp_path / 'flat'
    flat.mkdir()
    for f in sorted((SAMPLE / 'train' / 'cat').iterdir())[:5]:
        (flat / f.name).write_bytes(f.read_bytes())
    samples, classes = scan(flat)
    assert len(samples) == 5 and classes == [] and {l for _, l in samples} == {-1}
    lst = tmp_path / 'list.txt'
    lst.write_text('# comment\nflat/0000.jpg 3\nflat/0001.jpg 1\n\n')
    samples, classes = scan(lst)
    assert samples == [(str(flat / '0000.jpg'), 3), (str(flat / '0001.jpg'), 1)] and len(classes) == 4
    lst.write_text('flat/0000.jpg\n')
    assert scan(lst)[0] == [(str(flat / '0000.jpg'), -1)]
    lst.write_text('flat/0000.jpg cat\n')
    with pytest.raises(ValueError, match='list.txt:1'):
        scan(lst)


def test_epoch_sampler_shards_and_resume():
    full = list(EpochSampler(50, 8, seed=3))
    assert len(full) == 48 and len({i for i, _ in full}) == 48  # drop-last: 6 batches of 8
    r0, r1 = EpochSampler(50, 8, 0, 2, seed=3), EpochSampler(50, 8, 1, 2, seed=3)
    a, b = list(r0), list(r1)
    for it in range(6):  # global batch `it` = the same 8 samples at world size 1 and 2
        assert sorted(a[it * 4:(it + 1) * 4] + b[it * 4:(it + 1) * 4]) == sorted(full[it * 8:(it + 1) * 8])
    s = EpochSampler(50, 8, seed=3)
    s.set_epoch(0, start_iter=2)
    assert list(s) == full[16:] and len(s) == 32
    s.set_epoch(1)
    assert [i for i, _ in s] != [i for i, _ in full] and all(e == 1 for _, e in s)


def test_augmentation_is_seeded_per_sample():
    ds = build_dataset(SAMPLE, augment.MultiView(augment.moco_v2(32), augment.moco_v2(32)), seed=7)
    torch.manual_seed(0)
    a = ds[(3, 1)][0]
    torch.manual_seed(123)  # the caller's RNG does not matter ...
    state = torch.get_rng_state()
    b = ds[(3, 1)][0]
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    assert torch.equal(torch.get_rng_state(), state)  # ... and is left untouched
    assert not torch.equal(a[0], a[1])  # two independent views
    assert not torch.equal(ds[(3, 2)][0][0], a[0])  # another epoch, another view


def test_save_atomic_keeps_old_file_on_failure(tmp_path):
    p = tmp_path / 'c.pth'
    checkpoint.save_atomic({'x': torch.ones(2)}, p)
    with pytest.raises(Exception):
        checkpoint.save_atomic({'x': lambda: 0}, p)  # cannot be pickled: fails mid-save
    assert torch.equal(torch.load(p, weights_only=True)['x'], torch.ones(2))


def test_backbone_state_dict_sources():
    tv = torchvision.models.resnet18().state_dict()
    assert set(checkpoint.backbone_state_dict(tv)) == {k for k in tv if not k.startswith('fc.')}
    ours = {'model': {'encoder_q.' + k: v for k, v in tv.items()} | {'queue': torch.zeros(1)},
            'backbone_prefix': 'encoder_q.'}
    assert set(checkpoint.backbone_state_dict(ours)) == {k for k in tv if not k.startswith('fc.')}
    official = {'state_dict': {'module.encoder_q.' + k: v for k, v in tv.items()}}
    assert set(checkpoint.backbone_state_dict(official)) == {k for k in tv if not k.startswith('fc.')}
    with pytest.raises(ValueError, match='head.weight'):
        checkpoint.backbone_state_dict(tv | {'head.weight': torch.zeros(1)})


def test_gathers_are_noops_without_process_group():
    x = torch.randn(3, 2)
    assert dist.concat_all_gather(x) is x and dist.get_world_size() == 1
    assert dist.gather_objects(5) == [5]


@pytest.mark.parametrize('foreach', [False, True])
def test_lars_two_steps_by_hand(foreach):
    """OpenSelfSup LARS: trust = eta |w| / (|g| + wd |w|), d = (g + wd w) lr trust, buf = m buf + d,
    w -= buf; an excluded group (BN/bias) has trust 1 and wd 0; a zero weight gets trust 1."""
    w = torch.nn.Parameter(torch.tensor([3.0, 4.0]))    # |w| = 5
    b = torch.nn.Parameter(torch.tensor([1.0]))
    z = torch.nn.Parameter(torch.zeros(2))
    opt = optim.LARS([dict(params=[w, z]), dict(params=[b], weight_decay=0.0, lars_exclude=True)],
                     lr=2.0, momentum=0.9, weight_decay=0.1, eta=0.001, foreach=foreach)
    for _ in range(2):
        w.grad, b.grad, z.grad = torch.tensor([0.6, 0.8]), torch.tensor([0.5]), torch.tensor([1.0, -1.0])
        opt.step()
    # step 1: trust = 0.001*5/(1 + 0.5) = 1/300; d = ([0.6,0.8] + 0.1*[3,4]) * 2/300 = [0.006, 0.008]
    w1 = [3 - 0.006, 4 - 0.008]
    # step 2: |w1| = 4.99; trust = 0.00499/(1 + 0.499); buf = 0.9*d1 + d2
    t2 = 0.001 * 4.99 / 1.499
    d2 = [(0.6 + 0.1 * w1[0]) * 2 * t2, (0.8 + 0.1 * w1[1]) * 2 * t2]
    expect = [w1[0] - (0.9 * 0.006 + d2[0]), w1[1] - (0.9 * 0.008 + d2[1])]
    assert torch.allclose(w.detach(), torch.tensor(expect), atol=1e-7)
    # excluded: d = 0.5*2 = 1 each step; b = 1 - 1 - (0.9 + 1) = -1.9
    assert torch.allclose(b.detach(), torch.tensor([-1.9]), atol=1e-6)
    # zero weight: trust 1 on step 1 -> z = -2*[1,-1]; then |z| > 0 and LARS applies
    z1 = torch.tensor([-2.0, 2.0])
    t = 0.001 * z1.norm() / (2 ** 0.5 + 0.1 * z1.norm())
    d = (torch.tensor([1.0, -1.0]) + 0.1 * z1) * 2 * t
    assert torch.allclose(z.detach(), z1 - (0.9 * torch.tensor([2.0, -2.0]) + d), atol=1e-6)


def test_larc_two_steps_by_hand():
    """apex LARC (clip off) around SGD: a = eta |w| / (|g| + wd |w| + 1e-8), g <- (g + wd w) a, then
    SGD with wd 0 (buf = m buf + g, w -= lr buf); a 1-D parameter is adapted too; a zero weight gets
    neither adaptation nor decay; the group keeps its weight decay after the step."""
    w = torch.nn.Parameter(torch.tensor([3.0, 4.0], dtype=torch.float64))    # |w| = 5
    b = torch.nn.Parameter(torch.tensor([2.0], dtype=torch.float64))
    z = torch.nn.Parameter(torch.zeros(2, dtype=torch.float64))
    opt = optim.LARC([w, b, z], lr=2.0, momentum=0.9, weight_decay=0.1, eta=0.001)
    bufs = {}
    expect = {}
    for step in range(2):
        w.grad = torch.tensor([0.6, 0.8], dtype=torch.float64)
        b.grad = torch.tensor([0.5], dtype=torch.float64)
        z.grad = torch.tensor([1.0, -1.0], dtype=torch.float64)
        for name, p, g in (('w', w, [0.6, 0.8]), ('b', b, [0.5]), ('z', z, [1.0, -1.0])):
            pv = expect.get(name, [float(v) for v in p.detach()])
            wn, gn = math.sqrt(sum(v * v for v in pv)), math.sqrt(sum(v * v for v in g))
            if wn > 0:
                a = 0.001 * wn / (gn + 0.1 * wn + 1e-8)
                d = [(gi + 0.1 * wi) * a for gi, wi in zip(g, pv)]
            else:
                d = list(g)
            bufs[name] = d if step == 0 else [0.9 * bi + di for bi, di in zip(bufs[name], d)]
            expect[name] = [wi - 2.0 * bi for wi, bi in zip(pv, bufs[name])]
        opt.step()
    # step 1 of w by hand: a = 0.005/1.5 (+1e-8), d = [0.9, 1.2] a ~ [0.003, 0.004], w1 ~ [2.994, 3.992]
    a1 = 0.005 / (1.5 + 1e-8)
    w1 = [3 - 2 * 0.9 * a1, 4 - 2 * 1.2 * a1]
    a2 = 0.001 * math.hypot(*w1) / (1 + 0.1 * math.hypot(*w1) + 1e-8)
    assert abs(bufs['w'][0] - (0.9 * 0.9 * a1 + (0.6 + 0.1 * w1[0]) * a2)) < 1e-15
    for name, p in (('w', w), ('b', b), ('z', z)):
        assert torch.allclose(p.detach(), torch.tensor(expect[name], dtype=torch.float64), rtol=0, atol=1e-14), name
    assert z.detach().tolist() != [0.0, 0.0] and opt.param_groups[0]['weight_decay'] == 0.1


def test_fair_lars_differs_from_oss_lars():
    """FAIR LARS applies the LR after the momentum and adapts only ndim > 1 tensors: w -= lr * mu with
    mu = m mu + trust (g + wd w), trust = eta |w| / |g + wd w|; a bias takes d = g."""
    w = torch.nn.Parameter(torch.tensor([[3.0, 4.0]], dtype=torch.float64))
    b = torch.nn.Parameter(torch.tensor([1.0], dtype=torch.float64))
    opt = optim.FairLARS([w, b], lr=2.0, weight_decay=0.1, momentum=0.9, eta=0.001)
    w.grad = torch.tensor([[0.6, 0.8]], dtype=torch.float64)
    b.grad = torch.tensor([0.5], dtype=torch.float64)
    opt.step()
    d = torch.tensor([[0.9, 1.2]], dtype=torch.float64)   # g + wd w, |d| = 1.5
    assert torch.allclose(w.detach(), torch.tensor([[3.0, 4.0]], dtype=torch.float64) - 2.0 * d * 0.005 / 1.5,
                          rtol=0, atol=1e-15)
    assert torch.allclose(b.detach(), torch.tensor([0.0], dtype=torch.float64), rtol=0, atol=1e-15)


def test_lars_foreach_equals_loop():
    """The multi-tensor LARS step (default on CUDA) and the per-tensor loop give the same weights and
    momentum buffers over several steps of a real network, excluded groups included (to float32
    rounding: the two norm kernels may sum in a different order)."""
    torch.manual_seed(0)
    nets = [build_resnet('resnet10', 8, width=8, cifar_stem=True) for _ in range(2)]
    nets[1].load_state_dict(nets[0].state_dict())
    x = torch.randn(4, 3, 16, 16)
    opts = [optim.LARS(optim.param_groups(n, optim.LARS_EXCLUDE_RULES, log=lambda *a: None), lr=0.5,
                       weight_decay=1e-4, foreach=f) for n, f in zip(nets, (False, True))]
    for _ in range(3):
        for n, o in zip(nets, opts):
            o.zero_grad()
            n(x).square().mean().backward()
            o.step()
    for (name, a), b in zip(nets[0].named_parameters(), nets[1].parameters()):
        assert torch.allclose(a, b, rtol=1e-5, atol=1e-7), name
        assert torch.allclose(opts[0].state[a]['momentum_buffer'], opts[1].state[b]['momentum_buffer'],
                              rtol=1e-5, atol=1e-8), name
    assert any(len(g['params']) and g['lars_exclude'] for g in opts[0].param_groups)


def test_knn_bank_and_cluster_features_reuse_the_training_scan():
    """The kNN monitor's bank and DeepCluster/ODC's feature set take the training set's scanned
    images (same list, same order, another transform) instead of a second stat pass over the folder;
    a synthetic training set falls back to building the train split."""
    from common.data import build_dataset, same_images
    from common.knn import KnnMonitor
    train = build_dataset(SAMPLE, augment.moco_v2(32, blur=False))
    mon = KnnMonitor(SAMPLE, 32, k=5, workers=0, train_set=train)
    assert mon.train_set.samples is train.samples and mon.train_set.transform is not train.transform
    assert mon.train_set[3][0].shape == (3, 32, 32) and mon.train_set[3][1] == train.targets[3]
    eval_set = same_images(train, augment.eval_transform(32), SAMPLE)
    assert eval_set.samples is train.samples
    fresh = same_images(build_dataset('synthetic:32'), augment.eval_transform(32), SAMPLE)
    assert fresh.samples == train.samples and fresh.samples is not train.samples
