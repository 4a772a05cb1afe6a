"""mae.py: masking, patchify/unpatchify, the normalised-pixel target and the masked-only loss by hand;
the encoder on the visible tokens; MAE's init and sin-cos table (common/vit); the weight-decay groups
and LR schedule; exact resume with gradient accumulation on real images; the reconstruction PNG; a real
2-process torchrun; bad input in one line."""
import json
import math

import pytest
import torch
import torch.nn as nn
from PIL import Image

from common import checkpoint, vit
from common.optim import warmup_cosine
from conftest import refused, stop_and_resume, torchrun
from mae import (MAE, augmentation, build_model, mae_loss, main, parse_args, patchify, pixel_target,
                 random_masking, unpatchify, weight_decay_groups)

TINY = ['--arch', 'vit_tiny', '--crop-size', '8', '--patch-size', '4', '--decoder-dim', '16', '--decoder-depth', '1',
        '--decoder-heads', '2', '--workers', '0', '--print-freq', '1', '--seed', '0', '--batch-size', '16',
        '--warmup-epochs', '1', '--vis-every', '1', '--vis-images', '4']


def records(d, kind):
    return [r for r in map(json.loads, open(d / 'log.jsonl')) if r['type'] == kind]


# ============ the pieces by hand ============


def test_random_masking_by_hand():
    """L = 4, ratio 0.75: the one patch with the smallest noise is kept; the mask (1 = removed) is in
    patch order; ids_restore undoes the sort."""
    x = torch.arange(2 * 4 * 2, dtype=torch.float64).view(2, 4, 2)  # token j of sample i = [8i+2j, 8i+2j+1]
    noise = torch.tensor([[0.5, 0.1, 0.9, 0.3], [0.2, 0.8, 0.6, 0.4]])
    kept, mask, restore = random_masking(x, 0.75, noise)
    assert torch.equal(kept, torch.tensor([[[2., 3.]], [[8., 9.]]], dtype=torch.float64))  # patch 1 / patch 0
    assert torch.equal(mask, torch.tensor([[1., 0., 1., 1.], [0., 1., 1., 1.]], dtype=torch.float64))
    assert torch.equal(restore, torch.tensor([[2, 0, 3, 1], [0, 3, 2, 1]]))  # rank of each patch's noise
    kept, mask, _ = random_masking(x, 0.5, noise)  # two kept, ascending noise: patches 1, 3 / 0, 3
    assert torch.equal(kept[0], x[0, [1, 3]]) and torch.equal(kept[1], x[1, [0, 3]])
    assert mask.sum(1).tolist() == [2, 2]


def test_patchify_unpatchify_by_hand():
    """A 3x4x4 image, patch 2: patch 1 (row 0, column 1) holds pixels (r, c) in {0,1}x{2,3}, each as its
    3 channels, row in patch first, then column, then channel."""
    img = torch.arange(3 * 4 * 4, dtype=torch.float64).view(1, 3, 4, 4)  # value = 16 c + 4 r + col
    x = patchify(img, 2)
    assert x.shape == (1, 4, 12)
    want = [16 * c + 4 * r + col for r in (0, 1) for col in (2, 3) for c in range(3)]
    assert x[0, 1].tolist() == want
    assert x[0, 2].tolist() == [16 * c + 4 * r + col for r in (2, 3) for col in (0, 1) for c in range(3)]
    assert torch.equal(unpatchify(x, 2, (2, 2)), img)
    wide = torch.randn(2, 3, 8, 12)
    assert torch.equal(unpatchify(patchify(wide, 4), 4, (2, 3)), wide)


def test_norm_pix_target_by_hand():
    """Patch values 0..11 of a 3x2x2 patch: mean 5.5, unbiased variance 13, target (v - 5.5)/sqrt(13 + 1e-6)."""
    img = torch.tensor([[[[0., 3.], [6., 9.]], [[1., 4.], [7., 10.]], [[2., 5.], [8., 11.]]]], dtype=torch.float64)
    assert patchify(img, 2)[0, 0].tolist() == list(map(float, range(12)))
    t = pixel_target(img, 2, norm_pix=True)[0, 0]
    assert torch.allclose(t, (torch.arange(12.).double() - 5.5) / math.sqrt(13 + 1e-6), atol=1e-12)
    assert torch.equal(pixel_target(img, 2, norm_pix=False), patchify(img, 2))


