"""Checks that need a CUDA device (skipped elsewhere): the device loaders and nvJPEG decoding on the GPU,
bf16 autocast and channels_last against fp32, the multi-tensor LARS, and bitwise resume of a real
run with --device-aug on the GPU. scripts/device_check.sh runs them on a lent GPU machine."""
import json

import pytest
import torch
import torch.nn.functional as F

from common import augment, data, optim
from common.resnet import build_resnet
from conftest import TINY, python

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason='needs CUDA')
SMALL = TINY + ['--batch-size', '16', '--moco-k', '32', '--bn-splits', '2', '--device', 'cuda']


def test_loaders_on_cuda_equal_cpu(data64):
    """memory / files / jpeg loaders on CUDA: the memory and files batches equal the CPU's to float
    rounding (same generator draws); nvJPEG decoding differs from PIL's decoder by a level or two. On
    CUDA the batches come from the prefetch thread's stream (the default there); without it
    (prefetch 0) they are the same, bitwise, for every batch of the epoch."""
    aug = augment.MultiView(augment.moco_v2(32, blur=False), augment.byol(32, 1, blur=False))  # no solarize: a 1-ulp difference at its threshold would flip a pixel
    batches, epochs = {}, {}
    for dev, mode, depth in (('cpu', 'files', 0), ('cuda', 'memory', None), ('cuda', 'memory', 0),
                             ('cuda', 'files', None), ('cuda', 'jpeg', None)):
        _, s, loader = data.train_loader(data64, aug, 16, 0, 1, 0, 0, torch.device(dev), mode, prefetch=depth)
        s.set_epoch(3)
        epochs[dev, mode, depth] = [[v.cpu() for v in views] for views, _, _ in loader]
        views, _, idx = next(iter(loader))
        assert views[0].device.type == dev
        batches[dev, mode] = [v.cpu() for v in views], idx
    for a, b in zip(epochs['cuda', 'memory', None], epochs['cuda', 'memory', 0]):
        assert all(torch.equal(x, y) for x, y in zip(a, b))
    ref, ref_idx = batches['cpu', 'files']
    for key, (views, idx) in batches.items():
        assert torch.equal(idx, ref_idx), key
        for v, r in zip(views, ref):
            if key[1] == 'jpeg':
                assert (v - r).abs().mean() < 0.05, key  # normalised units
            else:
                assert (v - r).abs().max() < 1e-3, key


def _moco(seed=0):
    from moco import MoCo
    torch.manual_seed(seed)
    return MoCo(lambda num_classes: build_resnet('resnet18', num_classes, 64, True), 128, 4096, 0.99, 0.2, True)


def test_bf16_and_channels_last_close_to_fp32():
    """One MoCo v2 forward at initialisation (ResNet-18, CIFAR stem, batch 256): the loss under bf16
    autocast with channels_last inputs and weights is within 1% of fp32 NCHW (bf16 keeps 8 mantissa
    bits, ~0.4% per rounding; the loss is a mean over 256 samples), and the gradients point the same way."""
    tf32 = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False  # a true fp32 reference
    try:
        _bf16_vs_fp32()
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = tf32


def _bf16_vs_fp32():
    g = torch.Generator().manual_seed(1)
    q, k = torch.randn(2, 256, 3, 32, 32, generator=g).cuda()
    out = []
    for amp, fmt in ((False, torch.contiguous_format), (True, torch.channels_last)):
        model = _moco().cuda().to(memory_format=fmt)
        with torch.autocast('cuda', dtype=torch.bfloat16, enabled=amp):
            logits, labels = model(q.contiguous(memory_format=fmt), k.contiguous(memory_format=fmt))
            loss = F.cross_entropy(logits.float(), labels)
        loss.backward()
        grad = torch.cat([p.grad.flatten().float() for p in model.encoder_q.parameters()])
        out.append((loss.item(), grad))
    (l32, g32), (l16, g16) = out
    assert abs(l16 - l32) < 0.01 * l32, (l16, l32)
    assert F.cosine_similarity(g16, g32, dim=0) > 0.95


def test_lars_foreach_equals_loop_on_cuda():
    """The multi-tensor LARS (the CUDA default) equals the per-tensor loop on the GPU, given the same
    gradients (drawn here: CUDA convolution backward is not deterministic, so two backward passes
    would differ before the optimizer is reached)."""
    torch.manual_seed(0)
    nets = [build_resnet('resnet18', 10, 16, True).cuda() for _ in range(2)]
    nets[1].load_state_dict(nets[0].state_dict())
    opts = [optim.LARS(optim.param_groups(n, optim.LARS_EXCLUDE_RULES, log=lambda *a: None), lr=0.5,
                       weight_decay=1e-4, foreach=f) for n, f in zip(nets, (False, None))]
    for _ in range(3):
        for a, b in zip(nets[0].parameters(), nets[1].parameters()):
            a.grad = torch.randn_like(a) * 1e-2
            b.grad = a.grad.clone()
        for o in opts:
            o.step()
    for a, b in zip(nets[0].parameters(), nets[1].parameters()):
        assert torch.allclose(a, b, rtol=1e-5, atol=1e-7)


def test_moco_resume_on_cuda_is_exact(data64, tmp_path):
    """moco.py on the GPU with --device-aug memory, bf16 and --deterministic: 3 steps, stop, resume,
    3 steps == 6 steps straight, bitwise (losses and weights)."""
    common = [data64, *SMALL, '--epochs', '2', '--deterministic', '--device-aug', 'memory', '--amp', 'bf16']
    python('moco.py', *common, '--output-dir', tmp_path / 'a', '--max-steps', '6')
    python('moco.py', *common, '--output-dir', tmp_path / 'b', '--max-steps', '3')
    python('moco.py', *common, '--output-dir', tmp_path / 'b', '--max-steps', '6', '--resume', 'auto')
    recs = [[json.loads(line) for line in open(tmp_path / d / 'log.jsonl') if '"train"' in line] for d in 'ab']
    assert [r['loss'] for r in recs[0]] == [r['loss'] for r in recs[1]] and len(recs[0]) == 6
    a, b = (torch.load(tmp_path / d / 'checkpoint_last.pth', weights_only=True) for d in 'ab')
    for n in a['model']:
        assert torch.equal(a['model'][n], b['model'][n]), n
