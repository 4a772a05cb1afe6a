"""odc.py and common/cluster.py: memory update, relabelling, centroids, small-cluster handling and loss
weights by hand; the sampler with replacement; k-means / PCA-whitening helpers; then end to end on
real images: 2-process torchrun (identical bank, labels and centroids; eval/knn.py on the checkpoint)
and exact resume."""
import json
import math

import numpy as np
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from common import cluster, optim
from conftest import REPO, python, torchrun
from odc import ODC, ReplacementSampler, last_draws, parse_args, split_in_two

SMALL = ['--arch', 'resnet10', '--width', '8', '--cifar-stem', '--crop-size', '32', '--workers', '0',
         '--print-freq', '1', '--seed', '0', '--batch-size', '16', '--centroids-every', '2']


class Flat(nn.Module):
    """Stand-in backbone: the input is the pooled feature."""

    def __init__(self, d):
        super().__init__()
        self.feat_dim = d

    def forward(self, x):
        return x


def tiny_odc(n=3, k=2, dim=2, **kw):
    return ODC(Flat(4), n, k, hid_dim=8, dim=dim, **kw)


def ckpt(d, name='checkpoint_last.pth'):
    return torch.load(d / name, map_location='cpu', weights_only=True)


def records(d, kind):
    return [r for r in map(json.loads, open(d / 'log.jsonl')) if r['type'] == kind]


# ============ model and memory ============


def test_neck_head_and_head_momentum():
    model = ODC(Flat(64), 10, k=7)
    lin0, bn, relu0, drop, lin1, relu1 = model.neck
    assert (lin0.in_features, lin0.out_features, lin1.out_features) == (64, 512, 256)
    assert not bn.affine and bn.momentum == 0.001 and drop.p == 0.5
    assert isinstance(relu0, nn.ReLU) and isinstance(relu1, nn.ReLU)
    assert model.head.weight.shape == (7, 256) and model.head.weight.std().item() == pytest.approx(0.01, rel=0.1)
    assert model.bank.shape == (10, 256) and model.centroids.shape == (7, 256)
    groups = optim.param_groups(model, parse_args(['/data']).param_group, lambda *a: None)
    no_momentum = [g for g in groups if g.get('momentum') == 0.0]
    assert len(no_momentum) == 1 and len(no_momentum[0]['params']) == 2  # head.weight, head.bias


def test_update_memory_and_relabel_by_hand():
    """mu = 0.75 weights the new feature; rows are relabelled to the nearest centroid (dot product)."""
    model = tiny_odc(m=0.75)
    model.bank.copy_(torch.tensor([[1., 0.], [0., 1.], [0.6, 0.8]]))
    model.labels.copy_(torch.tensor([0, 1, 1]))
    model.centroids.copy_(torch.tensor([[1., 0.], [0., 1.]]))
    change = model.update_memory(torch.tensor([0, 1]), torch.tensor([[0., 5.], [1., 1.]]))
    new0 = F.normalize(torch.tensor([0.25, 0.75]), dim=0)  # 0.25 (1, 0) + 0.75 (0, 1): now closer to e2
    new1 = F.normalize(torch.tensor([0.75 * 0.5 ** 0.5, 0.25 + 0.75 * 0.5 ** 0.5]), dim=0)
    assert torch.allclose(model.bank[0], new0) and torch.allclose(model.bank[1], new1)
    assert model.labels.tolist() == [1, 1, 1] and change.item() == pytest.approx(0.5)
    assert torch.equal(model.bank[2], torch.tensor([0.6, 0.8]))


def test_repeated_index_updates_once_with_the_last_draw():
    idx, feat = last_draws(torch.tensor([2, 0, 2, 1]), torch.arange(8.).view(4, 2))
    assert sorted(zip(idx.tolist(), feat[:, 0].tolist())) == [(0, 2.0), (1, 6.0), (2, 4.0)]
    model = tiny_odc(m=1.0)
    model.centroids.copy_(torch.eye(2))
    model.update_memory(torch.tensor([0, 0]), torch.tensor([[1., 0.], [0., 1.]]))
    assert torch.allclose(model.bank[0], torch.tensor([0., 1.])) and model.labels[0] == 1


