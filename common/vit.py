"""Pre-norm Vision Transformer with timm's parameter names, for MoCo v3, DINO and the evaluations.

Spec: methods-modern.md §0b (citations there are to facebookresearch/moco-v3 `M3`, facebookresearch/
dino `DN`, timm `TIMM`, torchvision `TV`). §0b.1 architecture: conv patch embedding, [CLS] token,
position embedding (learned, or MoCo v3's fixed 2-D sin-cos with rows first, `M3:vits.py:53-69`),
blocks `x + DropPath(Attn(LN(x)))`, `x + DropPath(MLP(LN(x)))` with LN eps 1e-6, exact GELU, MLP
ratio 4, qkv bias, a final LN, and the normed [CLS] token as the representation. §0b.2 sizes
(`vit_tiny/small/base/large`, any patch size; ViT-Small has DeiT/DINO's 6 heads, MoCo v3 builds it
with `num_heads=12`). §0b.3 initialisation: `init='dino'` (`DN:vision_transformer.py:161-172`),
`init='moco'` (`M3:vits.py:31-51`) or `init='mae'` (`MAE:models_mae.py:65-93`); MAE's own sin-cos
table is `pos_embed='sincos_mae'`. §0b.4 state-dict names: those of timm's VisionTransformer, so
`timm.models.vision_transformer.VisionTransformer(..., num_classes=0)` loads a backbone strictly;
`to_torchvision` renames them for `torchvision.models.VisionTransformer`. §0b.5 small images:
patch 4 at 32 px (8x8 patches + cls); `default_patch_size` picks 4 for inputs of 64 px or less.

Other input sizes (DINO's 96-px local crops) resize the patch part of the position table
bicubically, DINO's way (`DN:vision_transformer.py:174-194`), at every forward.
Heads cannot be read off the weights (they change no shape): `infer_vit_config` takes them from the
size's default unless told otherwise.
"""
import math
import re

import torch
import torch.nn as nn
import torch.nn.functional as F

# name -> (embed_dim, depth, num_heads) (methods-modern.md §0b.2; DINO's and timm's heads)
ARCHS = {
    'vit_tiny': dict(embed_dim=192, depth=12, num_heads=3),
    'vit_small': dict(embed_dim=384, depth=12, num_heads=6),    # MoCo v3: num_heads=12
    'vit_base': dict(embed_dim=768, depth=12, num_heads=12),
    'vit_large': dict(embed_dim=1024, depth=24, num_heads=16),
}
INITS = ('dino', 'moco', 'mae')
POS_EMBEDS = ('learned', 'sincos', 'sincos_mae')  # sincos_mae: MAE's table, columns first (§0b.1)


def default_patch_size(img_size):
    """16, or 4 for inputs of 64 px or less (issue 15's --patch-size default; §0b.5 is solo-learn's
    32-px ViT with patch 4, i.e. 8x8 patches)."""
    return 4 if img_size <= 64 else 16


def sincos_pos_embed(embed_dim, grid_size, temperature=10000., dtype=None, cols_first=False):
    """MoCo v3's fixed table, 1 x (1+h*w) x D (`M3:vits.py:53-69`): a zero row for the cls token, then
    one row per patch in row-major order, [sin(r w), cos(r w), sin(c w), cos(c w)] for the patch at
    row r, column c, with w_k = temperature^(-k/F), k < F = D/4 (computed in the default dtype,
    float32 as in M3, with M3's operations). cols_first: MAE's table (`MAE:util/pos_embed.py:20-67`,
    numpy's "xy" meshgrid), [sin(c w), cos(c w), sin(r w), cos(r w)]."""
    if embed_dim % 4:
        raise ValueError(f'the 2-D sin-cos position embedding needs embed_dim divisible by 4, not {embed_dim}')
    h, w = grid_size
    f = embed_dim // 4
    dtype = dtype or torch.get_default_dtype()
    omega = 1. / temperature ** (torch.arange(f, dtype=dtype) / f)
    rows, cols = torch.meshgrid(torch.arange(h, dtype=dtype), torch.arange(w, dtype=dtype), indexing='ij')
    a = rows.flatten()[:, None] * omega[None]  # (h*w) x F
    b = cols.flatten()[:, None] * omega[None]
    if cols_first:
        a, b = b, a
    table = torch.cat([a.sin(), a.cos(), b.sin(), b.cos()], 1)
    return torch.cat([torch.zeros(1, embed_dim, dtype=dtype), table])[None]


