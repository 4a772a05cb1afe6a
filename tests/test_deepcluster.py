"""deepcluster.py: model, head re-initialisation and its optimizer state, PCA-whitening, the
uniform-over-clusters sampler, start-up errors; then end to end on real images: 2-process torchrun
(identical labels and heads on both ranks, NMI between rounds, eval/knn.py and the Sobel backbone)
and exact resume across a stop mid-epoch and a stop right at an epoch's end."""
import argparse
import json
import sys

import numpy as np
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from common import augment, cluster, optim
from common.data import build_dataset
from common.features import load_eval_backbone
from common.resnet import SobelResNet, build_resnet, build_resnet_sobel
from conftest import REPO, python, torchrun
import deepcluster
from deepcluster import (DeepCluster, UniformClusterSampler, parse_args, reset_head_state, round_seed,
                         uniform_cluster_indices)

SMALL = ['--arch', 'resnet10', '--width', '8', '--cifar-stem', '--crop-size', '32', '--workers', '0',
         '--print-freq', '1', '--seed', '0', '--batch-size', '16', '--num-clusters', '8', '--pca-dim', '16']


class Lin(nn.Linear):
    """Stand-in backbone: one linear layer with a feat_dim."""

    def __init__(self, d_in, d):
        super().__init__(d_in, d)
        self.feat_dim = d


def ckpt(d, name='checkpoint_last.pth'):
    return torch.load(d / name, map_location='cpu', weights_only=True)


def records(d, kind):
    return [r for r in map(json.loads, open(d / 'log.jsonl')) if r['type'] == kind]


# ============ model, head, defaults ============


def test_model_sobel_head_and_defaults():
    model = DeepCluster(build_resnet_sobel('resnet10', width=8, cifar_stem=True), 10, k=7)
    assert isinstance(model.backbone, SobelResNet) and model.backbone.conv1.in_channels == 2
    assert model(torch.randn(4, 3, 32, 32)).shape == (4, 7)
    assert model.head.weight.shape == (7, 64) and torch.equal(model.head.bias, torch.zeros(7))
    assert model.labels.shape == (10,) and model.labels.dtype == torch.long
    rgb = DeepCluster(build_resnet('resnet10', width=8, cifar_stem=True), 10, k=7)
    assert rgb.backbone.conv1.in_channels == 3
    big = DeepCluster(Lin(4, 512), 3, k=1000)
    assert big.head.weight.std().item() == pytest.approx(0.01, rel=0.05)
    a = parse_args(['/data'])
    assert (a.num_clusters, a.pca_dim, a.kmeans_iters, a.quota, a.sobel, a.lr, a.batch_size, a.momentum, a.wd,
            a.epochs, a.schedule, a.cos) == (10000, 256, 20, 'k', True, 0.05, 512, 0.9, 1e-5, 200, [], False)
    assert optim.scaled_lr(a.lr, a.batch_size) == pytest.approx(0.1)  # OSS: 0.1 at batch 512
    groups = optim.param_groups(model, a.param_group, lambda *x: None)
    no_momentum = [g for g in groups if g.get('momentum') == 0.0]
    assert len(no_momentum) == 1 and len(no_momentum[0]['params']) == 2  # head.weight, head.bias
    assert not parse_args(['/data', '--no-sobel']).sobel
    demo = parse_args([])
    assert demo.data.endswith('cifar10_sample') and demo.num_clusters <= 5000 and demo.pca_dim <= demo.width * 8