def test_forward_targets_and_weights_before_the_update():
    """Targets and weights (1/n_c)^0.5, normalised, come from the labels before the step's update."""
    torch.manual_seed(0)
    model = tiny_odc(n=4, k=2, dim=2).eval()  # eval: no dropout, so the feature is reproducible
    model.bank.copy_(torch.tensor([[1., 0.], [1., 0.], [1., 0.], [0., 1.]]))
    model.labels.copy_(torch.tensor([1, 0, 0, 0]))  # row 0 sits in the wrong cluster
    model.centroids.copy_(torch.eye(2))
    x = torch.randn(2, 4)
    feat = model.features(x)
    logits, target, weight = model(x, torch.tensor([0, 1]))
    assert target.tolist() == [1, 0] and torch.allclose(logits, model.head(feat))
    w = torch.tensor([3 ** -0.5, 1.0])
    assert torch.allclose(weight, w / w.sum(), atol=1e-6)
    # the update moved row 0 to cluster 0: (0.5 (1, 0) + 0.5 f) with f >= 0 (ReLU) is closer to e1
    assert model.labels.tolist() == [0, 0, 0, 0] and model.change_ratio.item() == pytest.approx(0.5)
    # the weighted CE is the weighted mean sum_i w_yi CE_i / sum_i w_yi
    ce = F.cross_entropy(logits, target, reduction='none')
    want = (weight[target] * ce).sum() / weight[target].sum()
    assert F.cross_entropy(logits, target, weight=weight).item() == pytest.approx(want.item(), rel=1e-6)


def test_centroids_are_means_and_empty_clusters_keep_theirs():
    model = tiny_odc(n=3, k=3)
    model.bank.copy_(torch.tensor([[1., 0.], [0., 1.], [0.6, 0.8]]))
    model.labels.copy_(torch.tensor([0, 0, 2]))
    model.centroids.copy_(torch.full((3, 2), 7.))
    model.update_centroids()
    assert torch.allclose(model.centroids, torch.tensor([[0.5, 0.5], [7., 7.], [0.6, 0.8]]))
    model.bank[2] = torch.tensor([0., 1.])
    model.update_centroids([0])  # only the listed clusters
    assert torch.allclose(model.centroids[2], torch.tensor([0.6, 0.8]))


def test_small_cluster_dissolved_and_refilled_by_splitting_the_largest():
    """k=3, min_cluster 2: cluster 1 has one member -> it joins its nearest other centroid (cluster 2);
    the emptied cluster 1 takes one of the two groups of the largest cluster (0)."""
    up, right = [0., 1.], [1., 0.]
    diag = F.normalize(torch.tensor([1., 0.1]), dim=0).tolist()
    rows = [up] * 4 + [right] * 4 + [diag] + [[0.8, 0.6]] * 2
    model = tiny_odc(n=len(rows), k=3, min_cluster=2)
    model.bank.copy_(torch.tensor(rows))
    model.labels.copy_(torch.tensor([0] * 8 + [1] + [2] * 2))
    model.update_centroids()
    assert model.deal_with_small_clusters() == 1
    lab = model.labels.tolist()
    assert lab[8:] == [2, 2, 2]  # the lone member moved to cluster 2 (closer than cluster 0's mean)
    assert len(set(lab[:4])) == 1 and len(set(lab[4:8])) == 1 and {lab[0], lab[4]} == {0, 1}
    for c in (0, 1):  # centroids of both halves recomputed
        assert torch.allclose(model.centroids[c], model.bank[model.labels == c].mean(0))
    assert model.deal_with_small_clusters() == 0
    # loss weights follow: sizes 4, 4, 3
    w = torch.tensor([4 ** -0.5, 4 ** -0.5, 3 ** -0.5])
    assert torch.allclose(model.class_weights(), w / w.sum(), atol=1e-6)


