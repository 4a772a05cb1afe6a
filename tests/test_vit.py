"""common/vit.py (methods-modern.md §0b): parameter counts of the four sizes, the sin-cos table by hand,
attention against an explicit softmax(QK^T/sqrt(d))V, drop path, the two inits, DINO's position-table
resizing, the evaluation features, config inference, timm's names (timm optional) and the
torchvision conversion (also through scripts/convert.py), each in float64 where outputs are compared."""
import importlib.util
import math

import pytest
import torch
import torch.nn.functional as F

from conftest import REPO
from common import vit
from common.vit import VisionTransformer, build_vit

spec = importlib.util.spec_from_file_location('convert', REPO / 'scripts' / 'convert.py')
convert = importlib.util.module_from_spec(spec)
spec.loader.exec_module(convert)

TINY = dict(img_size=32, patch_size=8, embed_dim=48, depth=2, num_heads=3)  # 16 patches + cls


def randomized(model, seed=0):
    """Every parameter redrawn (LayerNorm weights away from 1, biases away from 0), so that a swapped
    or dropped tensor changes the output."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=g, dtype=p.dtype) * 0.3 + (1 if p.ndim == 1 else 0) * 0.5)
    return model


def params(m):
    return sum(p.numel() for p in m.parameters())


def count_by_hand(dim, depth, patch, img=224, classes=0):
    """Block: LN 2D, qkv 3D^2+3D, proj D^2+D, LN 2D, fc1 4D^2+4D, fc2 4D^2+D = 12D^2+13D; then the
    patch conv 3p^2 D + D, cls D, position table (N+1) D, final LN 2D, head (D+1) C."""
    n = (img // patch) ** 2
    return depth * (12 * dim * dim + 13 * dim) + 3 * patch * patch * dim + dim + dim + (n + 1) * dim + 2 * dim \
        + (dim + 1) * classes


# ============ sizes (§0b.2), built on the meta device ============

@pytest.mark.parametrize('arch, dim, depth, heads, count', [
    ('vit_tiny', 192, 12, 3, 5_524_416), ('vit_small', 384, 12, 6, 21_665_664),   # ~5M, ~21.7M
    ('vit_base', 768, 12, 12, 85_798_656), ('vit_large', 1024, 24, 16, 303_301_632)])  # ~85.8M, ~300M
def test_sizes_and_parameter_counts(arch, dim, depth, heads, count):
    with torch.device('meta'):
        m = getattr(vit, arch)()
        y = m(torch.empty(2, 3, 224, 224))
    assert count == count_by_hand(dim, depth, 16)
    assert params(m) == count and y.shape == (2, dim)
    assert m.patch_embed.patch_size == 16 and m.pos_embed.shape == (1, 197, dim) and len(m.blocks) == depth
    assert m.blocks[0].attn.num_heads == heads and m.embed_dim == m.num_features == m.feat_dim == dim
    assert isinstance(m.head, torch.nn.Identity) and m.blocks[0].mlp.fc1.out_features == 4 * dim
    assert m.norm.eps == m.blocks[0].norm1.eps == 1e-6
    with torch.device('meta'):
        assert params(getattr(vit, arch)(patch_size=8)) == count_by_hand(dim, depth, 8)  # any patch size
        assert params(getattr(vit, arch)(num_classes=1000)) == count + (dim + 1) * 1000


def test_small_image_variant():
    """§0b.5: 32 px, patch 4 -> 8x8 = 64 patches + cls; the patch default follows the input size."""
    assert [vit.default_patch_size(s) for s in (32, 64, 96, 224)] == [4, 4, 16, 16]
    with torch.device('meta'):
        m = vit.vit_small(img_size=32, num_heads=12)  # MoCo v3's ViT-S: 12 heads
        y = m(torch.empty(2, 3, 32, 32))
    assert m.patch_embed.patch_size == 4 and m.patch_embed.grid_size == (8, 8) and m.pos_embed.shape == (1, 65, 384)
    assert params(m) == count_by_hand(384, 12, 4, img=32) == 21_338_496 and y.shape == (2, 384)
    assert m.blocks[0].attn.head_dim == 32


# ============ position embedding ============

def test_sincos_table_by_hand():
    """D = 8 -> F = 2, w = (1, 1/100); a 2x3 grid: token 1 + 3r + c holds [sin(r w), cos(r w), sin(c w),
    cos(c w)] (rows first, MoCo v3's order; MAE's would put the column first)."""
    t = vit.sincos_pos_embed(8, (2, 3), dtype=torch.float64)
    s, c = math.sin, math.cos
    assert t.shape == (1, 7, 8) and torch.equal(t[0, 0], torch.zeros(8))
    want = {(0, 1): [0, 0, 1, 1, s(1), s(.01), c(1), c(.01)],
            (1, 0): [s(1), s(.01), c(1), c(.01), 0, 0, 1, 1],
            (1, 2): [s(1), s(.01), c(1), c(.01), s(2), s(.02), c(2), c(.02)]}
    for (r, col), v in want.items():
        assert torch.allclose(t[0, 1 + 3 * r + col], torch.tensor(v, dtype=torch.float64), atol=1e-15)
    for init in vit.INITS:  # the model's table is this one at its grid, frozen, and no init touches it
        m = VisionTransformer(pos_embed='sincos', init=init, **TINY)
        assert not m.pos_embed.requires_grad and torch.equal(m.pos_embed, vit.sincos_pos_embed(48, (4, 4)))
        assert m.pos_embed.requires_grad is False and 'pos_embed' in m.state_dict()
    with pytest.raises(ValueError, match='divisible by 4'):
        vit.sincos_pos_embed(6, (2, 2))


def test_pos_embed_interpolation():
    g = torch.Generator().manual_seed(0)
    table = torch.randn(1, 1 + 14 * 14, 4, generator=g, dtype=torch.float64)
    assert vit.interpolate_pos_embed(table, (14, 14), (14, 14)) is table  # same grid: unchanged
    # a table equal to the column index, resized 14x14 -> 6x6: output column j samples the input at
    # x = (j + 0.5) / s - 0.5 with DINO's s = (6 + 0.1) / 14 (s = 6/14 without the +0.1), by the cubic
    # convolution kernel of PyTorch's bicubic (Keys, a = -0.75), taps clamped to the border
    cols = torch.arange(14, dtype=torch.float64).repeat(14)[:, None].repeat(1, 4)
    table = torch.cat([torch.full((1, 4), 7.), cols])[None]
    out = vit.interpolate_pos_embed(table, (14, 14), (6, 6))
    assert out.shape == (1, 37, 4) and torch.equal(out[0, 0], torch.full((4,), 7., dtype=torch.float64))

    def keys(t, a=-0.75):
        t = abs(t)
        return (a + 2) * t ** 3 - (a + 3) * t ** 2 + 1 if t <= 1 else a * t ** 3 - 5 * a * t ** 2 + 8 * a * t - 4 * a

    s = 6.1 / 14
    for j in range(6):
        x0 = (j + 0.5) / s - 0.5
        i0 = math.floor(x0)
        want = sum(keys(x0 - i) * min(max(i, 0), 13) for i in range(i0 - 1, i0 + 3))
        assert torch.allclose(out[0, 1:, 0].view(6, 6)[:, j], torch.full((6,), want, dtype=torch.float64),
                              atol=1e-12, rtol=0), j
    const = torch.full((1, 1 + 14 * 14, 3), 0.25, dtype=torch.float64)
    assert torch.allclose(vit.interpolate_pos_embed(const, (14, 14), (6, 6)), torch.full((1, 37, 3), 0.25,
                                                                                         dtype=torch.float64))
    # the model: at its own size it adds its table as it is; a 16-px input (2x2 grid) adds the resized one
    m = randomized(VisionTransformer(**TINY)).double()
    x = torch.randn(2, 3, 32, 32, dtype=torch.float64)
    tokens = torch.cat([m.cls_token.expand(2, -1, -1), m.patch_embed(x)], 1)
    assert torch.equal(m.prepare_tokens(x), tokens + m.pos_embed)
    x16 = x[..., :16, :16]
    tokens = torch.cat([m.cls_token.expand(2, -1, -1), m.patch_embed(x16)], 1)
    assert torch.equal(m.prepare_tokens(x16), tokens + vit.interpolate_pos_embed(m.pos_embed, (4, 4), (2, 2)))
    assert m(x16).shape == (2, 48)


# ============ attention, block, drop path ============

def test_attention_equals_explicit_softmax():
    torch.manual_seed(0)
    dim, h = 12, 3
    attn = randomized(vit.Attention(dim, h)).double()
    x = torch.randn(2, 5, dim, dtype=torch.float64)
    qkv = x @ attn.qkv.weight.T + attn.qkv.bias  # 2x5x36, columns [q | k | v]
    q, k, v = (qkv[..., i * dim:(i + 1) * dim].view(2, 5, h, dim // h).transpose(1, 2) for i in range(3))
    a = torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(dim // h), -1)  # 2x3x5x5
    want = (a @ v).transpose(1, 2).reshape(2, 5, dim) @ attn.proj.weight.T + attn.proj.bias
    assert torch.allclose(attn(x), want, atol=1e-12, rtol=0)
    one_head = vit.Attention(dim, 1).double()
    one_head.load_state_dict(attn.state_dict())
    assert not torch.allclose(one_head(x), want, atol=1e-3)  # the head split matters


def test_block_is_pre_norm():
    blk = randomized(vit.Block(12, 3)).double()
    x = torch.randn(2, 5, 12, dtype=torch.float64)
    y = x + blk.attn(F.layer_norm(x, (12,), blk.norm1.weight, blk.norm1.bias, 1e-6))
    ln2 = F.layer_norm(y, (12,), blk.norm2.weight, blk.norm2.bias, 1e-6)
    y = y + blk.mlp.fc2(F.gelu(blk.mlp.fc1(ln2)))  # exact GELU
    assert torch.allclose(blk(x), y, atol=1e-12, rtol=0)


def test_drop_path():
    x = torch.randn(1000, 3, 2)
    dp = vit.DropPath(0.25)
    assert dp.eval()(x) is x and vit.DropPath(0.).train()(x) is x
    torch.manual_seed(1)
    y = dp.train()(x)
    torch.manual_seed(1)
    keep = torch.rand(1000) >= 0.25  # DINO's draw: floor(0.75 + u) = 1 iff u >= 0.25
    assert torch.allclose(y[keep], x[keep] / 0.75, rtol=1e-6, atol=0)
    assert torch.equal(y[~keep], torch.zeros_like(y[~keep]))
    assert 0.7 < keep.float().mean() < 0.8
    m = VisionTransformer(**{**TINY, 'depth': 5}, drop_path_rate=0.4)
    assert [round(b.drop_path1.p, 6) for b in m.blocks] == [0, 0.1, 0.2, 0.3, 0.4]  # linear in depth
    assert all(b.drop_path1.p == b.drop_path2.p for b in m.blocks)


# ============ inits (§0b.3) ============

INIT_CFG = dict(img_size=32, patch_size=4, embed_dim=96, depth=1, num_heads=3)  # 64 patches


def near_bound(w, bound):
    return w.abs().max() <= bound and w.abs().max() > 0.99 * bound


def test_moco_init():
    torch.manual_seed(0)
    m = VisionTransformer(init='moco', pos_embed='sincos', **INIT_CFG)
    blk, d = m.blocks[0], 96
    assert near_bound(blk.attn.qkv.weight, math.sqrt(6 / (d + d)))  # q, k, v each DxD (whole: sqrt(6/4D))
    assert near_bound(blk.attn.proj.weight, math.sqrt(6 / (d + d)))
    assert near_bound(blk.mlp.fc1.weight, math.sqrt(6 / (d + 4 * d)))
    assert near_bound(m.patch_embed.proj.weight, math.sqrt(6 / (3 * 16 + d)))
    for lin in (blk.attn.qkv, blk.attn.proj, blk.mlp.fc1, blk.mlp.fc2):
        assert torch.equal(lin.bias, torch.zeros_like(lin.bias))
    assert torch.equal(m.patch_embed.proj.bias, torch.zeros(d))
    assert 0 < m.cls_token.abs().max() < 1e-5  # N(0, 1e-6)
    assert torch.equal(blk.norm1.weight, torch.ones(d)) and torch.equal(m.norm.bias, torch.zeros(d))


def test_dino_init():
    torch.manual_seed(0)
    m = VisionTransformer(init='dino', **INIT_CFG)
    blk, d = m.blocks[0], 96
    for lin in (blk.attn.qkv, blk.attn.proj, blk.mlp.fc1, blk.mlp.fc2):
        assert abs(lin.weight.std() - 0.02) < 0.001 and torch.equal(lin.bias, torch.zeros_like(lin.bias))
    assert abs(m.pos_embed.std() - 0.02) < 0.001 and m.pos_embed.requires_grad
    assert 0.01 < m.cls_token.std() < 0.03
    conv = m.patch_embed.proj  # PyTorch's default: kaiming-uniform(a=sqrt 5) -> +-1/sqrt(fan_in), fan_in 48
    assert near_bound(conv.weight, 1 / math.sqrt(48)) and conv.bias.abs().max() <= 1 / math.sqrt(48)
    assert conv.bias.abs().min() > 0
    assert torch.equal(blk.norm2.weight, torch.ones(d)) and torch.equal(blk.norm2.bias, torch.zeros(d))
    with pytest.raises(ValueError, match='init must be'):
        VisionTransformer(init='jax', **INIT_CFG)


# ============ features for evaluation ============

def test_eval_features():
    m = randomized(VisionTransformer(**{**TINY, 'depth': 4})).double().eval()
    x = torch.randn(3, 3, 32, 32, dtype=torch.float64)
    t = m.prepare_tokens(x)
    after = []
    for blk in m.blocks:
        t = blk(t)
        after.append(m.norm(t))
    assert torch.equal(m.forward_features(x), after[-1]) and torch.equal(m(x), after[-1][:, 0])
    assert torch.equal(m.pooled(x), m(x)) and torch.allclose(m.pooled(x, 'avg'), after[-1][:, 1:].mean(1))
    inter = m.get_intermediate_layers(x, 3)
    assert len(inter) == 3 and all(torch.equal(a, b) for a, b in zip(inter, after[1:]))
    last4 = m.linear_features(x, 4)
    assert last4.shape == (3, 4 * 48) and torch.equal(last4[:, 48:96], after[1][:, 0])  # block order kept
    both = m.linear_features(x, 1, avgpool_patchtokens=True)  # DINO ViT-B: [c0, a0, c1, a1, ...]
    assert both.shape == (3, 96) and torch.equal(both[:, 0::2], after[-1][:, 0])
    assert torch.allclose(both[:, 1::2], after[-1][:, 1:].mean(1))
    with pytest.raises(ValueError, match='n_last_blocks=1'):
        m.linear_features(x, 2, avgpool_patchtokens=True)


# ============ config inference ============

@pytest.mark.parametrize('kw', [
    dict(TINY, pos_embed='learned'),
    dict(img_size=32, patch_size=4, embed_dim=64, depth=3, num_heads=4, pos_embed='sincos', num_classes=10),
    dict(img_size=48, patch_size=16, embed_dim=48, depth=1, num_heads=2, in_chans=1, qkv_bias=False, mlp_ratio=2.)])
def test_infer_config_round_trip(kw):
    m = VisionTransformer(**kw) if kw.get('pos_embed') == 'sincos' else randomized(VisionTransformer(**kw))
    sd = m.state_dict()
    cfg = vit.infer_vit_config(sd, num_heads=kw['num_heads'])
    want = {**dict(arch=None, in_chans=3, mlp_ratio=4., qkv_bias=True, num_classes=0, pos_embed='learned'), **kw}
    assert cfg == want
    m2 = build_vit(**cfg)
    m2.load_state_dict(sd)  # strict
    x = torch.randn(2, kw.get('in_chans', 3), kw['img_size'], kw['img_size'])
    assert torch.equal(m2.eval()(x), m.eval()(x))


def test_infer_config_named_size_and_refusals():
    m = vit.vit_tiny(patch_size=16)
    cfg = vit.infer_vit_config(m.state_dict())
    assert (cfg['arch'], cfg['num_heads'], cfg['patch_size'], cfg['img_size'], cfg['pos_embed']) == \
        ('vit_tiny', 3, 16, 224, 'learned')
    assert vit.infer_vit_config(vit.vit_tiny(img_size=32, pos_embed='sincos').state_dict())['pos_embed'] == 'sincos'
    sd = VisionTransformer(**TINY).state_dict()
    with pytest.raises(ValueError, match='pass num_heads'):  # 48-d: no named size, not a multiple of 64
        vit.infer_vit_config(sd)
    with pytest.raises(ValueError, match='not a ViT'):
        vit.infer_vit_config({'conv1.weight': torch.zeros(1)})


# ============ timm names (§0b.4) ============

def test_state_dict_names_are_timms():
    timm = pytest.importorskip('timm')
    from timm.models.vision_transformer import VisionTransformer as TimmViT
    with torch.device('meta'):
        ours = vit.vit_small()
        theirs = timm.create_model('vit_small_patch16_224', pretrained=False, num_classes=0)
    names = [(k, v.shape) for k, v in theirs.state_dict().items()]
    assert [(k, v.shape) for k, v in ours.state_dict().items()] == names and len(names) == 4 + 12 * 12 + 2
    for classes in (0, 7):  # a backbone loads into timm as it is and computes the same function
        m = randomized(VisionTransformer(**TINY, num_classes=classes)).double().eval()
        t = TimmViT(**TINY, num_classes=classes).double().eval()
        t.load_state_dict(m.state_dict())  # strict
        x = torch.randn(2, 3, 32, 32, dtype=torch.float64)
        assert torch.allclose(t(x), m(x), atol=1e-10, rtol=0)


# ============ torchvision ============

@pytest.mark.parametrize('classes', [0, 5])
def test_torchvision_conversion_same_output(classes):
    m = randomized(VisionTransformer(**TINY, num_classes=classes)).double().eval()
    out = vit.to_torchvision(m.state_dict())
    assert 'encoder.layers.encoder_layer_1.self_attention.in_proj_weight' in out and 'conv_proj.weight' in out
    assert torch.equal(out['encoder.layers.encoder_layer_0.mlp.3.bias'], m.blocks[0].mlp.fc2.bias)
    tv = vit.torchvision_vit(vit.infer_vit_config(m.state_dict(), num_heads=3)).double().eval()
    tv.load_state_dict(out)  # strict
    x = torch.randn(2, 3, 32, 32, dtype=torch.float64)
    with torch.no_grad():
        assert torch.allclose(tv(x), m(x), atol=1e-10, rtol=0)
    with pytest.raises(ValueError, match='no torchvision equivalent'):
        vit.to_torchvision({**m.state_dict(), 'fc_norm.weight': torch.zeros(48)})


def test_convert_script_vit_and_reference_checkpoints(tmp_path, capsys):
    torch.manual_seed(0)
    m = randomized(VisionTransformer(**TINY)).eval()  # 48-d: no default heads, which conversion does not need
    sd = m.state_dict()
    ckpt = dict(model={**{'backbone.' + k: v for k, v in sd.items()}, 'projector.0.weight': torch.zeros(2, 2)},
                backbone_prefix='backbone.', args={}, epoch=1)
    torch.save(ckpt, tmp_path / 'ckpt.pth')
    convert.main([str(tmp_path / 'ckpt.pth'), str(tmp_path / 'tv.pth'), '--to', 'torchvision'])
    assert 'loads strictly into torchvision.models.VisionTransformer(image_size=32' in capsys.readouterr().out
    tv = vit.torchvision_vit(vit.infer_vit_config(sd, num_heads=3))
    tv.load_state_dict(torch.load(tmp_path / 'tv.pth', weights_only=True))
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert torch.allclose(tv.eval()(x), m(x), atol=1e-5)
    convert.main([str(tmp_path / 'ckpt.pth'), str(tmp_path / 'timm.pth'), '--to', 'timm'])
    assert 'timm' in capsys.readouterr().out
    out = torch.load(tmp_path / 'timm.pth', weights_only=True)
    assert list(out) == list(sd) and all(torch.equal(out[k], sd[k]) for k in sd)
    # MoCo v3 (module.base_encoder.*, head = projector) and DINO (teacher backbone.*) checkpoints
    moco3 = {'state_dict': {**{'module.base_encoder.' + k: v for k, v in sd.items()},
                            'module.base_encoder.head.0.weight': torch.zeros(3, 48),
                            **{'module.momentum_encoder.' + k: v * 0 for k, v in sd.items()}}}
    dino = {'teacher': {**{'backbone.' + k: v for k, v in sd.items()}, 'head.mlp.0.weight': torch.zeros(3, 48)},
            'student': {'module.backbone.' + k: v * 0 for k, v in sd.items()}}
    for c in (moco3, dino, {'module.' + k: v for k, v in sd.items()}):
        assert vit.holds_vit(c)
        got = vit.vit_backbone_state_dict(c)
        assert list(got) == list(sd) and all(torch.equal(got[k], sd[k]) for k in sd)
    assert not vit.holds_vit({'conv1.weight': torch.zeros(1)})
    torch.save({**sd, 'blocks.0.ls1.gamma': torch.zeros(48)}, tmp_path / 'bad.pth')
    with pytest.raises(SystemExit, match='blocks.0.ls1.gamma'):
        convert.main([str(tmp_path / 'bad.pth'), str(tmp_path / 'x.pth'), '--to', 'torchvision'])