def test_masked_only_loss_by_hand():
    """Per-patch mean of the squared error, averaged over the removed patches only: patches 0 and 2 of
    sample 0 (errors 1 and 4 per value) and patch 1 of sample 1 (9): (1 + 4 + 9) / 3. The kept patches'
    large errors do not count."""
    target = torch.zeros(2, 3, 2)
    pred = torch.tensor([[[1., -1.], [100., 100.], [2., 2.]], [[50., 50.], [3., -3.], [70., 0.]]])
    mask = torch.tensor([[1., 0., 1.], [0., 1., 0.]])
    assert mae_loss(pred, target, mask).item() == pytest.approx(14 / 3)
    pred.requires_grad_(True)
    mae_loss(pred, target, mask).backward()
    assert torch.count_nonzero(pred.grad[mask == 0]) == 0 and torch.count_nonzero(pred.grad[mask == 1]) == 6


def tiny_mae(norm_pix=True):
    torch.manual_seed(0)
    enc = vit.VisionTransformer(img_size=16, patch_size=4, embed_dim=32, depth=2, num_heads=4, init='mae',
                                pos_embed='sincos_mae')
    return MAE(enc, decoder_dim=16, decoder_depth=1, decoder_heads=2, norm_pix_loss=norm_pix)


def test_encoder_sees_visible_tokens_only():
    """16 patches at ratio 0.75: the encoder's blocks get cls + 4 tokens, which are patch_embed + the
    table rows of the kept patches (cls + pos_embed[0] first); the decoder predicts all 16 patches; the
    loss is mae_loss of those predictions against the norm-pix target; the frozen tables get no grad."""
    model = tiny_mae()
    imgs, noise = torch.randn(3, 3, 16, 16), torch.rand(3, 16)
    seen = {}
    model.encoder.blocks[0].register_forward_pre_hook(lambda m, a: seen.setdefault('x', a[0]))
    loss, pred, mask = model(imgs, noise)
    keep = noise.argsort(1)[:, :4]
    enc = model.encoder
    tokens = enc.patch_embed(imgs) + enc.pos_embed[:, 1:]
    want = torch.cat([(enc.cls_token + enc.pos_embed[:, :1]).expand(3, -1, -1),
                      torch.stack([tokens[i, keep[i]] for i in range(3)])], 1)
    assert seen['x'].shape == (3, 5, 32) and torch.allclose(seen['x'], want, atol=1e-6)
    assert pred.shape == (3, 16, 48) and mask.sum(1).tolist() == [12, 12, 12]
    assert loss.item() == pytest.approx(mae_loss(pred, pixel_target(imgs, 4), mask).item(), rel=1e-6)
    loss.backward()
    assert enc.pos_embed.grad is None and model.decoder_pos_embed.grad is None
    assert model.mask_token.grad.abs().sum() > 0 and enc.cls_token.grad.abs().sum() > 0


def test_mae_init_and_table():
    """common/vit init='mae': Xavier-uniform bounds sqrt(6/(fan_in + fan_out)) with qkv as one 3DxD
    matrix, the patch conv as a D x 3p^2 Linear (bias at PyTorch's default, not zero), cls and mask
    tokens N(0, 0.02); MAE's table columns first, by hand; read back as 'sincos_mae'."""
    torch.manual_seed(0)
    enc = vit.VisionTransformer(img_size=32, patch_size=4, embed_dim=192, depth=2, num_heads=3, init='mae',
                                pos_embed='sincos_mae')
    model = MAE(enc, decoder_dim=64, decoder_depth=1, decoder_heads=4)
    for name, m in model.named_modules():
        if isinstance(m, nn.Linear):
            bound = math.sqrt(6 / sum(m.weight.shape))
            assert 0.97 * bound < m.weight.abs().max() <= bound and torch.count_nonzero(m.bias) == 0, name
    w = enc.patch_embed.proj.weight
    assert 0.97 * math.sqrt(6 / (48 + 192)) < w.abs().max() <= math.sqrt(6 / (48 + 192))
    assert torch.count_nonzero(enc.patch_embed.proj.bias) == 192  # PyTorch's default, as the reference
    for t in (enc.cls_token, model.mask_token):
        assert 0.015 < t.std() < 0.025 and not torch.equal(t, torch.zeros_like(t))
    t = vit.sincos_pos_embed(8, (2, 3), dtype=torch.float64, cols_first=True)  # F = 2, w = 1, 1/100
    r, c = 1, 2  # patch 5
    want = [math.sin(c), math.sin(c / 100), math.cos(c), math.cos(c / 100),
            math.sin(r), math.sin(r / 100), math.cos(r), math.cos(r / 100)]
    assert t.shape == (1, 7, 8) and torch.allclose(t[0, 1 + 3 * r + c], torch.tensor(want, dtype=torch.float64))
    assert torch.count_nonzero(t[0, 0]) == 0
    assert not enc.pos_embed.requires_grad and not model.decoder_pos_embed.requires_grad
    cfg = vit.infer_vit_config(enc.state_dict())
    assert cfg['pos_embed'] == 'sincos_mae' and cfg['num_heads'] == 3
    moco = vit.VisionTransformer(img_size=32, patch_size=4, embed_dim=192, depth=1, num_heads=3, pos_embed='sincos')
    assert vit.infer_vit_config(moco.state_dict())['pos_embed'] == 'sincos'  # unchanged for MoCo v3's table
    assert not torch.allclose(moco.pos_embed, enc.pos_embed)


