"""swav.py: Sinkhorn-Knopp and the swapped loss by hand, the queue (start, fill, use when full, rescoring),
prototype normalisation and freezing, the LR schedule, the recipes, the multi-crop views; end to end:
a 2-process gloo torchrun whose codes equal one process's Sinkhorn on the whole batch (queue included),
bitwise resume with the queue (1 process and 2 processes), --device-aug, one-line refusals."""
import math
import random
import types

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

import swav
from common import augment, batch_aug
from common.resnet import Bottleneck, ResNet, build_resnet
from conftest import REPO, make_subset, refused, stop_and_resume, torchrun

# tiny end-to-end run: ResNet-10 width 8 at 32 px, 2x32 + 2x16 crops, 16-d embeddings, 20 prototypes
TINY = ['--arch', 'resnet10', '--width', '8', '--cifar-stem', '--size-crops', '32', '16', '--nmb-crops', '2', '2',
        '--hidden-mlp', '32', '--feat-dim', '16', '--nmb-prototypes', '20', '--warmup-epochs', '1',
        '--freeze-prototypes-niters', '1', '--workers', '0', '--print-freq', '1', '--seed', '0']


def sinkhorn_by_hand(scores, eps, iterations):
    """Plain-Python Sinkhorn-Knopp on an M x K list of lists (one process); returns the M x K codes and
    the (row sums, column sums) of Q before the final rescale."""
    m, k = len(scores), len(scores[0])
    q = [[math.exp(scores[j][i] / eps) for j in range(m)] for i in range(k)]  # K x M
    total = sum(map(sum, q))
    q = [[v / total for v in row] for row in q]
    for _ in range(iterations):
        rows = [sum(row) for row in q]
        q = [[v / rows[i] / k for v in row] for i, row in enumerate(q)]
        cols = [sum(q[i][j] for i in range(k)) for j in range(m)]
        q = [[q[i][j] / cols[j] / m for j in range(m)] for i in range(k)]
    sums = [sum(row) for row in q], [sum(q[i][j] for i in range(k)) for j in range(m)]
    return [[q[i][j] * m for i in range(k)] for j in range(m)], sums


def test_sinkhorn_by_hand():
    scores = [[0.10, -0.20, 0.05, 0.30], [0.00, 0.25, -0.10, 0.15], [-0.30, 0.05, 0.20, 0.00]]  # M 3, K 4
    for iterations in (1, 3):
        want, (rows, cols) = sinkhorn_by_hand(scores, 0.05, iterations)
        got = swav.sinkhorn(torch.tensor(scores, dtype=torch.float64), 0.05, iterations)
        assert torch.allclose(got, torch.tensor(want, dtype=torch.float64), rtol=0, atol=1e-12)
        assert cols == pytest.approx([1 / 3] * 3, abs=1e-15)  # columns 1/B before the rescale
        assert torch.allclose(got.sum(1), torch.ones(3, dtype=torch.float64), atol=1e-12)  # each code sums to 1
    # the rows reach 1/K as the iterations converge: the prototypes equipartition the batch (B/K each)
    _, (rows, cols) = sinkhorn_by_hand(scores, 0.05, 300)
    assert rows == pytest.approx([1 / 4] * 4, abs=1e-9) and cols == pytest.approx([1 / 3] * 3, abs=1e-15)
    got = swav.sinkhorn(torch.tensor(scores, dtype=torch.float64), 0.05, 300)
    assert torch.allclose(got.sum(0), torch.full((4,), 3 / 4, dtype=torch.float64), atol=1e-9)
    assert not torch.allclose(swav.sinkhorn(torch.tensor(scores), 0.05, 3),
                              F.softmax(torch.tensor(scores) / 0.05, dim=1), atol=1e-3)  # not a softmax