def test_head_reinit_and_fresh_optimizer_state():
    """reset_head draws N(0, 0.01) from the round's generator (the same on every process), bias 0;
    reset_head_state drops the head's momentum buffers, so the next step starts them afresh."""
    torch.manual_seed(0)
    model = DeepCluster(Lin(6, 5), 4, k=3)
    rules = [(r'^head\.', {'momentum': 0.9})]  # a head with momentum, so there is state to drop
    opt = torch.optim.SGD(optim.param_groups(model, rules, lambda *x: None), 0.1, momentum=0.9)
    x, y = torch.randn(8, 6), torch.randint(3, (8,))
    for _ in range(2):
        opt.zero_grad()
        F.cross_entropy(model(x), y).backward()
        opt.step()
    assert all('momentum_buffer' in opt.state[p] for p in model.parameters())
    backbone_buf = opt.state[model.backbone.weight]['momentum_buffer'].clone()
    model.reset_head(torch.Generator().manual_seed(round_seed(0, 3)))
    reset_head_state(opt, model.head)
    want = torch.randn(3, 5, generator=torch.Generator().manual_seed(3)) * 0.01
    assert torch.equal(model.head.weight, want) and torch.equal(model.head.bias, torch.zeros(3))
    assert all(p not in opt.state for p in model.head.parameters())
    assert torch.equal(opt.state[model.backbone.weight]['momentum_buffer'], backbone_buf)  # body keeps its state
    opt.zero_grad()
    F.cross_entropy(model(x), y).backward()
    grad = model.head.weight.grad.clone()
    opt.step()
    assert torch.equal(opt.state[model.head.weight]['momentum_buffer'], grad)  # fresh buffer = first gradient
    # the default head group (momentum 0, OSS) keeps no momentum at all, as the original's head SGD
    opt = torch.optim.SGD(optim.param_groups(model, parse_args(['/d']).param_group, lambda *x: None), 0.1,
                          momentum=0.9)
    F.cross_entropy(model(x), y).backward()
    opt.step()
    assert opt.state[model.head.weight].get('momentum_buffer') is None


# ============ PCA-whitening and the uniform sampler ============


def test_pca_whitening_has_identity_covariance():
    rng = np.random.RandomState(0)
    n = 4000
    x = (rng.randn(n, 32) * np.linspace(0.1, 10, 32)) @ rng.randn(32, 32) + 3  # correlated, anisotropic
    w = cluster.pca_whiten(x, 8)
    # faiss whitens by the eigenvalues of the scatter matrix (X^T X, not / N): covariance I / N
    assert w.shape == (n, 8) and np.allclose(np.cov(w.T, bias=True) * n, np.eye(8), atol=1e-3)
    assert np.allclose(w.mean(0), 0, atol=1e-6)
    # w = centred x @ A with the columns of A spanning the top 8 principal directions
    xc = x - x.mean(0)
    evecs = np.linalg.eigh(xc.T @ xc)[1][:, ::-1][:, :8]
    a = np.linalg.lstsq(xc, w, rcond=None)[0]
    assert np.allclose(evecs @ (evecs.T @ a), a, atol=1e-3 * np.abs(a).max())
    p = cluster.preprocess_features(x, 8)
    assert p.shape == (n, 8) and np.allclose(np.linalg.norm(p, axis=1), 1, atol=1e-5)


def test_uniform_quotas():
    labels = np.repeat([0, 1, 3], [10, 3, 7])  # N = 20, k = 4, cluster 2 empty
    d = uniform_cluster_indices(labels, 4, np.random.default_rng(0), 'k')
    # OSS quota int(20/4)+1 = 6 per non-empty cluster: 18 draws, repeated cyclically to 20
    assert len(d) == 20 and np.bincount(labels[d[:18]], minlength=4).tolist() == [6, 6, 0, 6]
    assert np.array_equal(d[18:], d[:2])
    assert len(set(d[:18][labels[d[:18]] == 0])) == 6  # a large cluster: without replacement
    assert set(d[labels[d] == 1]) <= {10, 11, 12}  # 3 <= 6 members: drawn with replacement
    # original quota int(20/3)+1 = 7 per non-empty cluster: 21 draws cut to 20
    d = uniform_cluster_indices(labels, 4, np.random.default_rng(0), 'nonempty')
    counts = np.bincount(labels[d], minlength=4)
    assert counts.sum() == 20 and counts[2] == 0 and set(counts[[0, 1, 3]]) <= {6, 7}
    # skewed clusters come out balanced
    labels = np.repeat(np.arange(10), [910] + [10] * 9)
    counts = np.bincount(labels[uniform_cluster_indices(labels, 10, np.random.default_rng(1))], minlength=10)
    assert counts.max() - counts.min() <= 101 - 90 and counts.sum() == 1000