def test_weight_decay_groups_and_lr():
    """Biases and 1-D parameters (LayerNorms) without decay; the cls and mask tokens and every weight
    matrix (patch conv included) with it; the frozen tables in neither. LR: MAE's warm-up + cosine."""
    model = tiny_mae()
    no_decay, decay = weight_decay_groups(model, 0.05)
    names = {id(p): n for n, p in model.named_parameters()}
    nd, d = {names[id(p)] for p in no_decay['params']}, {names[id(p)] for p in decay['params']}
    assert (no_decay['weight_decay'], decay['weight_decay']) == (0., 0.05)
    assert {'encoder.cls_token', 'mask_token', 'encoder.patch_embed.proj.weight', 'decoder_embed.weight'} <= d
    assert {'encoder.patch_embed.proj.bias', 'encoder.norm.weight', 'decoder_norm.bias'} <= nd
    assert all(n.endswith('.bias') or model.get_parameter(n).ndim == 1 for n in nd)
    assert all(model.get_parameter(n).ndim > 1 for n in d)
    assert 'encoder.pos_embed' not in nd | d and 'decoder_pos_embed' not in nd | d
    assert len(nd | d) == sum(p.requires_grad for p in model.parameters())
    assert warmup_cosine(1.0, 0, 40, 800) == 0 and warmup_cosine(1.0, 20, 40, 800) == pytest.approx(0.5)
    assert warmup_cosine(1.0, 420, 40, 800) == pytest.approx(0.5)
    assert warmup_cosine(1.0, 420, 40, 800, min_lr=0.2) == pytest.approx(0.6)
    assert warmup_cosine(1.0, 800, 40, 800) == pytest.approx(0, abs=1e-12)


def test_recipe_and_augmentation():
    a = parse_args(['/d'])
    assert (a.arch, a.mask_ratio, a.norm_pix_loss, a.decoder_dim, a.decoder_depth, a.decoder_heads, a.lr,
            a.batch_size, a.accum_iter, a.epochs, a.warmup_epochs, a.min_lr, a.wd, a.crop_min, a.crop_size) == \
        ('vit_large', 0.75, True, 512, 8, 16, 1.5e-4, 4096, 1, 800, 40, 0., 0.05, 0.2, 224)
    model = build_model(parse_args(['/d', '--arch', 'vit_tiny', '--crop-size', '32', '--decoder-depth', '1']))
    assert model.patch_size == 4 and model.grid == (8, 8) and model.decoder_pred.out_features == 48
    assert model.decoder_blocks[0].attn.num_heads == 16 and model.decoder_embed.weight.shape == (512, 192)
    t = augmentation(224)
    assert [type(o).__name__ for o in t.transforms] == ['RandomResizedCrop', 'RandomHorizontalFlip', 'ToTensor',
                                                        'Normalize']
    assert t.transforms[0].scale == (0.2, 1.0) and t.transforms[0].interpolation.value == 'bicubic'
    demo = parse_args([])
    assert demo.data.endswith('cifar10_sample') and demo.arch == 'vit_tiny' and demo.crop_size == 32
    assert (demo.epochs, demo.warmup_epochs, demo.lr, demo.batch_size) == (20, 1, 1.5e-3, 128)