def test_swapped_loss_by_hand():
    """3 crops, bs 2, K 3, crops 0 and 1 coded: loss = mean over the 2 coded crops of the mean over the
    2 other crops of -mean_b sum_k q log softmax(s / 0.1); the codes carry no gradient."""
    torch.manual_seed(0)
    bs, k, n = 2, 3, 3
    emb = F.normalize(torch.randn(n * bs, 4, dtype=torch.float64), dim=1)
    out = torch.randn(n * bs, k, dtype=torch.float64, requires_grad=True)
    loss, used = swav.swav_loss(emb, out, torch.randn(k, 4, dtype=torch.float64), bs, n)
    assert used is False
    total = 0.
    for c in (0, 1):
        q = sinkhorn_by_hand(out[bs * c:bs * (c + 1)].tolist(), 0.05, 3)[0]
        sub = 0.
        for v in range(n):
            if v == c:
                continue
            for b in range(bs):
                s = out[bs * v + b].detach() / 0.1
                logp = s - torch.log(torch.exp(s).sum())
                sub -= sum(q[b][j] * logp[j].item() for j in range(k)) / bs
        total += sub / (n - 1)
    assert loss.item() == pytest.approx(total / 2, abs=1e-12)
    loss.backward()  # the gradient flows through the predictions only: d/ds of -q log softmax(s/T)
    g = torch.zeros_like(out)
    for c in (0, 1):
        q = torch.tensor(sinkhorn_by_hand(out[bs * c:bs * (c + 1)].tolist(), 0.05, 3)[0], dtype=torch.float64)
        for v in range(n):
            if v != c:
                p = F.softmax(out[bs * v:bs * (v + 1)].detach() / 0.1, dim=1)
                g[bs * v:bs * (v + 1)] += (p - q) / 0.1 / bs / (n - 1) / 2
    assert torch.allclose(out.grad, g, atol=1e-12)


def test_queue_fill_use_when_full_and_rescoring():
    """Queue of 2 batches: call 1 and 2 fill it (not used: its last row is still zero before the fill),
    call 3 uses it, scored against the prototypes given at that call; the codes are the last bs rows."""
    torch.manual_seed(0)
    bs, n, d, k = 2, 3, 4, 5
    queue = torch.zeros(2, 2 * bs, d, dtype=torch.float64)
    embs = [F.normalize(torch.randn(n * bs, d, dtype=torch.float64), dim=1) for _ in range(3)]
    protos = [F.normalize(torch.randn(k, d, dtype=torch.float64), dim=1) for _ in range(3)]
    outs = [e @ p.t() for e, p in zip(embs, protos)]
    _, used = swav.swav_loss(embs[0], outs[0], protos[0], bs, n, queue)
    assert not used and torch.equal(queue[0, :bs], embs[0][:bs]) and torch.equal(queue[1, :bs], embs[0][bs:2 * bs])
    assert torch.all(queue[:, bs:] == 0)
    loss2, used = swav.swav_loss(embs[1], outs[1], protos[1], bs, n, queue)
    assert not used
    no_queue, _ = swav.swav_loss(embs[1], outs[1], protos[1], bs, n)
    assert loss2.item() == no_queue.item()  # filled, not yet used
    assert torch.equal(queue[0], torch.cat([embs[1][:bs], embs[0][:bs]]))  # newest first
    before = queue.clone()
    loss3, used = swav.swav_loss(embs[2], outs[2], protos[2], bs, n, queue)
    assert used
    want = 0.
    for i, c in enumerate((0, 1)):
        scores = torch.cat([before[i] @ protos[2].t(), outs[2][bs * c:bs * (c + 1)]])  # rescored queue
        q = swav.sinkhorn(scores)[-bs:]
        want += sum(-torch.mean(torch.sum(q * F.log_softmax(outs[2][bs * v:bs * (v + 1)] / 0.1, 1), 1))
                    for v in range(n) if v != c) / (n - 1)
    assert loss3.item() == pytest.approx(want.item() / 2, abs=1e-12)
    stale = sum(-torch.mean(torch.sum(swav.sinkhorn(torch.cat([before[0] @ protos[0].t(), outs[2][:bs]]))[-bs:]
                                      * F.log_softmax(outs[2][bs * v:bs * (v + 1)] / 0.1, 1), 1)) for v in (1, 2))
    assert abs(stale.item() / 2 - want.item() / 2) > 1e-6  # the old prototypes' scores would differ
    assert torch.equal(queue[1], torch.cat([embs[2][bs:2 * bs], embs[1][bs:2 * bs]]))
    # a queue already used this epoch is used even before it is full (the reference's flag)
    empty = torch.zeros(2, 2 * bs, d, dtype=torch.float64)
    with_flag, used = swav.swav_loss(embs[0], outs[0], protos[0], bs, n, empty.clone(), use_queue=True)
    assert used and with_flag.item() != swav.swav_loss(embs[0], outs[0], protos[0], bs, n)[0].item()