def test_uniform_sampler_epochs_and_ranks():
    labels = np.repeat([0, 1, 3], [10, 3, 7])
    s = UniformClusterSampler(20, 8, seed=3, k=4)
    s.set_labels(labels)
    s.set_epoch(2)
    keys = list(s)
    assert len(keys) == 16 and [e for _, e in keys] == [2 * 20 + j for j in range(16)]  # a seed per draw
    assert keys == list(s)  # fixed by (seed, epoch)
    s.set_epoch(3)
    assert [i for i, _ in keys] != [i for i, _ in s]
    shards = []
    for r in range(2):  # every process: a disjoint share of the same list, from start_iter on
        t = UniformClusterSampler(20, 8, rank=r, world=2, seed=3, k=4)
        t.set_labels(labels)
        t.set_epoch(2, start_iter=1)
        shards.append(list(t))
        assert len(t) == len(shards[-1]) == 4
    assert shards[0] == keys[8::2] and shards[1] == keys[9::2]


# ============ errors ============


def test_startup_errors(data64, tmp_path, monkeypatch):
    out = ['--output-dir', str(tmp_path)]
    with pytest.raises(SystemExit, match='--num-clusters 100 is more than the 64 training images'):
        deepcluster.main([str(data64), *SMALL, '--num-clusters', '100', *out])
    with pytest.raises(SystemExit, match=r'--pca-dim 128 must be at most the feature dimension \(64\)'):
        deepcluster.main([str(data64), *SMALL, '--pca-dim', '128', *out])
    with pytest.raises(SystemExit, match='does not exist'):
        deepcluster.main([str(tmp_path / 'nope'), *SMALL, *out])
    monkeypatch.setitem(sys.modules, 'faiss', None)  # import faiss -> ImportError
    with pytest.raises(SystemExit, match='needs faiss.*pip install faiss-cpu'):
        deepcluster.main([str(data64), *SMALL, *out])


def test_nan_features_are_refused(data64):
    class NaNNet(Lin):
        def forward(self, x):
            return torch.full((x.shape[0], self.feat_dim), float('nan'))

    model = DeepCluster(NaNNet(1, 4), 64, k=2)
    feat_set = build_dataset(data64, augment.eval_transform(32), 'train')
    args = argparse.Namespace(batch_size=32, workers=0, amp='off')
    with pytest.raises(FloatingPointError, match='64 of 64 images have NaN/inf features'):
        deepcluster.extract_features(model, feat_set, args, torch.device('cpu'), 'round 0 features')
    with pytest.raises(FloatingPointError, match='NaN'):
        cluster.preprocess_features(np.full((8, 4), np.nan, np.float32))


# ============ end to end ============