def test_bad_input_one_line(tmp_path, capsys):
    base = ['/nonexistent', '--arch', 'vit_tiny', '--output-dir', str(tmp_path / 'o')]
    assert "--crop-size 30 is not a multiple of --patch-size 4" in refused(main, [*base, "--crop-size", "30"])
    assert '--decoder-heads 3' in refused(main, [*base, '--crop-size', '32', '--decoder-heads', '3'])
    assert 'leaves no visible patch' in refused(main, [*base, '--crop-size', '8', '--mask-ratio', '0.9'])
    with pytest.raises(SystemExit):
        parse_args([*base, '--mask-ratio', '1'])
    assert capsys.readouterr().err.strip().splitlines()[-1].endswith(
        "argument --mask-ratio: invalid fraction in (0, 1) value: '1'")
    msg = refused(main, [*base, '--crop-size', '32', '--output-dir', str(tmp_path / 'p')])
    assert msg.startswith('data:') and '/nonexistent' in msg


# ============ end to end ============


@pytest.fixture(scope='module')
def runs(data64, tmp_path_factory):
    """vit_tiny at 8 px (2x2 patches, 1 visible), batch 16 with --accum-iter 2: 2 epochs of 4 batches
    (2 steps each); straight, and stopped after 3 steps (mid-epoch 1) then resumed."""
    tmp = tmp_path_factory.mktemp('mae')
    args = [data64, *TINY, '--epochs', '2', '--accum-iter', '2', '--deterministic']
    return tmp, stop_and_resume(main, args, tmp, 3)


def test_resume_is_exact(runs):
    """Stopped mid-epoch and resumed == straight, bitwise: weights, AdamW state, every logged loss (the
    mask noise comes from the RNG the checkpoints carry)."""
    tmp, ((a, b), (la, lb)) = runs
    assert a['model'].keys() == b['model'].keys() and all(torch.equal(a['model'][k], b['model'][k]) for k in a['model'])
    sa, sb = a['optimizer']['state'], b['optimizer']['state']
    assert sa.keys() == sb.keys() and all(torch.equal(sa[k][s], sb[k][s]) for k in sa for s in sa[k])
    assert la == lb and len(la) == 8 and int(sa[0]['step']) == 4  # 8 batches, 4 optimizer steps
    tr = records(tmp / 'a', 'train')
    assert tr[0]['lr'] == 0 and tr[1]['lr'] == 0 and tr[2]['lr'] == pytest.approx(1.5e-4 * 32 / 256 * 0.5)
    assert a['backbone_prefix'] == 'encoder.' and a['args']['method'] == 'mae'


def test_backbone_and_png(runs):
    """backbone.pth is the encoder with timm names, read by the eval loader as a ViT with MAE's table;
    vis_0000..0002.png: 3 rows (original, masked, reconstruction) of the 4 fixed val images; the first
    row is the original, the visible patch of row 3 is row 1's; every PNG of the run shows the same mask."""
    tmp, ((a, _), _) = runs
    out = tmp / 'a'
    model, sd, _ = checkpoint.load_backbone(out / 'backbone.pth')
    assert isinstance(model, vit.VisionTransformer) and model.pos_embed_type == 'sincos_mae'
    assert sd.keys() == {k[len('encoder.'):] for k in a['model'] if k.startswith('encoder.')}
    assert all(torch.equal(sd[k], a['model']['encoder.' + k]) for k in sd)
    vis = records(out, 'vis')
    assert [r['epoch'] for r in vis] == [0, 1, 2] and all(r['vis_loss'] > 0 for r in vis)
    grids = [torch.tensor(list(Image.open(out / f'vis_{e:04d}.png').getdata())) for e in range(3)]
    width, height = Image.open(out / 'vis_0000.png').size
    assert (width, height) == (4 * 9 + 1, 3 * 9 + 1)  # 8-px images, 1-px padding
    g = [x.view(height, width, 3) for x in grids]
    row = lambda x, i: x[1 + 9 * i: 9 * i + 9]  # noqa: E731
    masked_rows = [(row(x, 1) == row(x, 0)).all(-1) for x in g]  # visible pixels equal the original
    assert all(torch.equal(m, masked_rows[0]) for m in masked_rows) and 0 < masked_rows[0].float().mean() < 0.5
    for x in g:
        assert torch.equal(row(x, 2)[masked_rows[0]], row(x, 0)[masked_rows[0]])
    assert not torch.equal(row(g[0], 2), row(g[2], 2))  # the reconstructions changed with training


def test_torchrun_two_processes(data64, tmp_path):
    out = tmp_path / 'out'
    p = torchrun(2, 'mae.py', data64, *TINY, '--epochs', '1', '--output-dir', out)
    assert 'world size 2' in p.stdout and 'global batch 16 (8 per process)' in p.stdout
    assert len(records(out, 'train')) == 4 and (out / 'backbone.pth').is_file() and (out / 'vis_0001.png').is_file()