def test_lr_schedule_by_hand():
    lr = swav.lr_schedule(4.8, 0.0048, 4, 3, warmup_epochs=1, start_warmup=0.3)
    assert len(lr) == 12
    assert list(lr[:3]) == pytest.approx([0.3, 0.3 + 4.5 / 2, 4.8])  # linspace, both ends included
    n = 9
    for t in range(n):
        assert lr[3 + t] == pytest.approx(0.0048 + 0.5 * (4.8 - 0.0048) * (1 + math.cos(math.pi * t / n)))
    assert lr[3] == pytest.approx(4.8) and lr[-1] > 0.0048
    flat = swav.lr_schedule(0.6, 0.0006, 2, 2)  # the bs256 recipe: no warm-up
    assert list(flat) == pytest.approx([0.6, 0.0006 + 0.5 * 0.5994 * (1 + math.cos(math.pi / 4)),
                                        0.0006 + 0.5994 * 0.5, 0.0006 + 0.5 * 0.5994 * (1 + math.cos(3 * math.pi / 4))])


def test_recipes_and_demo_defaults():
    a = swav.parse_args(['/data'])
    assert (a.batch_size, a.base_lr, a.final_lr, a.warmup_epochs, a.start_warmup, a.freeze_prototypes_niters,
            a.queue_length, a.epochs) == (4096, 4.8, 0.0048, 10, 0.3, 313, 0, 800)
    b = swav.parse_args(['/data', '--recipe', 'bs256'])
    assert (b.batch_size, b.base_lr, b.final_lr, b.warmup_epochs, b.freeze_prototypes_niters, b.queue_length,
            b.epoch_queue_starts, b.epochs) == (256, 0.6, 0.0006, 0, 5005, 3840, 15, 200)
    c = swav.parse_args(['/data', '--recipe', 'bs256', '--queue-length', '0', '--base-lr', '0.3'])
    assert (c.queue_length, c.base_lr, c.final_lr) == (0, 0.3, 0.0006)  # explicit flags win
    for x in (a, b):
        assert (x.nmb_crops, x.size_crops, x.min_scale_crops, x.max_scale_crops) == \
            ([2, 6], [224, 96], [0.14, 0.05], [1.0, 0.14])
        assert (x.temperature, x.epsilon, x.sinkhorn_iterations, x.nmb_prototypes, x.feat_dim, x.hidden_mlp,
                x.wd, x.crops_for_assign, x.arch) == (0.1, 0.05, 3, 3000, 128, 2048, 1e-6, [0, 1], 'resnet50')
    d = swav.parse_args([])
    assert d.data == str(swav.SAMPLE_DATA) and d.size_crops == [32] and d.nmb_crops == [2] and d.cifar_stem
    assert (d.epsilon, d.trust, d.epochs, d.min_scale_crops, d.max_scale_crops) == (0.03, 0.02, 30, [0.14], [1.0])
    assert swav.check_args(b) == (8, 3840)
    assert swav.check_args(swav.parse_args(['/d', '--recipe', 'bs256', '--queue-length', '4000']))[1] == 3840  # rounded


def test_model_structure_and_multires_forward():
    torch.manual_seed(0)
    m = swav.SwAV(ResNet(Bottleneck, [1, 1, 1, 1], width=8, init='fan_out'), 32, 16, 10)
    assert [type(x).__name__ for x in m.projection_head] == ['Linear', 'BatchNorm1d', 'ReLU', 'Linear']
    assert m.projection_head[0].in_features == 256 and m.projection_head[3].bias is not None
    assert m.prototypes.bias is None and m.prototypes.weight.shape == (10, 16)
    assert all(b.bn3.weight.eq(1).all() for b in m.backbone.modules() if hasattr(b, 'bn3'))  # no zero-init
    calls = []
    h = m.backbone.register_forward_hook(lambda mod, i, o: calls.append(tuple(i[0].shape)))
    crops = [torch.randn(3, 3, 32, 32), torch.randn(3, 3, 32, 32), torch.randn(3, 3, 16, 16)]
    m.eval()
    z, s = m(crops)
    h.remove()
    assert calls == [(6, 3, 32, 32), (3, 3, 16, 16)]  # one backbone pass per resolution
    assert z.shape == (9, 16) and torch.allclose(z.norm(dim=1), torch.ones(9), atol=1e-6)
    assert torch.allclose(s, z @ m.prototypes.weight.t(), atol=1e-6)
    assert torch.allclose(z[6:], m([crops[2]])[0], atol=1e-5)  # crop-major rows