def test_torchrun_two_processes_identical_labels(data64, tmp_path):
    """2 gloo processes: both hold the same labels and head after every round; rounds 0-2 are logged
    with their seeds and an NMI against the previous round below 1; the checkpoint and backbone.pth are
    a Sobel backbone that eval/knn.py loads."""
    driver = tmp_path / 'driver.py'
    driver.write_text(
        f'import os, sys, torch\nsys.path.insert(0, {str(REPO)!r})\nimport deepcluster\n'
        f'core = deepcluster.main(sys.argv[1:])\n'
        f'torch.save(dict(labels=core.labels, head=core.head.weight.detach()), '
        f'os.path.join({str(tmp_path)!r}, "mem_%s.pt" % os.environ["RANK"]))\n')
    out = tmp_path / 'out'
    p = torchrun(2, driver, data64, *SMALL, '--lr', '0.5', '--epochs', '2', '--knn-every', '2', '--output-dir', out)
    assert 'world size 2' in p.stdout and '(8 per process)' in p.stdout
    m0, m1 = torch.load(tmp_path / 'mem_0.pt'), torch.load(tmp_path / 'mem_1.pt')
    assert torch.equal(m0['labels'], m1['labels']) and torch.equal(m0['head'], m1['head'])
    assert torch.bincount(m0['labels'], minlength=8).sum() == 64
    c = ckpt(out)
    assert torch.equal(c['model']['labels'], m0['labels']) and c['backbone_prefix'] == 'backbone.'
    assert c['args']['sobel'] and c['extra'] == dict(round=2, round_seed=2)
    rounds = records(out, 'clusters')
    assert [r['round'] for r in rounds] == [0, 1, 2] and [r['seed'] for r in rounds] == [0, 1, 2]
    assert 'nmi_prev' not in rounds[0] and all(0 < r['nmi_prev'] < 1 for r in rounds[1:])  # labels move
    assert rounds[1]['nmi_prev'] != rounds[2]['nmi_prev'] and all(0 < r['nmi_classes'] < 1 for r in rounds)
    assert all(r['min_size'] <= r['median_size'] <= r['max_size'] and r['empty'] >= 0 for r in rounds)
    assert len(records(out, 'train')) == 8 and 'weighted kNN top-1 (k=200): trained' in p.stdout
    net, sd, cfg, _ = load_eval_backbone(out / 'backbone.pth')
    assert isinstance(net, SobelResNet) and cfg['in_channels'] == 2
    assert all(torch.equal(v, c['model']['backbone.' + k]) for k, v in sd.items())
    e = python('eval/knn.py', '--pretrained', out / 'checkpoint_last.pth', data64, '--workers', '0',
               '--device', 'cpu', '--output-dir', tmp_path)
    assert 'top-1' in e.stdout


def test_resume_is_exact(data64, tmp_path, capsys):
    """8 steps straight == 3 steps + resume to step 4 (the end of epoch 0, before round 1) + resume,
    bitwise: weights, labels, momentum buffers, losses, and every round's seed and NMI. In-process
    (no interpreter start-ups); --deterministic is switched off again afterwards."""
    args = [str(data64), *SMALL, '--epochs', '2', '--lr', '0.5', '--deterministic']
    a, b = tmp_path / 'a', tmp_path / 'b'
    try:
        deepcluster.main([*args, '--output-dir', str(a)])
        deepcluster.main([*args, '--output-dir', str(b), '--max-steps', '3'])
        capsys.readouterr()
        deepcluster.main([*args, '--output-dir', str(b), '--resume', 'auto', '--max-steps', '4'])
        out = capsys.readouterr().out
        assert 'iteration 3' in out and 'round ' not in out  # the labels of round 0 are restored
        deepcluster.main([*args, '--output-dir', str(b), '--resume', 'auto'])
        out = capsys.readouterr().out
        assert 'epoch 1 iteration 0' in out and 'round 1:' in out  # round 1 runs on resume
    finally:
        torch.use_deterministic_algorithms(False)
    ca, cb = ckpt(a), ckpt(b)
    for k in ca['model']:
        assert torch.equal(ca['model'][k], cb['model'][k]), k
    for k, s in ca['optimizer']['state'].items():
        assert torch.equal(s['momentum_buffer'], cb['optimizer']['state'][k]['momentum_buffer'])
    assert ca['extra'] == cb['extra'] == dict(round=2, round_seed=2)
    assert [r['loss'] for r in records(a, 'train')] == [r['loss'] for r in records(b, 'train')]
    strip = ('features_s', 'cluster_s', 'peak_mem_mb')
    ra, rb = ([{k: v for k, v in r.items() if k not in strip} for r in records(d, 'clusters')] for d in (a, b))
    assert ra == rb and len(ra) == 3
