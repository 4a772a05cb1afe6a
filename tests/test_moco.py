"""MoCo model, loss and queue on tiny tensors with injected weights; ShuffleBN; SplitBatchNorm."""
import math

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from common import dist
from common.resnet import SplitBatchNorm, build_resnet
from conftest import REPO
from moco import MoCo, parse_args


class Linear(nn.Module):
    """Encoder without BN: fc(x), so every number below can be written out by hand."""

    def __init__(self, num_classes, d_in=2):
        super().__init__()
        self.fc = nn.Linear(d_in, num_classes, bias=False)

    def forward(self, x):
        return self.fc(x)


def tiny_moco(K=4, m=0.5, T=0.5, dim=2):
    model = MoCo(lambda num_classes: Linear(num_classes), dim=dim, K=K, m=m, T=T)
    return model


def test_logits_loss_by_hand():
    model = tiny_moco(K=4, m=0.5, T=0.5)
    with torch.no_grad():
        model.encoder_q.fc.weight.copy_(torch.eye(2))
        model.encoder_k.fc.weight.copy_(torch.eye(2))
        model.queue.copy_(torch.tensor([[1., 0., -1., 0.], [0., 1., 0., -1.]]))  # columns e1, e2, -e1, -e2
    x_q = torch.tensor([[2., 0.]])  # q = (1, 0)
    x_k = torch.tensor([[3., 4.]])  # k = (0.6, 0.8)
    logits, labels = model(x_q, x_k)
    # l_pos = 0.6, l_neg = (1, 0, -1, 0); /T = x2
    assert torch.allclose(logits, torch.tensor([[1.2, 2.0, 0.0, -2.0, 0.0]]))
    assert labels.tolist() == [0]
    loss = F.cross_entropy(logits, labels)
    expected = -1.2 + math.log(math.exp(1.2) + math.exp(2) + 1 + math.exp(-2) + 1)
    assert loss.item() == pytest.approx(expected, rel=1e-6)
    # the key was enqueued at column 0 (after the logits were formed), pointer advanced by 1
    assert torch.allclose(model.queue[:, 0], torch.tensor([0.6, 0.8]))
    assert model.queue_ptr.item() == 1


def test_key_encoder_updated_before_keys_and_no_grad():
    m = 0.75
    model = tiny_moco(K=4, m=m)
    wq = torch.tensor([[1., 2.], [0., 1.]])
    wk = torch.tensor([[0., 1.], [1., 0.]])
    with torch.no_grad():
        model.encoder_q.fc.weight.copy_(wq)
        model.encoder_k.fc.weight.copy_(wk)
    x = torch.tensor([[1., 1.], [2., -1.]])
    logits, labels = model(x, x)
    w_new = m * wk + (1 - m) * wq  # 0.75*[[0,1],[1,0]] + 0.25*[[1,2],[0,1]] = [[.25,1.25],[.75,.25]]
    assert torch.allclose(model.encoder_k.fc.weight, torch.tensor([[.25, 1.25], [.75, .25]]))
    k_expected = F.normalize(x @ w_new.T, dim=1)
    assert torch.allclose(model.queue[:, :2].T, k_expected, atol=1e-6)  # keys from the *updated* encoder
    k_stale = F.normalize(x @ wk.T, dim=1)
    assert not torch.allclose(model.queue[:, :2].T, k_stale, atol=1e-3)
    F.cross_entropy(logits, labels).backward()
    assert model.encoder_k.fc.weight.grad is None and not model.encoder_k.fc.weight.requires_grad
    assert model.encoder_q.fc.weight.grad is not None and model.encoder_q.fc.weight.grad.abs().sum() > 0


def test_queue_snapshot_ptr_and_wrap():
    model = tiny_moco(K=4, m=0.0)
    q0 = model.queue.clone()
    assert torch.allclose(q0.norm(dim=0), torch.ones(4))  # columns L2-normalised at init
    batches = [torch.randn(2, 2) for _ in range(3)]
    keys = []
    for i, x in enumerate(batches):
        before = model.queue.clone()
        logits, _ = model(x, x)
        q = F.normalize(model.encoder_q(x), dim=1)
        # negatives come from the queue as it was before this batch's enqueue
        assert torch.allclose(logits[:, 1:], q @ before / model.T, atol=1e-6)
        keys.append(F.normalize(model.encoder_k(x), dim=1).detach())
        assert model.queue_ptr.item() == (2 * (i + 1)) % 4
    # batch 0 went to columns 0-1, batch 1 to 2-3, batch 2 wrapped around onto 0-1
    assert torch.allclose(model.queue[:, 0:2].T, keys[2], atol=1e-6)
    assert torch.allclose(model.queue[:, 2:4].T, keys[1], atol=1e-6)


def test_queue_pointer_follows_load_state_dict():
    """The enqueue position is kept on the host (no device read per step) but follows a loaded
    state: after loading queue_ptr 0 over a model at 2, the next batch goes to columns 0-1."""
    model = tiny_moco(K=4, m=0.0)
    x = torch.randn(2, 2)
    model(x, x)
    assert model.queue_ptr.item() == 2
    state = model.state_dict()
    state['queue_ptr'] = torch.zeros(1, dtype=torch.long)
    model.load_state_dict(state)
    model(x, x)
    assert model.queue_ptr.item() == 2  # 0 + 2, not (2 + 2) % 4
    k = F.normalize(model.encoder_k(x), dim=1).detach()
    assert torch.allclose(model.queue[:, 0:2].T, k, atol=1e-6)