class _Meter:
    def __getattr__(self, name):
        return lambda *a, **k: None


class FakeRun:
    def train_meter(self, *a):
        return _Meter()

    def step_end(self, *a):
        return False


def step_args(**kw):
    return types.SimpleNamespace(**{**dict(nmb_prototypes=10, batch_size=4, crops_for_assign=[0, 1], temperature=0.1,
                                           epsilon=0.05, sinkhorn_iterations=3, freeze_prototypes_niters=1,
                                           amp='off'), **kw})


def test_prototypes_normalised_before_forward_and_frozen():
    """Step 0 (frozen): the prototypes are only renormalised (no grad, no LARC state); step 1: trained."""
    torch.manual_seed(0)
    m = swav.SwAV(build_resnet('resnet10', 0, 8, cifar_stem=True), 16, 8, 10)
    with torch.no_grad():
        m.prototypes.weight.mul_(3.0)
    w0 = m.prototypes.weight.detach().clone()
    opt = torch.optim.SGD(m.parameters(), 0.1, momentum=0.9)
    seen = []
    m.register_forward_pre_hook(lambda mod, i: seen.append(mod.prototypes.weight.detach().clone()))
    crops = [[torch.randn(4, 3, 16, 16) for _ in range(2)] + [torch.randn(4, 3, 8, 8)] for _ in range(2)]
    lrs = np.full(2, 0.1)
    for it in range(2):
        swav.train_one_epoch([(crops[it], None, None)], m, m, opt, torch.amp.GradScaler('cpu', enabled=False), lrs,
                             None, 0, it, 2, 3, step_args(), torch.device('cpu'), FakeRun())
        if it == 0:
            assert torch.allclose(seen[0], F.normalize(w0, dim=1), atol=1e-7)  # renormalised before the forward
            assert torch.equal(m.prototypes.weight, seen[0]) and m.prototypes.weight not in opt.state
            assert m.backbone.conv1.weight in opt.state
    assert torch.allclose(seen[1].norm(dim=1), torch.ones(10), atol=1e-6)
    assert not torch.equal(m.prototypes.weight, seen[1]) and m.prototypes.weight in opt.state


def test_multicrop_recipe():
    mc = augment.swav()
    assert mc.sizes == [224] * 2 + [96] * 6 and mc.scales == [(0.14, 1.0)] * 2 + [(0.05, 0.14)] * 6
    names = []
    for op in mc.transforms[5].transforms:
        names.append((type(op.transforms[0]).__name__, op.p) if isinstance(op, augment.T.RandomApply) else
                     type(op).__name__)
    assert names == ['RandomResizedCrop', 'RandomHorizontalFlip', ('ColorJitter', 0.8), 'RandomGrayscale',
                     ('GaussianBlur', 0.5), 'ToTensor', 'Normalize']
    ops = mc.transforms[0].transforms
    assert ops[0].interpolation == augment.T.InterpolationMode.BILINEAR
    j = ops[2].transforms[0]
    assert [*j.brightness, *j.contrast, *j.saturation, *j.hue] == pytest.approx([0.2, 1.8] * 3 + [-0.2, 0.2])
    assert tuple(ops[-1].std) == (0.228, 0.224, 0.225) and ops[3].p == 0.2
    small = augment.swav((32, 16), (2, 4), blur=False)
    assert 'GaussianBlur' not in str(small.transforms[3])
    img = Image.open(sorted((REPO / 'data' / 'cifar10_sample' / 'train').glob('*/*'))[0]).convert('RGB')
    random.seed(0)
    torch.manual_seed(0)
    assert [tuple(x.shape) for x in small(img)] == [(3, 32, 32)] * 2 + [(3, 16, 16)] * 4
    assert batch_aug.from_transform(small).n_views == 6  # --device-aug reads it view by view


# ---------------------------------------------------------------- end to end


