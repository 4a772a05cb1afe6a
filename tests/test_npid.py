"""npid.py: softmax and NCE objectives and the memory-bank update by hand, negative sampling, then end
to end on real images: 2-process torchrun (identical banks, kNN monitors, eval/knn.py on the
checkpoint) and exact resume."""
import json
import math

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from conftest import REPO, python, torchrun
from npid import NPID, nce_loss, parse_args, softmax_loss

SMALL = ['--arch', 'resnet10', '--width', '8', '--cifar-stem', '--crop-size', '32', '--npid-dim', '16',
         '--workers', '0', '--print-freq', '1', '--seed', '0', '--batch-size', '16', '--npid-k', '32']


class Linear(nn.Module):
    """Encoder without BN: fc(x), so every number below can be written out by hand."""

    def __init__(self, num_classes, d_in=2):
        super().__init__()
        self.fc = nn.Linear(d_in, num_classes)

    def forward(self, x):
        return self.fc(x)


def tiny_npid(**kw):
    """Bank of 4 unit rows e1, e2, -e1, (0.6, 0.8); identity encoder."""
    model = NPID(lambda num_classes: Linear(num_classes), n_samples=4, dim=2, K=2, T=0.5, **kw)
    with torch.no_grad():
        model.encoder.fc.weight.copy_(torch.eye(2))
        model.encoder.fc.bias.zero_()
        model.memory.copy_(torch.tensor([[1., 0.], [0., 1.], [-1., 0.], [0.6, 0.8]]))
    return model


def ckpt(d, name='checkpoint_last.pth'):
    return torch.load(d / name, map_location='cpu', weights_only=True)


def records(d, kind):
    return [r for r in map(json.loads, open(d / 'log.jsonl')) if r['type'] == kind]


# ============ objectives and bank ============


def test_softmax_loss_and_update_by_hand():
    model = tiny_npid(m=0.5)
    x = torch.tensor([[2., 0.]])  # v = (1, 0)
    loss, dots = model(x, torch.tensor([3]), neg_idx=torch.tensor([[1, 2]]))
    # positive m_3 = (0.6, 0.8), negatives m_1 = e2, m_2 = -e1: dots (0.6, 0, -1); /T = x2
    assert torch.allclose(dots, torch.tensor([[0.6, 0.0, -1.0]]))
    assert loss.item() == pytest.approx(-1.2 + math.log(math.exp(1.2) + 1 + math.exp(-2)), rel=1e-6)
    # after the loss: m_3 <- normalize(0.5 (0.6, 0.8) + 0.5 (1, 0)) = normalize(0.8, 0.4); others untouched
    assert torch.allclose(model.memory[3], F.normalize(torch.tensor([0.8, 0.4]), dim=0))
    assert torch.equal(model.memory[:3], torch.tensor([[1., 0.], [0., 1.], [-1., 0.]]))
    loss.backward()  # the loss saw the bank before the update; gradients reach only the encoder
    assert model.encoder.fc.weight.grad.abs().sum() > 0 and not model.memory.requires_grad


def test_bank_momentum_weights_the_new_feature():
    """OSS meaning of mu (methods.md §4.3): m <- normalize((1 - mu) m + mu v)."""
    model = tiny_npid(m=0.25)
    model(torch.tensor([[2., 0.]]), torch.tensor([3]), neg_idx=torch.tensor([[1, 2]]))
    assert torch.allclose(model.memory[3], F.normalize(torch.tensor([0.75 * 0.6 + 0.25, 0.75 * 0.8]), dim=0))


def test_nce_by_hand_and_z_fixed_after_the_first_batch():
    model = tiny_npid(nce=True)
    assert model.nce_z.item() < 0
    loss, dots = model(torch.tensor([[2., 0.]]), torch.tensor([3]), neg_idx=torch.tensor([[1, 2]]))
    e = [math.exp(1.2), 1.0, math.exp(-2.0)]  # exp(dots / T)
    z = sum(e) / 3 * 4  # mean over the batch's 1+K entries x N
    assert model.nce_z.item() == pytest.approx(z, rel=1e-6)
    p = [v / z for v in e]
    kpn = 2 / 4  # K x noise probability 1/N
    want = -(math.log(p[0] / (p[0] + kpn + 1e-7)) + math.log(kpn / (p[1] + kpn + 1e-7))
             + math.log(kpn / (p[2] + kpn + 1e-7)))
    assert loss.item() == pytest.approx(want, rel=1e-6)
    assert nce_loss(dots, 0.5, z, 4).item() == pytest.approx(want, rel=1e-6)
    # a second batch keeps Z, and Z is a buffer (saved in checkpoints)
    model(torch.tensor([[0., 3.]]), torch.tensor([1]), neg_idx=torch.tensor([[0, 2]]))
    assert model.nce_z.item() == pytest.approx(z, rel=1e-6) and 'nce_z' in model.state_dict()


def test_softmax_loss_is_ce_with_label_zero():
    dots = torch.tensor([[0.5, 0.1, -0.3], [0.2, 0.9, 0.0]])
    want = sum(-dots[i, 0] / 0.1 + torch.logsumexp(dots[i] / 0.1, 0) for i in range(2)) / 2
    assert softmax_loss(dots, 0.1).item() == pytest.approx(want.item(), rel=1e-6)