def interpolate_pos_embed(pos_embed, grid_size, new_grid_size):
    """1x(1+h*w)xD table for a (h, w) patch grid -> the table for `new_grid_size`, DINO's way
    (`DN:vision_transformer.py:174-194`): the cls row is kept, the patch rows are resized bicubically
    with the scale (new + 0.1) / old (the 0.1 keeps floor() from losing a row; it also sets the
    sampling positions). The same grid returns the table itself."""
    (h, w), (h0, w0) = tuple(grid_size), tuple(new_grid_size)
    if (h, w) == (h0, w0):
        return pos_embed
    d = pos_embed.shape[-1]
    patch = pos_embed[:, 1:].reshape(1, h, w, d).permute(0, 3, 1, 2)  # 1xDxhxw
    patch = F.interpolate(patch, scale_factor=((h0 + 0.1) / h, (w0 + 0.1) / w), mode='bicubic')
    if tuple(patch.shape[-2:]) != (h0, w0):
        raise RuntimeError(f'position embedding resized to {tuple(patch.shape[-2:])}, not {(h0, w0)}')
    return torch.cat([pos_embed[:, :1], patch.permute(0, 2, 3, 1).reshape(1, h0 * w0, d)], 1)


def drop_path(x, p, training):
    """Stochastic depth per sample: each sample's branch is kept with probability 1-p and then divided
    by 1-p. Sample i is kept iff u_i >= p for u = torch.rand(N), which consumes the generator as
    DINO's floor(1 - p + u) does (`DN:vision_transformer.py:27-46`)."""
    if p == 0. or not training:
        return x
    keep = torch.rand((x.shape[0],) + (1,) * (x.ndim - 1), dtype=x.dtype, device=x.device) >= p
    return x.div(1 - p) * keep


class DropPath(nn.Module):
    def __init__(self, p=0.):
        super().__init__()
        self.p = p

    def forward(self, x):
        return drop_path(x, self.p, self.training)

    def extra_repr(self):
        return f'p={self.p}'


class PatchEmbed(nn.Module):
    """Conv2d(in_chans, D, p, stride p): BxCxHxW -> BxNxD, patches in row-major order."""

    def __init__(self, img_size=224, patch_size=16, in_chans=3, embed_dim=768):
        super().__init__()
        self.img_size, self.patch_size = img_size, patch_size
        self.grid_size = (img_size // patch_size, img_size // patch_size)
        self.num_patches = self.grid_size[0] * self.grid_size[1]
        self.proj = nn.Conv2d(in_chans, embed_dim, patch_size, patch_size)

    def forward(self, x):
        return self.proj(x).flatten(2).transpose(1, 2)


class Attention(nn.Module):
    """Multi-head self-attention: one qkv Linear (rows [q; k; v], h heads of D/h each), softmax(q k^T
    (D/h)^-0.5) v by F.scaled_dot_product_attention, then the output Linear."""

    def __init__(self, dim, num_heads, qkv_bias=True, attn_drop=0., proj_drop=0.):
        super().__init__()
        if dim % num_heads:
            raise ValueError(f'embed_dim {dim} is not divisible by num_heads={num_heads}')
        self.num_heads, self.head_dim = num_heads, dim // num_heads
        self.qkv = nn.Linear(dim, 3 * dim, bias=qkv_bias)
        self.attn_drop = attn_drop
        self.proj = nn.Linear(dim, dim)
        self.proj_drop = nn.Dropout(proj_drop)

    def forward(self, x):
        b, n, d = x.shape
        q, k, v = self.qkv(x).view(b, n, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4)  # each BxhxNx(D/h)
        x = F.scaled_dot_product_attention(q, k, v, dropout_p=self.attn_drop if self.training else 0.)
        return self.proj_drop(self.proj(x.transpose(1, 2).reshape(b, n, d)))


class Mlp(nn.Module):
    def __init__(self, dim, hidden_dim, drop=0.):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden_dim)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden_dim, dim)
        self.drop = nn.Dropout(drop)

    def forward(self, x):
        return self.drop(self.fc2(self.drop(self.act(self.fc1(x)))))