def test_resume_is_bitwise_with_the_queue(tmp_path):
    """3 epochs of 2 steps, the queue (2 batches) created at epoch 1, full and used from epoch 2; stop
    after step 3 (mid-epoch 1, queue half filled) and resume == straight, bitwise: weights, LARC
    momenta, the queue, the losses."""
    data = make_subset(tmp_path / 'data', 2)  # 20 images: 2 batches of 8
    args = [data, *TINY, '--epochs', '3', '--batch-size', '8', '--queue-length', '16', '--epoch-queue-starts', '1',
            '--deterministic', '--save-freq', '1']
    (a, b), (la, lb) = stop_and_resume(swav.main, args, tmp_path, 3)
    assert len(la) == 6 and la == lb
    for k in a['model']:
        assert torch.equal(a['model'][k], b['model'][k]), k
    sa, sb = a['optimizer']['state'], b['optimizer']['state']
    assert sa.keys() == sb.keys() and sa
    for k in sa:
        assert torch.equal(sa[k]['momentum_buffer'], sb[k]['momentum_buffer']), k
    qa, qb = a['extra']['queue'], b['extra']['queue']
    assert qa.shape == (1, 2, 16, 16) and torch.equal(qa, qb) and not torch.all(qa[0, :, -1] == 0)
    e1 = torch.load(tmp_path / 'a' / 'checkpoint_0001.pth', weights_only=True)
    assert e1['extra']['queue'] is None  # no queue before epoch 1
    import json
    used = [r['queue_used'] for r in map(json.loads, open(tmp_path / 'a' / 'log.jsonl')) if r['type'] == 'train']
    assert used == [0, 0, 0, 0, 1, 1]  # epoch 1 fills it, epoch 2 uses it


def _record_driver(tmp_path):
    """A swav.main wrapper that saves every (scores, codes) pair of this rank's Sinkhorn calls."""
    driver = tmp_path / 'driver.py'
    driver.write_text(
        f'import os, sys, torch\nsys.path.insert(0, {str(REPO)!r})\nimport swav\nseen = []\norig = swav.sinkhorn\n'
        f'def record(out, *a):\n    q = orig(out, *a)\n    seen.append((out.clone(), q.clone()))\n    return q\n'
        f'swav.sinkhorn = record\nswav.main(sys.argv[1:])\n'
        f'torch.save(seen, os.path.join({str(tmp_path)!r}, "seen_%s.pt" % os.environ["RANK"]))\n')
    return driver


def test_torchrun_two_processes_sinkhorn_queue_and_resume(tmp_path):
    """2 gloo processes, batch 8 (4 each), 2 steps per epoch, a queue of 16 (8 per process) from epoch 1:
    (1) each rank's codes equal the matching rows of one process's Sinkhorn on both ranks' scores
    (queue rows included) in float64; (2) stopped after step 3 and resumed == straight, bitwise, each
    rank's queue included; (3) resuming that checkpoint on 1 process is refused in one line."""
    data = make_subset(tmp_path / 'data', 2)
    rec = tmp_path / 'rec'
    rec.mkdir()
    driver = _record_driver(rec)
    common = [data, *TINY, '--epochs', '3', '--batch-size', '8', '--queue-length', '16', '--epoch-queue-starts', '1']
    torchrun(2, driver, *common, '--output-dir', tmp_path / 'a')
    seen = {r: torch.load(rec / f'seen_{r}.pt') for r in (0, 1)}
    assert len(seen[0]) == len(seen[1]) == 12  # 6 steps x 2 coded crops
    sizes = [s.shape[0] for s, _ in seen[0]]
    assert sizes == [4] * 8 + [12] * 4  # the queue's 8 rows per process join in epoch 2
    for (s0, q0), (s1, q1) in zip(seen[0], seen[1]):
        whole = swav.sinkhorn(torch.cat([s0, s1]).double())  # one process, all 2M samples
        m = s0.shape[0]
        assert torch.allclose(q0.double(), whole[:m], atol=1e-6) and torch.allclose(q1.double(), whole[m:], atol=1e-6)
        q0_64 = swav.sinkhorn(s0.double())  # rank 0 alone: differs (the all-reduce matters)
        assert not torch.allclose(q0_64, whole[:m], atol=1e-4)
    # float64 on the real group: the same at ~1e-12
    f64 = tmp_path / 'f64.py'
    f64.write_text(
        f'import os, sys, torch\nsys.path.insert(0, {str(REPO)!r})\nimport swav\nfrom common import dist\n'
        f'dist.init_distributed("cpu")\nr = dist.get_rank()\ng = torch.Generator().manual_seed(0)\n'
        f'x = torch.randn(10, 7, dtype=torch.float64, generator=g) * 0.3\n'
        f'torch.save(swav.sinkhorn(x[5 * r:5 * (r + 1)]), os.path.join({str(tmp_path)!r}, "q%d.pt" % r))\n'
        f'dist.cleanup()\n')
    torchrun(2, f64)
    g = torch.Generator().manual_seed(0)
    whole = swav.sinkhorn(torch.randn(10, 7, dtype=torch.float64, generator=g) * 0.3)
    got = torch.cat([torch.load(tmp_path / f'q{r}.pt') for r in (0, 1)])
    assert (got - whole).abs().max().item() < 1e-12
    # resume across the queue's creation, bitwise
    torchrun(2, 'swav.py', *common, '--output-dir', tmp_path / 'b', '--max-steps', '3')
    torchrun(2, 'swav.py', *common, '--output-dir', tmp_path / 'b', '--resume', 'auto')
    a, b = (torch.load(tmp_path / d / 'checkpoint_last.pth', weights_only=True) for d in 'ab')
    for k in a['model']:
        assert torch.equal(a['model'][k], b['model'][k]), k
    qa, qb = a['extra']['queue'], b['extra']['queue']
    assert qa.shape == (2, 2, 8, 16) and torch.equal(qa, qb) and not torch.equal(qa[0], qa[1])
    msg = refused(swav.main, [str(data), *map(str, common[1:]), '--resume', str(tmp_path / 'a' / 'checkpoint_last.pth'),
                              '--output-dir', str(tmp_path / 'c')])
    assert 'holds the queues of 2 processes and this run has 1' in msg