def test_split_in_two_falls_back_to_halves():
    second = split_in_two(torch.ones(7, 3))  # identical points: 2-means cannot split them
    assert second.sum().item() == 4
    feats = torch.tensor([[0., 1.]] * 3 + [[1., 0.]] * 2)
    second = split_in_two(feats)
    assert second[:3].unique().numel() == 1 and second[3:].unique().numel() == 1 and second[0] != second[3]


def test_replacement_sampler():
    s = ReplacementSampler(64, 16, seed=3)
    s.set_epoch(2)
    keys = list(s)
    idx = [i for i, _ in keys]
    assert len(keys) == 64 and len(set(idx)) < 64  # with replacement: repeats
    assert [e for _, e in keys] == [2 * 64 + j for j in range(64)]  # one augmentation seed per draw
    assert keys == list(s)  # fixed by (seed, epoch)
    shards = []
    for r in range(2):
        t = ReplacementSampler(64, 16, rank=r, world=2, seed=3)
        t.set_epoch(2, start_iter=1)
        shards.append(list(t))
    assert sorted(shards[0] + shards[1]) == sorted(keys[16:]) and shards[0] == keys[16::2]


def test_parse_args_defaults():
    a = parse_args(['/data'])
    assert (a.num_clusters, a.min_cluster, a.odc_m, a.centroids_every, a.reweight_pow, a.lr, a.batch_size,
            a.wd, a.momentum, a.epochs, a.schedule, a.lr_gamma) == \
        (10000, 20, 0.5, 10, 0.5, 0.03, 512, 1e-5, 0.9, 440, [400], 0.4)
    assert optim.scaled_lr(a.lr, a.batch_size) == pytest.approx(0.06)  # OSS: 0.06 at batch 512
    demo = parse_args([])
    assert demo.num_clusters * demo.min_cluster <= 5000 and demo.data.endswith('cifar10_sample')


# ============ common/cluster.py ============


def test_kmeans_recovers_blobs_and_stats():
    rng = np.random.RandomState(0)
    truth = np.repeat([0, 1], 50)
    x = np.array([[10.] * 8, [-10.] * 8])[truth] + rng.randn(100, 8)
    labels, centroids, obj = cluster.kmeans(x, 2, seed=1)
    assert labels.shape == (100,) and centroids.shape == (2, 8) and obj >= 0
    assert cluster.nmi(labels, truth) == pytest.approx(1.0)
    for c in range(2):
        assert np.allclose(centroids[c], x[labels == c].mean(0), atol=1e-4)
    labels, centroids, _ = cluster.kmeans(x, 7, seed=1)  # every point goes to its nearest centroid
    d = ((x[:, None] - centroids[None]) ** 2).sum(-1)
    assert np.array_equal(labels, d.argmin(1))
    assert cluster.size_stats(np.repeat([0, 1, 3], [5, 2, 3]), 5) == \
        dict(nonempty=3, empty=2, min_size=2, max_size=5, max_share=0.5)
    with pytest.raises(ValueError, match='cannot form'):
        cluster.kmeans(x[:3], 4)


def test_pca_whitening_and_preprocess():
    rng = np.random.RandomState(0)
    x = rng.randn(500, 6) @ rng.randn(6, 6) + 3
    w = cluster.pca_whiten(x, 3)
    cov = np.cov(w.T)
    assert w.shape == (500, 3) and np.allclose(cov, cov[0, 0] * np.eye(3), atol=1e-3 * cov[0, 0])
    assert np.allclose(w.mean(0), 0, atol=1e-4)
    # the first axis carries the most variance of x: it is the top principal direction
    p = cluster.preprocess_features(x, 3)
    assert np.allclose(np.linalg.norm(p, axis=1), 1, atol=1e-5)
    assert np.allclose(np.linalg.norm(cluster.preprocess_features(torch.tensor(x)), axis=1), 1, atol=1e-5)
    assert math.isclose(cluster.nmi([0, 0, 1, 1], [1, 1, 0, 0]), 1.0)


