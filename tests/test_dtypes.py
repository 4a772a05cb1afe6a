"""The models run in the input's dtype (float64 is what exact comparisons use): NPID, BYOL and ODC
keep float64 end to end instead of crashing or rounding to float32; half precision still goes up to
float32 (AMP training is unchanged)."""
import pytest
import torch
import torch.nn.functional as F

from common.resnet import build_resnet


@pytest.fixture
def float64():
    old = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    yield
    torch.set_default_dtype(old)


def tiny_resnet(num_classes=0):
    return build_resnet('resnet10', num_classes, 4, True)


def test_npid_in_float64(float64):
    from npid import NPID
    torch.manual_seed(0)
    model = NPID(tiny_resnet, n_samples=8, dim=4, K=3)
    x, idx = torch.randn(2, 3, 8, 8), torch.tensor([0, 5])
    v = F.normalize(model.encoder(x), dim=1)  # 2x4, float64
    bank = model.memory.clone()
    loss, dots = model(x, idx, neg_idx=torch.tensor([[1, 2, 3], [4, 6, 7]]))
    assert loss.dtype == dots.dtype == model.memory.dtype == torch.float64
    want = torch.stack([v[0] @ bank[[0, 1, 2, 3]].T, v[1] @ bank[[5, 4, 6, 7]].T])  # positive first
    assert torch.allclose(dots, want, rtol=0, atol=1e-14)


def test_byol_loss_in_float64_and_half():
    from byol import byol_loss
    g = torch.Generator().manual_seed(0)
    p1, p2, z1, z2 = (torch.randn(5, 7, generator=g, dtype=torch.float64) for _ in range(4))

    def cos(a, b):  # row-wise, written out
        return (a * b).sum(1) / (a.pow(2).sum(1).sqrt() * b.pow(2).sum(1).sqrt())
    want = ((2 - 2 * cos(p1, z2)) + (2 - 2 * cos(p2, z1))).mean()
    got = byol_loss(p1, p2, z1, z2)
    assert got.dtype == torch.float64 and abs(got - want) < 1e-14  # float32 rounding would be ~1e-7
    half = byol_loss(*(t.to(torch.bfloat16) for t in (p1, p2, z1, z2)))
    assert half.dtype == torch.float32


def test_odc_in_float64(float64):
    from odc import ODC
    torch.manual_seed(0)
    model = ODC(tiny_resnet(), n_samples=6, k=2, hid_dim=8, dim=4)
    model.init_memory(F.normalize(torch.randn(6, 4), dim=1), torch.tensor([0, 1, 0, 1, 0, 1]))
    logits, target, weight = model(torch.randn(3, 3, 8, 8), torch.tensor([0, 2, 4]))
    assert logits.dtype == weight.dtype == model.bank.dtype == torch.float64
    loss = F.cross_entropy(logits, target, weight=weight)  # mixed float32 weights would raise here
    assert loss.dtype == torch.float64 and torch.isfinite(loss)
    assert torch.allclose(weight, torch.tensor([0.5, 0.5]), atol=1e-12)  # 3 images per cluster