def test_adam_option(data64, tmp_path):
    """--optimizer adam (lightly's CIFAR-10 SwaV): plain Adam on every parameter under the same per-iteration
    schedule; the frozen first step leaves the prototypes without Adam state, so after 2 steps their
    Adam step count is 1 and the backbone's 2."""
    swav.main([str(data64), *TINY, '--epochs', '1', '--batch-size', '16', '--max-steps', '2', '--optimizer', 'adam',
               '--base-lr', '0.002', '--final-lr', '0', '--start-warmup', '0.001', '--wd', '1e-5', '--output-dir',
               str(tmp_path)])
    ck = torch.load(tmp_path / 'checkpoint_last.pth', weights_only=True)
    (group,) = ck['optimizer']['param_groups']
    lrs = swav.lr_schedule(0.002, 0., 1, 4, 1, 0.001)  # 64 images / 16 = 4 iterations, all warm-up
    assert group['weight_decay'] == 1e-5 and group['lr'] == pytest.approx(lrs[1]) and 'momentum' not in group
    names = [n for n, _ in swav.SwAV(build_resnet('resnet10', 0, 8, cifar_stem=True), 32, 16, 20).named_parameters()]
    steps = {names[i]: float(st['step']) for i, st in ck['optimizer']['state'].items()}
    assert steps['prototypes.weight'] == 1 and steps['backbone.conv1.weight'] == 2
    assert all('exp_avg_sq' in st for st in ck['optimizer']['state'].values())


def test_device_aug_trains(data64, tmp_path):
    swav.main([str(data64), *TINY, '--epochs', '1', '--batch-size', '16', '--max-steps', '1', '--device-aug', 'memory',
               '--output-dir', str(tmp_path)])
    sd = torch.load(tmp_path / 'backbone.pth', weights_only=True)
    assert 'conv1.weight' in sd and not any(k.startswith(('fc.', 'projection_head', 'prototypes')) for k in sd)


@pytest.mark.parametrize('extra, message', [
    (['--size-crops', '32'], '--size-crops has 1 values but --nmb-crops 2'),
    (['--crops-for-assign', '0', '4'], '--crops-for-assign [0, 4] must name crops 0..3'),
    (['--queue-length', '8'], '--queue-length 8 is shorter than the batch (16)'),
    (['--warmup-epochs', '3'], '--warmup-epochs 3 is longer than the run (--epochs 2)'),
])
def test_bad_input_one_line(data64, tmp_path, extra, message):
    msg = refused(swav.main, [str(data64), *TINY, '--epochs', '2', '--batch-size', '16', *extra,
                              '--output-dir', str(tmp_path)])
    assert message in msg