class Block(nn.Module):
    """Pre-norm block: x + DropPath(Attn(LN1(x))), then x + DropPath(MLP(LN2(x)))."""

    def __init__(self, dim, num_heads, mlp_ratio=4., qkv_bias=True, drop=0., attn_drop=0., drop_path=0.):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=1e-6)
        self.attn = Attention(dim, num_heads, qkv_bias, attn_drop, drop)
        self.norm2 = nn.LayerNorm(dim, eps=1e-6)
        self.mlp = Mlp(dim, int(dim * mlp_ratio), drop)
        self.drop_path1, self.drop_path2 = DropPath(drop_path), DropPath(drop_path)

    def forward(self, x):
        x = x + self.drop_path1(self.attn(self.norm1(x)))
        return x + self.drop_path2(self.mlp(self.norm2(x)))


class VisionTransformer(nn.Module):
    """ViT with timm's state-dict names (§0b.4); forward(x) = head(normed cls token), head Identity
    unless num_classes > 0.

    pos_embed: 'learned' (DINO), 'sincos' (MoCo v3: fixed, requires_grad=False, still in the state
    dict as timm's pos_embed) or 'sincos_mae' (MAE's fixed table, columns first). init: 'dino',
    'moco' or 'mae' (init_vit). drop_path_rate grows linearly from 0 at the first block to the rate
    at the last (`DN:vision_transformer.py:150`).
    Inputs of another size than img_size are taken: the position table is resized to their grid.
    """

    def __init__(self, img_size=224, patch_size=16, in_chans=3, num_classes=0, embed_dim=768, depth=12,
                 num_heads=12, mlp_ratio=4., qkv_bias=True, drop_rate=0., attn_drop_rate=0., drop_path_rate=0.,
                 pos_embed='learned', init='dino'):
        super().__init__()
        if pos_embed not in POS_EMBEDS:
            raise ValueError(f'pos_embed must be one of {", ".join(POS_EMBEDS)}, not {pos_embed!r}')
        self.num_features = self.embed_dim = self.feat_dim = embed_dim  # feat_dim: as common.resnet
        self.pos_embed_type = pos_embed
        self.patch_embed = PatchEmbed(img_size, patch_size, in_chans, embed_dim)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, embed_dim))
        if pos_embed in ('sincos', 'sincos_mae'):
            table = sincos_pos_embed(embed_dim, self.patch_embed.grid_size, cols_first=pos_embed == 'sincos_mae')
            self.pos_embed = nn.Parameter(table, requires_grad=False)
        else:
            self.pos_embed = nn.Parameter(torch.zeros(1, self.patch_embed.num_patches + 1, embed_dim))
        self.pos_drop = nn.Dropout(drop_rate)
        rates = torch.linspace(0, drop_path_rate, depth, device='cpu').tolist()
        self.blocks = nn.ModuleList([Block(embed_dim, num_heads, mlp_ratio, qkv_bias, drop_rate, attn_drop_rate, r)
                                     for r in rates])
        self.norm = nn.LayerNorm(embed_dim, eps=1e-6)
        self.head = nn.Linear(embed_dim, num_classes) if num_classes else nn.Identity()
        init_vit(self, init)

    def prepare_tokens(self, x):
        """BxCxHxW -> Bx(1+N)xD: patch tokens, cls first, plus the position table for this grid."""
        p = self.patch_embed.patch_size
        grid = (x.shape[-2] // p, x.shape[-1] // p)
        x = self.patch_embed(x)
        x = torch.cat([self.cls_token.expand(x.shape[0], -1, -1), x], 1)
        x = x + interpolate_pos_embed(self.pos_embed, self.patch_embed.grid_size, grid)
        return self.pos_drop(x)

    def forward_features(self, x):
        """Bx(1+N)xD: every token after the final LayerNorm (cls first)."""
        x = self.prepare_tokens(x)
        for blk in self.blocks:
            x = blk(x)
        return self.norm(x)

    def get_intermediate_layers(self, x, n=1):
        """The tokens after each of the last n blocks, each through the final LayerNorm (DINO's
        definition, `DN:vision_transformer.py` get_intermediate_layers): a list of n Bx(1+N)xD."""
        x = self.prepare_tokens(x)
        out = []
        for i, blk in enumerate(self.blocks):
            x = blk(x)
            if i >= len(self.blocks) - n:
                out.append(self.norm(x))
        return out

    def pooled(self, x, pool='cls'):
        """BxD feature without the head: 'cls' the normed cls token (the representation of MoCo v3 and
        DINO), 'avg' the mean of the normed patch tokens."""
        x = self.forward_features(x)
        if pool == 'cls':
            return x[:, 0]
        if pool == 'avg':
            return x[:, 1:].mean(1)
        raise ValueError(f"pool must be 'cls' or 'avg', not {pool!r}")

    def linear_features(self, x, n_last_blocks=1, avgpool_patchtokens=False):
        """DINO's linear-eval feature (`DN:eval_linear.py:256-260`, §16.7): the normed cls tokens of the
        last n blocks concatenated (n*D; ViT-S uses n=4); with avgpool_patchtokens (n=1 only, ViT-B)
        the cls token and the mean patch token interleaved dimension by dimension, [c0, a0, c1, a1, ...]
        (2D), the layout of DINO's released linear heads."""
        outs = self.get_intermediate_layers(x, n_last_blocks)
        feat = torch.cat([o[:, 0] for o in outs], -1)
        if avgpool_patchtokens:
            if n_last_blocks != 1:
                raise ValueError('avgpool_patchtokens needs n_last_blocks=1 (as in DINO)')
            feat = torch.stack([feat, outs[-1][:, 1:].mean(1)], -1).flatten(1)
        return feat

    def forward(self, x):
        return self.head(self.forward_features(x)[:, 0])


@torch.no_grad()
def init_vit(model, mode='dino'):
    """Initialises a VisionTransformer as one reference does (methods-modern.md §0b.3).

    'dino' (`DN:vision_transformer.py:161-172`): cls token and a learned pos_embed trunc-normal std 0.02,
      every Linear trunc-normal std 0.02 with zero bias, LayerNorm 1/0, the patch conv left at
      PyTorch's default. (Truncation at +-2 absolute, i.e. 100 std: torch's trunc_normal_ default.)
    'moco' (`M3:vits.py:31-51`, over timm 0.4.9's init): every Linear Xavier-uniform, except qkv, whose
      bound sqrt(6/(D + D)) treats q, k and v as three DxD matrices, all Linear biases 0; cls token
      N(0, 1e-6); patch conv uniform +-sqrt(6/(3p^2 + D)) with zero bias; a learned pos_embed keeps
      timm's trunc-normal 0.02. LayerNorm 1/0.
    'mae' (`MAE:models_mae.py:65-93`): every Linear Xavier-uniform (qkv as one 3DxD matrix), bias 0;
      the patch conv weight Xavier-uniform on its D x 3p^2 view (a Linear's), its bias left at
      PyTorch's default; cls token N(0, 0.02) (timm's trunc-normal at +-2 is untruncated there);
      LayerNorm 1/0.
    A sin-cos pos_embed is never touched. MoCo v3's frozen patch projection (--stop-grad-conv1) is
    `model.patch_embed.proj.requires_grad_(False)`, left to the caller.
    """
    if mode not in INITS:
        raise ValueError(f'init must be one of {", ".join(INITS)}, not {mode!r}')
    if model.pos_embed_type == 'learned':
        nn.init.trunc_normal_(model.pos_embed, std=.02)
    for name, m in model.named_modules():
        if isinstance(m, nn.LayerNorm):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)
        elif isinstance(m, nn.Linear):
            if mode == 'dino':
                nn.init.trunc_normal_(m.weight, std=.02)
            elif mode == 'moco' and name.endswith('qkv'):
                bound = math.sqrt(6. / (m.weight.shape[0] // 3 + m.weight.shape[1]))
                nn.init.uniform_(m.weight, -bound, bound)
            else:
                nn.init.xavier_uniform_(m.weight)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
    if mode == 'dino':
        nn.init.trunc_normal_(model.cls_token, std=.02)
    elif mode == 'mae':
        w = model.patch_embed.proj.weight
        nn.init.xavier_uniform_(w.view(w.shape[0], -1))
        nn.init.normal_(model.cls_token, std=.02)
    else:
        nn.init.normal_(model.cls_token, std=1e-6)
        conv = model.patch_embed.proj
        bound = math.sqrt(6. / (conv.weight[0].numel() + conv.out_channels))  # 3p^2 + D
        nn.init.uniform_(conv.weight, -bound, bound)
        nn.init.zeros_(conv.bias)


def build_vit(arch=None, patch_size=None, img_size=224, **kwargs):
    """VisionTransformer of a named size (ARCHS) or of explicit embed_dim/depth/num_heads; kwargs
    override the size's values. patch_size None: default_patch_size(img_size)."""
    if arch is not None and arch not in ARCHS:
        raise ValueError(f'--arch {arch!r} is not a ViT; choose one of {", ".join(ARCHS)}')
    patch_size = patch_size or default_patch_size(img_size)
    return VisionTransformer(img_size=img_size, patch_size=patch_size, **{**ARCHS.get(arch, {}), **kwargs})


def vit_tiny(patch_size=None, **kwargs):
    return build_vit('vit_tiny', patch_size, **kwargs)


def vit_small(patch_size=None, **kwargs):
    return build_vit('vit_small', patch_size, **kwargs)


def vit_base(patch_size=None, **kwargs):
    return build_vit('vit_base', patch_size, **kwargs)


def vit_large(patch_size=None, **kwargs):
    return build_vit('vit_large', patch_size, **kwargs)


def is_vit_state_dict(sd):
    return 'patch_embed.proj.weight' in sd and 'pos_embed' in sd


def infer_vit_config(state_dict, num_heads=None):
    """Reads the ViT configuration off a backbone state dict with timm names, for build_vit(**cfg):
    arch (a name of ARCHS, or None for other sizes), embed_dim, depth, patch_size, img_size (square,
    from the position table), in_chans, mlp_ratio, qkv_bias, pos_embed ('sincos' when the table is
    MoCo v3's sin-cos table, 'sincos_mae' when it is MAE's, else 'learned'), num_classes (from
    head.weight) and num_heads.

    num_heads changes no shape, so it cannot be read off the weights: pass it, or get the size's
    default (ARCHS; 6 for ViT-Small, which MoCo v3 builds with 12), or D/64 for other sizes.
    """
    if not is_vit_state_dict(state_dict) or 'blocks.0.attn.qkv.weight' not in state_dict:
        raise ValueError('not a ViT state dict: patch_embed.proj.weight / pos_embed / blocks.0.* missing')
    w = state_dict['patch_embed.proj.weight']
    dim, in_chans, patch = w.shape[0], w.shape[1], w.shape[-1]
    depth = 1 + max(int(m.group(1)) for k in state_dict for m in [re.match(r'blocks\.(\d+)\.', k)] if m)
    pos = state_dict['pos_embed']
    side = math.isqrt(pos.shape[1] - 1)
    if side * side != pos.shape[1] - 1:
        raise ValueError(f'pos_embed has {pos.shape[1] - 1} patch rows, not a square grid')
    kind = 'learned'
    if dim % 4 == 0:
        table = sincos_pos_embed(dim, (side, side), dtype=torch.float64)
        kind = 'sincos' if torch.allclose(pos.cpu().double(), table, atol=1e-5) else 'learned'
        mae = sincos_pos_embed(dim, (side, side), dtype=torch.float64, cols_first=True)
        if kind == 'learned' and torch.allclose(pos.cpu().double(), mae, atol=1e-5):
            kind = 'sincos_mae'
    arch = next((a for a, c in ARCHS.items() if (c['embed_dim'], c['depth']) == (dim, depth)), None)
    if num_heads is None:
        num_heads = ARCHS[arch]['num_heads'] if arch else dim // 64
        if not num_heads or dim % num_heads:
            raise ValueError(f'no default number of heads for embed_dim {dim}: pass num_heads')
    return dict(arch=arch, embed_dim=dim, depth=depth, num_heads=num_heads, patch_size=patch,
                img_size=side * patch, in_chans=in_chans,
                mlp_ratio=state_dict['blocks.0.mlp.fc1.weight'].shape[0] / dim,
                qkv_bias='blocks.0.attn.qkv.bias' in state_dict, pos_embed=kind,
                num_classes=state_dict['head.weight'].shape[0] if 'head.weight' in state_dict else 0)


# ---------------------------------------------------------------- checkpoints and conversion

VIT_KEYS = ('cls_token', 'pos_embed', 'patch_embed.', 'blocks.', 'norm.', 'head.')


def _strip(sd, prefix):
    return {k[len(prefix):] if k.startswith(prefix) else k: v for k, v in sd.items()}


def vit_backbone_state_dict(ckpt, keep_head=False):
    """ViT backbone weights (timm names, head dropped unless keep_head) from a selfsup checkpoint
    (model + backbone_prefix), a MoCo v3 checkpoint (state_dict, module.base_encoder.*; its head is
    the projector), a DINO checkpoint (the teacher's backbone.*, as DINO's evaluations take it) or a
    plain timm-named state dict. Raises ValueError naming the keys it cannot place."""
    if isinstance(ckpt, dict) and 'model' in ckpt and 'backbone_prefix' in ckpt:
        p = ckpt['backbone_prefix']
        sd = {k[len(p):]: v for k, v in ckpt['model'].items() if k.startswith(p)}
    elif isinstance(ckpt, dict) and 'state_dict' in ckpt:  # M3:main_lincls.py:178-189
        sd = _strip(ckpt['state_dict'], 'module.')
        if any(k.startswith('base_encoder.') for k in sd):
            sd = {k[len('base_encoder.'):]: v for k, v in sd.items() if k.startswith('base_encoder.')}
    elif isinstance(ckpt, dict) and 'teacher' in ckpt:  # DN:utils.py:71-82
        sd = _strip(ckpt['teacher'], 'module.')
        sd = {k[len('backbone.'):]: v for k, v in sd.items() if k.startswith('backbone.')}
    elif isinstance(ckpt, dict) and all(isinstance(v, torch.Tensor) for v in ckpt.values()):
        sd = _strip(ckpt, 'module.')
    else:
        keys = list(ckpt)[:20] if isinstance(ckpt, dict) else type(ckpt).__name__
        raise ValueError(f'unrecognised checkpoint: top-level keys {keys}')
    if not keep_head:
        sd = {k: v for k, v in sd.items() if not k.startswith('head.')}
    unexpected = [k for k in sd if not k.startswith(VIT_KEYS)]
    if unexpected or not is_vit_state_dict(sd):
        raise ValueError(f'checkpoint does not hold a ViT backbone (timm names); unexpected keys: '
                         f'{unexpected[:20] or "(patch_embed.proj.weight / pos_embed missing)"}')
    return sd


def holds_vit(ckpt):
    """Whether a loaded checkpoint (any format vit_backbone_state_dict reads) carries ViT weights."""
    if not isinstance(ckpt, dict):
        return False
    parts = [ckpt] + [ckpt[k] for k in ('model', 'state_dict', 'teacher') if isinstance(ckpt.get(k), dict)]
    return any(isinstance(k, str) and k.endswith('patch_embed.proj.weight') for d in parts for k in d)


def to_torchvision(sd):
    """timm names -> torchvision.models.VisionTransformer names (methods-modern.md §0b.4 table).
    The qkv rows are [q; k; v] in both, so the tensors are copied unchanged. Raises ValueError on a
    key it cannot place, and on a qkv without bias (torchvision's attention always has one)."""
    fixed = {'cls_token': 'class_token', 'pos_embed': 'encoder.pos_embedding',
             'patch_embed.proj.weight': 'conv_proj.weight', 'patch_embed.proj.bias': 'conv_proj.bias',
             'norm.weight': 'encoder.ln.weight', 'norm.bias': 'encoder.ln.bias',
             'head.weight': 'heads.head.weight', 'head.bias': 'heads.head.bias'}
    block = {'norm1': 'ln_1', 'attn.qkv.weight': 'self_attention.in_proj_weight',
             'attn.qkv.bias': 'self_attention.in_proj_bias', 'attn.proj': 'self_attention.out_proj',
             'norm2': 'ln_2', 'mlp.fc1': 'mlp.0', 'mlp.fc2': 'mlp.3'}
    out, left = {}, []
    for k, v in sd.items():
        m = re.fullmatch(r'blocks\.(\d+)\.(.+)', k)
        if k in fixed:
            out[fixed[k]] = v
        elif m and m.group(2).startswith(tuple(block)):
            name = next(b for b in block if m.group(2).startswith(b))
            out[f'encoder.layers.encoder_layer_{m.group(1)}.{block[name]}{m.group(2)[len(name):]}'] = v
        else:
            left.append(k)
    if left:
        raise ValueError(f'keys with no torchvision equivalent: {left[:20]}')
    missing = [k for k in sd if k.endswith('attn.qkv.weight') and k[:-len('weight')] + 'bias' not in sd]
    if missing:
        raise ValueError(f'{missing[:3]} without bias: torchvision has none to take it')
    return out


def torchvision_vit(cfg):
    """The torchvision.models.VisionTransformer of a config of infer_vit_config (heads = Identity
    without a classifier); raises ValueError for what torchvision cannot build."""
    from torchvision.models import VisionTransformer as TVViT
    if cfg['in_chans'] != 3 or cfg['img_size'] % cfg['patch_size']:
        raise ValueError(f'torchvision builds RGB ViTs whose image size is a multiple of the patch: {cfg}')
    model = TVViT(cfg['img_size'], cfg['patch_size'], cfg['depth'], cfg['num_heads'], cfg['embed_dim'],
                  int(cfg['embed_dim'] * cfg['mlp_ratio']), num_classes=cfg['num_classes'] or 1000)
    if not cfg['num_classes']:
        model.heads = nn.Identity()
    return model