# ============ end to end ============


def test_torchrun_two_processes_and_eval_knn(data64, tmp_path):
    """2 gloo processes, 8 clusters of at least 8 images (small clusters every step): bank, labels and
    centroids are identical on both ranks; eval/knn.py accepts the checkpoint."""
    driver = tmp_path / 'driver.py'
    driver.write_text(
        f'import os, sys, torch\nsys.path.insert(0, {str(REPO)!r})\nimport odc\n'
        f'core = odc.main(sys.argv[1:])\n'
        f'torch.save(dict(bank=core.bank, labels=core.labels, centroids=core.centroids), '
        f'os.path.join({str(tmp_path)!r}, "mem_%s.pt" % os.environ["RANK"]))\n')
    out = tmp_path / 'out'
    p = torchrun(2, driver, data64, *SMALL, '--num-clusters', '8', '--min-cluster', '8', '--epochs', '2',
                 '--knn-every', '2', '--output-dir', out)
    assert 'world size 2' in p.stdout and '(8 per process)' in p.stdout and 'initial k-means' in p.stdout
    m0, m1 = torch.load(tmp_path / 'mem_0.pt'), torch.load(tmp_path / 'mem_1.pt')
    for k in ('bank', 'labels', 'centroids'):
        assert torch.equal(m0[k], m1[k]), k
    assert torch.bincount(m0['labels'], minlength=8).min() >= 1
    c = ckpt(out)
    assert torch.equal(c['model']['labels'], m0['labels']) and c['backbone_prefix'] == 'backbone.'
    train = records(out, 'train')
    assert len(train) == 8 and any(r['dissolved'] > 0 for r in train) and all(0 <= r['change_ratio'] <= 1 for r in train)
    assert 0 <= records(out, 'clusters')[-1]['nmi'] <= 1
    assert 'weighted kNN top-1 (k=200): trained' in p.stdout
    e = python('eval/knn.py', '--pretrained', out / 'checkpoint_last.pth', data64, '--workers', '0',
               '--device', 'cpu', '--output-dir', tmp_path)
    assert 'top-1' in e.stdout


def test_resume_is_exact(data64, tmp_path):
    """3 steps + stop + resume (mid-epoch) == 8 steps straight, bitwise: bank, labels, centroids, weights."""
    args = [data64, *SMALL, '--num-clusters', '8', '--min-cluster', '6', '--epochs', '2', '--deterministic']
    a, b = tmp_path / 'a', tmp_path / 'b'
    python('odc.py', *args, '--output-dir', a)
    python('odc.py', *args, '--output-dir', b, '--max-steps', '3')
    p = python('odc.py', *args, '--output-dir', b, '--resume', 'auto')
    assert 'resumed from' in p.stdout and 'iteration 3' in p.stdout and 'initial k-means' not in p.stdout
    ca, cb = ckpt(a), ckpt(b)
    for k in ca['model']:
        assert torch.equal(ca['model'][k], cb['model'][k]), k
    for k, s in ca['optimizer']['state'].items():
        assert torch.equal(s['momentum_buffer'], cb['optimizer']['state'][k]['momentum_buffer'])
    assert [r['loss'] for r in records(a, 'train')] == [r['loss'] for r in records(b, 'train')]


def test_startup_errors(data64, tmp_path):
    import odc
    with pytest.raises(SystemExit, match=r'--num-clusters 8 x --min-cluster 10 = 80 is more than the 64'):
        odc.main([str(data64), *SMALL, '--num-clusters', '8', '--min-cluster', '10', '--output-dir', str(tmp_path)])
    with pytest.raises(SystemExit, match='does not exist'):
        odc.main([str(tmp_path / 'nope'), *SMALL, '--output-dir', str(tmp_path)])