def test_dots_equal_gathered_rows():
    """The BxN product picked at the drawn indices equals OSS's bmm over the gathered BxKxD rows."""
    torch.manual_seed(0)
    model = NPID(lambda num_classes: Linear(num_classes, 6), n_samples=10, dim=4, K=7, T=0.1)
    x, idx = torch.randn(3, 6), torch.tensor([4, 0, 9])
    neg = model.draw_negatives(idx)
    bank = model.memory.clone()
    _, dots = model(x, idx, neg_idx=neg)
    v = model.embed(x)
    rows = bank[torch.cat([idx[:, None], neg], 1)]  # 3x8x4
    assert torch.allclose(dots, torch.einsum('nkc,nc->nk', rows, v), atol=1e-6)


def test_negatives_generator_and_ensure_neg():
    idx = torch.tensor([0, 1, 2])
    draws = []
    for ensure in (False, True, False):
        model = NPID(lambda num_classes: Linear(num_classes), n_samples=3, dim=2, K=64, ensure_neg=ensure,
                     generator=torch.Generator().manual_seed(1))
        draws.append(model.draw_negatives(idx))
    assert torch.equal(draws[0], draws[2])  # the injected generator fixes the draws
    assert ((draws[0] == idx[:, None]).sum() > 0) and (draws[0] < 3).all()  # the positive may be drawn
    assert (draws[1] != idx[:, None]).all()  # not with --ensure-neg


def test_parse_args_defaults():
    a = parse_args(['/data'])
    assert (a.arch, a.npid_dim, a.npid_k, a.npid_t, a.npid_m, a.lr, a.wd, a.momentum, a.epochs, a.schedule,
            a.batch_size, a.nce, a.ensure_neg) == \
        ('resnet50', 128, 65536, 0.07, 0.5, 0.03, 1e-4, 0.9, 200, [120, 160], 256, False, False)
    assert parse_args(['/data', '--nce']).npid_k == 4096
    assert parse_args(['/data', '--nce', '--npid-k', '100']).npid_k == 100  # explicit flag wins
    demo = parse_args([])
    assert demo.data.endswith('cifar10_sample') and demo.cifar_stem and demo.arch == 'resnet10'
    assert parse_args(['--epochs', '3']).epochs == 3


# ============ end to end ============


def test_torchrun_two_processes_and_eval_knn(data64, tmp_path):
    """2 gloo processes: the bank is identical on both ranks (each updates with the gathered batch), the
    kNN monitors run, and eval/knn.py accepts the checkpoint."""
    driver = tmp_path / 'driver.py'
    driver.write_text(
        f'import os, sys, torch\nsys.path.insert(0, {str(REPO)!r})\nimport npid\n'
        f'core = npid.main(sys.argv[1:])\n'
        f'torch.save(core.memory, os.path.join({str(tmp_path)!r}, "bank_%s.pt" % os.environ["RANK"]))\n')
    out = tmp_path / 'out'
    p = torchrun(2, driver, data64, *SMALL, '--epochs', '2', '--knn-every', '2', '--output-dir', out)
    assert 'world size 2' in p.stdout and '(8 per process)' in p.stdout
    b0, b1 = torch.load(tmp_path / 'bank_0.pt'), torch.load(tmp_path / 'bank_1.pt')
    assert b0.shape == (64, 16) and torch.equal(b0, b1)
    assert torch.allclose(b0.norm(dim=1), torch.ones(64), atol=1e-5)
    c = ckpt(out)
    assert torch.equal(c['model']['memory'], b0) and c['backbone_prefix'] == 'encoder.' and len(c['rng']) == 2
    knn = records(out, 'knn')[-1]
    assert 0 <= knn['knn_bank'] <= 100 and 0 <= knn['knn_top1'] <= 100
    assert 'weighted kNN top-1 (k=200): trained' in p.stdout
    assert len(records(out, 'train')) == 8  # one writer
    for f in ('checkpoint_last.pth', 'backbone.pth'):
        e = python('eval/knn.py', '--pretrained', out / f, data64, '--workers', '0', '--device', 'cpu',
                   '--output-dir', tmp_path)
        assert 'top-1' in e.stdout


def test_resume_is_exact(data64, tmp_path):
    """NCE with --ensure-neg, 3 steps + stop + resume (mid-epoch) == 8 steps straight, bitwise: the bank,
    Z and the negatives' RNG are restored."""
    args = [data64, *SMALL, '--nce', '--ensure-neg', '--epochs', '2', '--deterministic']
    a, b = tmp_path / 'a', tmp_path / 'b'
    python('npid.py', *args, '--output-dir', a)
    python('npid.py', *args, '--output-dir', b, '--max-steps', '3')
    assert (ckpt(b)['epoch'], ckpt(b)['iter']) == (0, 3)
    p = python('npid.py', *args, '--output-dir', b, '--resume', 'auto')
    assert 'resumed from' in p.stdout and 'iteration 3' in p.stdout
    ca, cb = ckpt(a), ckpt(b)
    assert ca['model']['nce_z'] > 0
    for k in ca['model']:
        assert torch.equal(ca['model'][k], cb['model'][k]), k
    for k, s in ca['optimizer']['state'].items():
        assert torch.equal(s['momentum_buffer'], cb['optimizer']['state'][k]['momentum_buffer'])
    assert [r['loss'] for r in records(a, 'train')] == [r['loss'] for r in records(b, 'train')]


def test_startup_errors(data64, tmp_path):
    import npid
    with pytest.raises(SystemExit, match='need at least 1 negative'):
        npid.main([str(data64), *SMALL, '--npid-k', '0', '--output-dir', str(tmp_path)])
    with pytest.raises(SystemExit, match='does not exist'):
        npid.main([str(tmp_path / 'nope'), *SMALL, '--output-dir', str(tmp_path)])