def test_shuffle_unshuffle_restores_order():
    x = torch.arange(12.).view(6, 2)
    perm = torch.tensor([3, 0, 5, 1, 4, 2])
    shuffled, idx_un = dist.batch_shuffle(x, perm)
    assert torch.equal(shuffled, x[perm])
    assert torch.equal(dist.batch_unshuffle(shuffled * 10, idx_un), x * 10)  # row-wise f commutes


def test_shufflebn_changes_split_bn_groups():
    """With SplitBatchNorm a permutation changes which samples share BN statistics (the point of
    ShuffleBN); with plain BN over the whole batch it does not change the keys."""
    torch.manual_seed(0)
    x = torch.randn(8, 3, 8, 8)
    for splits, same in ((1, True), (2, False)):
        model = MoCo(lambda num_classes: build_resnet('resnet10', num_classes, 4, True, bn_splits=splits),
                     dim=4, K=8, m=0.0)
        model(x, x, perm=torch.arange(8))
        k_id = model.queue[:, :8].clone()
        model(x, x, perm=torch.tensor([0, 2, 1, 3, 4, 5, 6, 7]))  # K=8: overwrites the same columns
        k_sw = model.queue[:, :8].clone()
        assert torch.allclose(k_id, k_sw, atol=1e-5) == same


def test_split_batchnorm_matches_per_group_bn():
    torch.manual_seed(0)
    x = torch.randn(8, 3, 4, 4)
    sbn = SplitBatchNorm(3, num_splits=2)
    with torch.no_grad():
        sbn.weight.copy_(torch.tensor([1., 2., 3.]))
        sbn.bias.copy_(torch.tensor([0., 1., -1.]))
    out = sbn(x)
    for g in range(2):  # split g holds samples g, g+2, g+4, ... (the view folds splits into channels)
        xs = x[g::2]
        mu = xs.mean((0, 2, 3), keepdim=True)
        var = xs.var((0, 2, 3), unbiased=False, keepdim=True)
        ref = (xs - mu) / torch.sqrt(var + 1e-5) * sbn.weight.view(1, 3, 1, 1) + sbn.bias.view(1, 3, 1, 1)
        assert torch.allclose(out[g::2], ref, atol=1e-5)
    # running stats: momentum 0.1 update from (0, 1), averaged over the two splits
    means = torch.stack([x[g::2].mean((0, 2, 3)) for g in range(2)])
    assert torch.allclose(sbn.running_mean, 0.1 * means.mean(0), atol=1e-6)
    sbn.eval()
    assert torch.allclose(sbn(x), nn.functional.batch_norm(x, sbn.running_mean, sbn.running_var, sbn.weight,
                                                           sbn.bias, False), atol=1e-6)


def test_split_batchnorm_channels_last():
    """A channels_last input (the CUDA layout; a plain view of it used to fail) gives the same
    output and running statistics as the NCHW input, and stays channels_last for the next conv."""
    torch.manual_seed(0)
    x = torch.randn(8, 3, 4, 4)
    a, b = SplitBatchNorm(3, num_splits=2), SplitBatchNorm(3, num_splits=2)
    out_a, out_b = a(x), b(x.contiguous(memory_format=torch.channels_last))
    assert out_b.is_contiguous(memory_format=torch.channels_last)
    assert torch.allclose(out_a, out_b, atol=1e-6)
    assert torch.allclose(a.running_mean, b.running_mean) and torch.allclose(a.running_var, b.running_var)


def test_v2_switch_and_demo_defaults():
    a = parse_args(['/data', '--v2'])
    assert (a.mlp, a.moco_t, a.aug_plus, a.cos) == (True, 0.2, True, True)
    assert parse_args(['/data', '--v2', '--moco-t', '0.1']).moco_t == 0.1  # explicit flag wins
    v1 = parse_args(['/data'])
    assert (v1.arch, v1.moco_k, v1.moco_m, v1.moco_t, v1.lr, v1.epochs, v1.schedule, v1.wd, v1.mlp) == \
        ('resnet50', 65536, 0.999, 0.07, 0.03, 200, [120, 160], 1e-4, False)
    demo = parse_args([])
    assert demo.data.endswith('cifar10_sample') and demo.cifar_stem and demo.mlp
    assert parse_args(['--epochs', '3']).epochs == 3


def test_mlp_head_shapes():
    model = MoCo(lambda num_classes: build_resnet('resnet10', num_classes, 8, True), dim=16, K=32, mlp=True)
    fc = model.encoder_q.fc
    assert [type(l) for l in fc] == [nn.Linear, nn.ReLU, nn.Linear]
    assert fc[0].weight.shape == (64, 64) and fc[2].weight.shape == (16, 64)
    assert all(torch.equal(a, b) for a, b in zip(model.encoder_q.parameters(), model.encoder_k.parameters()))


def test_split_batchnorm_kernel_budget():
    """scripts/count_step_ops.py: the eager kernels SplitBatchNorm adds to a MoCo v2 step (ResNet-18,
    channels_last; 20 BN layers per encoder, 40 training calls, 20 with a backward). By hand, per call:
    forward 4 repeats (running mean and var, weight, bias), 2 layout copies, 2 in-place means = 8;
    backward 2 sums (the repeats of weight and bias) and 1-2 layout copies. A stats copy per call
    (the means written then copied, as before) would add 80 and break the bound."""
    import sys
    sys.path.insert(0, str(REPO / 'scripts'))
    from count_step_ops import measure
    split = sum(measure('moco', 8, steps=1)[0].values())
    plain = sum(measure('moco', 1, steps=1)[0].values())
    assert 40 * 6 < split - plain <= 40 * 8 + 20 * 4, (split, plain)
