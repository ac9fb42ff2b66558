"""The model modules against independent references, written from mutation testing (docs/mutation_testing.md).

Each section takes one module of repro/models and checks it against something written out here by hand:

- unet: group norm, SiLU, the sinusoid, ResBlock, attention and the resamplers as formulas, the UNet's layout
  (which block where, with which widths and skips) listed by hand for one non-trivial configuration, and its
  forward pass recomposed from those formulas;
- denoisers: which family and process each name builds, the overrides as literal lists;
- cost: FLOPs from closed forms and torch's FlopCounterMode, the memory items from the parameter counts, the
  layout choice from the rules of its docstring (a fake activation measurement keeps it fast);
- lightningdit and checkpoint: the pieces the other test files leave open (see the module's section).
"""

from __future__ import annotations

import math
import pickle
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from repro.config import ModelConfig
from repro.errors import CheckpointError
from repro.models import cost, denoisers, unet
from repro.models.checkpoint import load_checkpoint
from repro.models.lightningdit import LightningDiT
from repro.models.unet import UNET_MODELS, AttentionBlock, Downsample, LabelEmbedder, ResBlock, UNet, Upsample

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def randomise(module: torch.nn.Module, seed: int = 0, std: float = 0.3) -> torch.nn.Module:
    """Every parameter random (the zero-initialised convs too), so no term of a formula hides behind a zero."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * std + (0.5 if p.ndim == 1 else 0.0))
    return module


# =============================================================================================
# repro/models/unet.py


def hand_group_norm(x: torch.Tensor, groups: int, weight: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    n, c, h, w = x.shape
    g = x.reshape(n, groups, -1)
    mean = g.mean(-1, keepdim=True)
    var = ((g - mean) ** 2).mean(-1, keepdim=True)
    out = ((g - mean) / torch.sqrt(var + 1e-5)).reshape(n, c, h, w)
    return out * weight[None, :, None, None] + bias[None, :, None, None]


def hand_silu(x: torch.Tensor) -> torch.Tensor:
    return x / (1 + torch.exp(-x))


def gn(norm: torch.nn.GroupNorm, x: torch.Tensor, groups: int) -> torch.Tensor:
    assert norm.num_groups == groups and norm.num_channels == x.shape[1]
    return hand_group_norm(x, groups, norm.weight, norm.bias)


def groups_of(ch: int) -> int:
    return {8: 8, 16: 16, 24: 8, 32: 32, 40: 8, 48: 16, 64: 32, 96: 32}[ch]  # gcd(32, ch), listed


def hand_sinusoid(t: torch.Tensor, dim: int, max_period: float = 10000.0) -> torch.Tensor:
    """cos(t f_j), then sin(t f_j), f_j = max_period^(-j / (dim // 2)), j < dim // 2; a zero column if dim is odd."""
    half = dim // 2
    out = torch.zeros(len(t), dim, dtype=torch.float64)
    for i, ti in enumerate(t.double().tolist()):
        for j in range(half):
            f = max_period ** (-j / half)
            out[i, j] = math.cos(ti * f)
            out[i, half + j] = math.sin(ti * f)
    return out


def hand_resblock(rb: ResBlock, x: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
    cin, cout = x.shape[1], rb.conv1.out_channels
    assert rb.conv1.weight.shape[2:] == rb.conv2.weight.shape[2:] == (3, 3)
    h = F.conv2d(hand_silu(gn(rb.norm1, x, groups_of(cin))), rb.conv1.weight, rb.conv1.bias, padding=1)
    h = h + (hand_silu(emb) @ rb.emb.weight.T + rb.emb.bias)[:, :, None, None]
    h = F.conv2d(hand_silu(gn(rb.norm2, h, groups_of(cout))), rb.conv2.weight, rb.conv2.bias, padding=1)
    skip = x if cin == cout else F.conv2d(x, rb.skip.weight, rb.skip.bias)
    return skip + h


def hand_unet_attention(ab: AttentionBlock, x: torch.Tensor, heads: int) -> torch.Tensor:
    """qkv = 1x1 conv of GN(x): channels [0, c) are q, [c, 2c) k, [2c, 3c) v; head j has channels [j d, (j+1) d)."""
    n, c, h, w = x.shape
    d = c // heads
    qkv = torch.einsum("oc,nchw->nohw", ab.qkv.weight[:, :, 0, 0], gn(ab.norm, x, groups_of(c)))
    qkv = (qkv + ab.qkv.bias[None, :, None, None]).reshape(n, 3 * c, h * w)
    out = torch.zeros(n, c, h * w, dtype=x.dtype)
    for j in range(heads):
        q, k, v = (qkv[:, part * c + j * d: part * c + (j + 1) * d] for part in range(3))  # (n, d, hw)
        weights = torch.softmax(torch.einsum("ndp,ndq->npq", q, k) / math.sqrt(d), dim=-1)  # p queries, q keys
        out[:, j * d:(j + 1) * d] = torch.einsum("npq,ndq->ndp", weights, v)
    proj = torch.einsum("oc,ncp->nop", ab.proj.weight[:, :, 0, 0], out) + ab.proj.bias[None, :, None]
    return x + proj.reshape(n, c, h, w)


def hand_layer(layer: torch.nn.Module, x: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
    if isinstance(layer, ResBlock):
        return hand_resblock(layer, x, emb)
    if isinstance(layer, AttentionBlock):
        return hand_unet_attention(layer, x, layer.heads)
    assert layer.conv.weight.shape == (x.shape[1], x.shape[1], 3, 3)  # a 3x3 conv keeping the width
    if isinstance(layer, Downsample):
        return F.conv2d(x, layer.conv.weight, layer.conv.bias, stride=2, padding=1)
    assert isinstance(layer, Upsample)
    big = x.repeat_interleave(2, dim=-1).repeat_interleave(2, dim=-2)
    return F.conv2d(big, layer.conv.weight, layer.conv.bias, padding=1)


def test_unet_group_norm_takes_gcd_of_32_groups_and_the_sinusoid_is_cos_then_sin():
    for ch, groups in ((16, 16), (24, 8), (48, 16), (64, 32), (96, 32)):
        norm = unet.group_norm(ch)
        assert (norm.num_groups, norm.num_channels, norm.eps, norm.affine) == (groups, ch, 1e-5, True)
    t = torch.tensor([0.0, 0.75, 3.0, 41.5, 999.0])  # 999: the last DDPM index (a wrong period shows at large t)
    for dim in (8, 9):
        emb = unet.timestep_embedding(t, dim)
        assert emb.dtype == torch.float32 and emb.shape == (5, dim)
        torch.testing.assert_close(emb.double(), hand_sinusoid(t, dim), atol=5e-5, rtol=0)
    torch.testing.assert_close(unet.timestep_embedding(t, 6, max_period=50.0).double(), hand_sinusoid(t, 6, 50.0),
                               atol=2e-5, rtol=0)
    # integer timesteps (the DDPM index) give the same features as their float values
    torch.testing.assert_close(unet.timestep_embedding(torch.tensor([3, 41]), 8), unet.timestep_embedding(
        torch.tensor([3.0, 41.0]), 8))


@pytest.mark.parametrize("cin, cout", [(16, 24), (24, 24)])
def test_unet_resblock_is_the_adm_formula(cin, cout):
    torch.manual_seed(0)
    rb = randomise(ResBlock(cin, cout, emb_dim=10, dropout=0.0)).eval()
    assert isinstance(rb.skip, torch.nn.Identity) == (cin == cout)
    x, emb = torch.randn(2, cin, 4, 4), torch.randn(2, 10)
    torch.testing.assert_close(rb(x, emb), hand_resblock(rb, x, emb), atol=1e-4, rtol=1e-4)
    # a fresh block starts as its skip (conv2 zeroed)
    fresh = ResBlock(cin, cout, emb_dim=10)
    assert fresh.conv2.weight.abs().max() == 0 and fresh.conv2.bias.abs().max() == 0
    # dropout sits right before conv2: at p = 1 in training the block gives skip(x) + conv2's bias
    drop = randomise(ResBlock(cin, cout, emb_dim=10, dropout=1.0), seed=1).train()
    assert drop.drop.p == 1.0
    skip = x if cin == cout else F.conv2d(x, drop.skip.weight, drop.skip.bias)
    expected = skip + drop.conv2.bias[None, :, None, None]
    torch.testing.assert_close(drop(x, emb), expected)


@pytest.mark.parametrize("channels, num_heads, heads", [(16, 2, 2), (24, 4, 4), (24, 5, 1), (16, 1, 1)])
def test_unet_attention_block_is_hand_written_multi_head_attention(channels, num_heads, heads):
    torch.manual_seed(1)
    ab = AttentionBlock(channels, num_heads)
    assert ab.heads == heads and ab.proj.weight.abs().max() == 0 and ab.proj.bias.abs().max() == 0  # starts as identity
    randomise(ab, seed=2)
    x = torch.randn(2, channels, 3, 2)
    torch.testing.assert_close(ab(x), hand_unet_attention(ab, x, heads), atol=1e-4, rtol=1e-4)


def test_unet_resamplers_and_label_embedder():
    torch.manual_seed(2)
    x = torch.randn(2, 8, 4, 6)
    down, up = Downsample(8), Upsample(8)
    assert down(x).shape == (2, 8, 2, 3) and up(x).shape == (2, 8, 8, 12)
    for layer in (down, up):
        torch.testing.assert_close(layer(x), hand_layer(layer, x, None))
    emb = LabelEmbedder(5, 6, dropout_prob=1.0)
    assert emb.embedding_table.num_embeddings == 6
    y = torch.tensor([0, 3, 4, 5])
    table = emb.embedding_table.weight
    torch.testing.assert_close(emb.eval()(y), table[y])  # no drop outside training
    torch.testing.assert_close(emb.train()(y), table[[5, 5, 5, 5]])  # p = 1: every label is the null class
    emb.dropout_prob = 0.0
    state = torch.get_rng_state()
    torch.testing.assert_close(emb(y), table[y])
    assert torch.equal(torch.get_rng_state(), state)  # p = 0 draws nothing (the trainer drops labels itself)
    emb.dropout_prob = 0.5
    torch.manual_seed(3)
    dropped = (emb(torch.zeros(400, dtype=torch.int64)) == table[5]).all(-1)
    assert 150 < int(dropped.sum()) < 250  # one coin per label, p = 0.5


# A non-trivial UNet: three levels (8, 16, 24), two blocks per level, attention at factor 2 only (4x4 of 8x8).
CFG = dict(input_size=8, in_channels=3, num_classes=5, channels=(8, 16, 24), num_res_blocks=2, attn_factors=(2,),
           time_dim=12, num_heads=2, dropout=0.25, class_dropout_prob=0.3, time_scale=7.0)
R, A, D, U = "ResBlock", "AttentionBlock", "Downsample", "Upsample"
# (layer, in channels, out channels) per stage, written out by hand from the architecture
DOWN = [[(R, 8, 8)], [(R, 8, 8)], [(D, 8, 8)],
        [(R, 8, 16), (A, 16, 16)], [(R, 16, 16), (A, 16, 16)], [(D, 16, 16)],
        [(R, 16, 24)], [(R, 24, 24)]]
MIDDLE = [(R, 24, 24), (A, 24, 24), (R, 24, 24)]
UP = [[(R, 48, 24)], [(R, 48, 24)], [(R, 40, 24), (U, 24, 24)],  # skips popped: 24, 24, 16 (the downsample)
      [(R, 40, 16), (A, 16, 16)], [(R, 32, 16), (A, 16, 16)], [(R, 24, 16), (A, 16, 16), (U, 16, 16)],
      [(R, 24, 8)], [(R, 16, 8)], [(R, 16, 8)]]


def layout(stage) -> list[tuple[str, int, int]]:
    out = []
    for layer in stage:
        conv = layer.conv1 if isinstance(layer, ResBlock) else (layer.qkv if isinstance(layer, AttentionBlock)
                                                                else layer.conv)
        cout = conv.out_channels // (3 if isinstance(layer, AttentionBlock) else 1)
        out.append((type(layer).__name__, conv.in_channels, cout))
    return out


def test_unet_layout_is_the_one_written_out_by_hand():
    m = UNet(**CFG)
    assert [layout(s) for s in m.down] == DOWN and layout(m.middle) == MIDDLE and [layout(s) for s in m.up] == UP
    assert m.blocks == [*m.down, m.middle, *m.up]
    assert (m.input_conv.in_channels, m.input_conv.out_channels) == (3, 8)
    assert (m.out_norm.num_channels, m.out_norm.num_groups) == (8, 8)
    assert (m.out_conv.in_channels, m.out_conv.out_channels) == (8, 3) and m.out_conv.padding == (1, 1)
    assert m.out_conv.weight.abs().max() == 0 and m.out_conv.bias.abs().max() == 0  # predicts 0 untrained
    assert (m.input_size, m.in_channels, m.out_channels, m.num_classes, m.time_dim) == (8, 3, 3, 5, 12)
    assert isinstance(m.time_scale, float) and m.time_scale == 7.0
    lin1, act, lin2 = m.t_embedder
    assert (lin1.in_features, lin1.out_features, lin2.out_features) == (12, 48, 48) and isinstance(act, torch.nn.SiLU)
    assert m.y_embedder.embedding_table.weight.shape == (6, 48) and m.y_embedder.dropout_prob == 0.3
    res = [mod for mod in m.modules() if isinstance(mod, ResBlock)]
    assert len(res) == 6 + 2 + 9 and all(r.drop.p == 0.25 and r.emb.in_features == 48 for r in res)
    assert all(a.heads == 2 for a in m.modules() if isinstance(a, AttentionBlock))
    # the halving check: 4 levels halve 3 times
    with pytest.raises(ValueError, match=r"^the UNet halves its input 3 times: input_size 12 must be a multiple of 8$"):
        UNet(input_size=12, channels=(8, 8, 8, 8), num_res_blocks=1, attn_factors=())
    UNet(input_size=8, channels=(8, 8, 8, 8), num_res_blocks=1, attn_factors=())
    one = UNet(input_size=2, channels=(8, 8), num_res_blocks=1, attn_factors=(), num_classes=1)
    assert one.y_embedder.embedding_table.num_embeddings == 2  # one class and the null class


def test_unet_constructor_defaults():
    """The signature's defaults (the registry relies on num_heads, dropout; a bare UNet() on all of them)."""
    with torch.device("meta"):
        m = UNet()
    assert (m.input_size, m.in_channels, m.num_classes, m.time_dim, m.time_scale) == (8, 4, 10, 128, 1.0)
    assert [layout(s)[0][2] for s in m.down] == [64, 64, 64, 128, 128, 128, 256, 256]  # widths, 2 blocks a level
    attn = [mod for mod in m.modules() if isinstance(mod, AttentionBlock)]
    assert len(attn) == 4 + 1 + 6 and all(a.heads == 4 for a in attn)  # factors 2 and 4 (down, up), the middle
    assert all(r.drop.p == 0.0 for r in m.modules() if isinstance(r, ResBlock))
    assert m.y_embedder.dropout_prob == 0.1 and ResBlock(8, 8, 4).drop.p == 0.0


def test_unet_forward_is_its_layers_composed_by_hand():
    torch.manual_seed(3)
    m = randomise(UNet(**CFG), seed=4, std=0.2).eval()
    x, t, y = torch.randn(2, 3, 8, 8), torch.tensor([0.13, 0.8]), torch.tensor([2, 5])  # 5 = the null class
    lin1, _, lin2 = m.t_embedder
    temb = hand_sinusoid(t * 7.0, 12).float()
    emb = hand_silu(temb @ lin1.weight.T + lin1.bias) @ lin2.weight.T + lin2.bias
    emb = emb + m.y_embedder.embedding_table.weight[y]
    h = F.conv2d(x, m.input_conv.weight, m.input_conv.bias, padding=1)
    skips = [h]
    for stage in m.down:
        for layer in stage:
            h = hand_layer(layer, h, emb)
        skips.append(h)
    for layer in m.middle:
        h = hand_layer(layer, h, emb)
    for stage in m.up:
        h = torch.cat([h, skips.pop()], dim=1)
        for layer in stage:
            h = hand_layer(layer, h, emb)
    ref = F.conv2d(hand_silu(gn(m.out_norm, h, 8)), m.out_conv.weight, m.out_conv.bias, padding=1)
    with torch.no_grad():
        out = m(x, t, y)
    assert out.shape == x.shape
    torch.testing.assert_close(out, ref, atol=2e-4, rtol=2e-4)
    # unconditional: no label embedding, the same network otherwise
    u = UNet(**{**CFG, "num_classes": 0}).eval()
    assert u.y_embedder is None
    u.load_state_dict({k: v for k, v in m.state_dict().items() if not k.startswith("y_embedder")}, strict=True)
    with torch.no_grad():
        a, b = u(x, t, torch.tensor([0, 1])), u(x, t, torch.tensor([4, 4]))
    torch.testing.assert_close(a, b)


# channels, num_res_blocks, attn_factors, time_dim of each registry size (the module's table, copied)
UNET_SIZES = {"UNet-T": ((16, 32), 1, (2,), 32), "UNet-Mini": ((32, 64, 64), 1, (2, 4), 64),
              "UNet-S": ((64, 128, 256), 2, (2, 4), 128), "UNet-B": ((128, 256, 512), 2, (2, 4), 256),
              "UNet-L": ((128, 256, 512, 1024), 3, (), 512)}


def test_unet_registry_sizes():
    assert set(UNET_MODELS) == set(UNET_SIZES)
    kw = dict(input_size=16, in_channels=3, num_classes=7, time_scale=1000.0)
    for name, (channels, blocks, attn, time_dim) in UNET_SIZES.items():
        with torch.device("meta"):
            ours = UNET_MODELS[name](**kw)
            ref = UNet(channels=channels, num_res_blocks=blocks, attn_factors=attn, time_dim=time_dim, **kw)
        assert isinstance(ours, UNet) and ours.time_scale == 1000.0, name
        assert {k: v.shape for k, v in ours.state_dict().items()} == {k: v.shape for k, v in ref.state_dict().items()}
    with torch.device("meta"):
        mini = UNET_MODELS["UNet-Mini"](input_size=8, in_channels=4, num_classes=10)
    assert 1.2e6 < sum(p.numel() for p in mini.parameters()) < 1.4e6  # "1.3M parameters, LightningDiT-Mini/2's size"


# =============================================================================================
# repro/models/denoisers.py


def test_denoisers_family_build_and_fsdp_units():
    assert denoisers.FLOW_TIME_SCALE == 1000.0
    assert all(denoisers.family_of(n) == "unet" for n in UNET_SIZES)
    assert denoisers.family_of("LightningDiT-T/1") == "dit" and denoisers.family_of("NoSuchModel") == "dit"
    cfg = ModelConfig(model_type="UNet-T", in_chans=3, class_dropout_prob=0.25)
    for process, scale in (("flow", 1000.0), ("ddpm", 1.0), (None, 1000.0)):
        m = (denoisers.build_denoiser(cfg, 16, 6) if process is None else denoisers.build_denoiser(cfg, 16, 6, process))
        assert type(m) is UNet and m.time_scale == scale
        assert (m.input_size, m.in_channels, m.num_classes, m.y_embedder.dropout_prob) == (16, 3, 6, 0.25)
        assert m.y_embedder.embedding_table.num_embeddings == 7
        assert denoisers.fsdp_units(m) == [*m.down, m.middle, *m.up, m]
    dit = denoisers.build_denoiser(ModelConfig(model_type="LightningDiT-T/1", in_chans=3, class_dropout_prob=0.0),
                                   4, 6, "ddpm")
    assert type(dit) is LightningDiT and dit.in_channels == 3 and dit.input_size == 4 and dit.num_classes == 6
    assert denoisers.fsdp_units(dit) == [*dit.blocks, dit]


def test_denoisers_combination_overrides_are_these_lists():
    ddpm = ["transport.process=ddpm", "transport.prediction=noise", "transport.schedule=linear",
            "transport.num_timesteps=1000", "transport.use_cosine_loss=false", "transport.use_lognorm=false"]
    assert denoisers.combination_overrides("dit", "flow") == ["model.model_type=LightningDiT-Mini/2"]
    assert denoisers.combination_overrides("unet", "flow") == ["model.model_type=UNet-Mini"]
    assert denoisers.combination_overrides("unet", "ddpm") == ["model.model_type=UNet-Mini", *ddpm,
                                                               "sample.sampling_method=ddim"]
    assert denoisers.combination_overrides("dit", "ddpm", "ddpm") == ["model.model_type=LightningDiT-Mini/2", *ddpm,
                                                                      "sample.sampling_method=ddpm"]
    v = [k.replace("prediction=noise", "prediction=velocity") for k in ddpm]
    assert denoisers.combination_overrides("unet", "ddpm", prediction="velocity") == ["model.model_type=UNet-Mini", *v,
                                                                                     "sample.sampling_method=ddim"]
    assert denoisers.combination_overrides("dit", "flow", prediction="velocity") == ["model.model_type=LightningDiT-Mini/2"]
    cos = [k.replace("schedule=linear", "schedule=cosine") for k in ddpm]
    # notebook 04's defaults: each family's process; DDPM with v on the cosine schedule, LightningDiT's t logit-normal
    # and the UNet's uniform, unless given
    v_cos = [k.replace("prediction=noise", "prediction=velocity") for k in cos]
    v_cos_ln = [k.replace("use_lognorm=false", "use_lognorm=true") for k in v_cos]
    assert denoisers.own_data_overrides("unet") == ("ddpm", [*v_cos, "sample.sampling_method=ddim"])
    assert denoisers.own_data_overrides("dit", "ddpm") == ("ddpm", [*v_cos_ln, "sample.sampling_method=ddim"])
    assert denoisers.own_data_overrides("unet", "", "", "", "lognorm") == ("ddpm", [*v_cos_ln,
                                                                                   "sample.sampling_method=ddim"])
    assert denoisers.own_data_overrides("dit") == ("flow", []) == denoisers.own_data_overrides("unet", "flow")
    assert denoisers.own_data_overrides("unet", "", "noise", "linear", "uniform") == ("ddpm", [*ddpm,
                                                                                     "sample.sampling_method=ddim"])
    assert denoisers.own_data_overrides("dit", "", "", "", "uniform") == ("flow", ["transport.use_lognorm=false"])
    assert denoisers.combination_overrides("unet", "flow", timesteps="lognorm") == ["model.model_type=UNet-Mini",
                                                                                    "transport.use_lognorm=true"]
    with pytest.raises(ValueError, match=r"^timesteps must be uniform or lognorm, got 'beta'$"):
        denoisers.combination_overrides("unet", "ddpm", timesteps="beta")
    with pytest.raises(ValueError, match=r"^flow matching has no noise schedule; schedule=cosine needs process=ddpm$"):
        denoisers.own_data_overrides("dit", "", "", "cosine")
    assert denoisers.combination_overrides("dit", "ddpm", schedule="cosine") == ["model.model_type=LightningDiT-Mini/2",
                                                                                *cos, "sample.sampling_method=ddim"]
    with pytest.raises(ValueError, match=r"^flow matching has no noise schedule; schedule=linear needs process=ddpm$"):
        denoisers.combination_overrides("dit", "flow", schedule="linear")
    with pytest.raises(ValueError, match=r"^schedule must be one of linear, scaled_linear, cosine, got 'sigmoid'$"):
        denoisers.combination_overrides("unet", "ddpm", schedule="sigmoid")
    with pytest.raises(ValueError, match=r"^flow matching predicts the velocity; prediction=noise needs process=ddpm$"):
        denoisers.combination_overrides("unet", "flow", prediction="noise")
    with pytest.raises(ValueError, match=r"^prediction must be noise or velocity, got 'x0'$"):
        denoisers.combination_overrides("dit", "ddpm", prediction="x0")
    with pytest.raises(ValueError, match=r"^denoiser must be one of dit, unet, got 'vit'$"):
        denoisers.combination_overrides("vit", "flow")
    with pytest.raises(ValueError, match=r"^process must be flow or ddpm, got 'sde'$"):
        denoisers.combination_overrides("dit", "sde")


# =============================================================================================
# repro/models/cost.py

GiB = 2**30
T1 = dict(model_type="LightningDiT-T/1", in_chans=4, use_qknorm=False, use_swiglu=True, use_rope=True,
          use_rmsnorm=True, wo_shift=False)
T1_FLIPPED = dict(T1, use_qknorm=True, use_swiglu=False, use_rope=False, use_rmsnorm=False, wo_shift=True)


def hand_flops(d: int, depth: int, patch: int, channels: int, tokens: int, swiglu: bool, wo_shift: bool) -> int:
    """Closed form: 2 FLOPs per weight per token (per image for adaLN and the timestep MLP), plus QK^T and AV."""
    h = int(2 / 3 * 4 * d)
    mlp = d * 2 * h + h * d if swiglu else 2 * d * 4 * d
    per_token = depth * (3 * d * d + d * d + mlp) + channels * patch * patch * d + d * patch * patch * channels
    per_image = depth * (4 if wo_shift else 6) * d * d + 2 * d * d + 256 * d + d * d
    return 2 * tokens * per_token + 2 * per_image + 4 * tokens * tokens * d * depth


def test_cost_flops_are_the_closed_form_and_what_torch_counts():
    from torch.utils.flop_counter import FlopCounterMode

    from repro.models.lightningdit import build_model

    for kw, latent, classes in ((T1, 4, 10), (dict(T1_FLIPPED, model_type="LightningDiT-Mini/2"), 6, 3)):
        cfg = ModelConfig(**kw)
        with torch.device("meta"):
            model = build_model(cfg, latent, classes)
            with FlopCounterMode(display=False) as counter:
                model(torch.randn(1, 4, latent, latent), torch.rand(1), torch.zeros(1, dtype=torch.long))
        d, depth, patch = model.hidden_size, len(model.blocks), model.patch_size
        expected = hand_flops(d, depth, patch, 4, (latent // patch) ** 2, cfg.use_swiglu, cfg.wo_shift)
        assert cost.forward_flops(cfg, latent, classes) == expected == counter.get_total_flops()
        assert cost.model_forward_flops(model) == expected and isinstance(cost.forward_flops(cfg, latent), float)
        for ckpt, hardware in ((True, 4), (False, 3)):
            assert cost.step_flops(cfg, latent, 5, ckpt, classes) == {"forward": 5 * expected, "model": 15 * expected,
                                                                    "hardware": hardware * 5 * expected}


def hand_saved_bytes(kw: dict, latent: int, micro: int, dtype) -> int:
    """Bytes autograd saves for one block, measured on a block built here from the config's flags."""
    from repro.models.lightningdit import LightningDiTBlock, VisionRotaryEmbeddingFast

    d, heads = 64, 4  # LightningDiT-T/1
    block = LightningDiTBlock(d, heads, 4.0, kw["use_qknorm"], kw["use_swiglu"], kw["use_rmsnorm"], kw["wo_shift"])
    rope = VisionRotaryEmbeddingFast(d // heads // 2, latent) if kw["use_rope"] else None
    weights = {p.untyped_storage().data_ptr() for p in block.parameters()}
    saved, alive = {}, []

    def pack(t):
        alive.append(t)
        if t.untyped_storage().data_ptr() not in weights:
            saved[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    x = torch.randn(micro, latent * latent, d, requires_grad=True)
    c = torch.randn(micro, d, requires_grad=True)
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        with torch.autocast("cpu", dtype=dtype or torch.float32, enabled=dtype is not None, cache_enabled=False):
            block(x, c, rope)
    return sum(saved.values())


def test_cost_block_activations_are_measured_on_a_block_of_the_config():
    for kw in (T1, T1_FLIPPED):
        cfg = ModelConfig(**kw, use_checkpoint=True)
        got = {(p, m): cost.measure_block_saved_bytes(cfg, 3, m, p, num_classes=7)
               for p, m in (("fp32", 1), ("fp32", 2), ("fp32", 3), ("bf16", 2), ("fp16", 2))}
        assert cfg.use_checkpoint  # the caller's config is left as it was
        assert got["fp32", 1] == hand_saved_bytes(kw, 3, 1, None) and got["fp32", 2] == hand_saved_bytes(kw, 3, 2, None)
        assert got["bf16", 2] == got["fp16", 2] == hand_saved_bytes(kw, 3, 2, torch.bfloat16) != got["fp32", 2]
        assert got["fp32", 3] - got["fp32", 2] == got["fp32", 2] - got["fp32", 1] > 0  # affine in the micro-batch


def test_cost_budget_table_text():
    b = cost.MemoryBudget([("weights", GiB), ("grads", GiB // 2)])
    assert b.total == GiB + GiB // 2
    lines = b.table().splitlines()
    assert lines == ["  weights" + " " * 52 + "   1.000 GiB", "  grads" + " " * 54 + "   0.500 GiB",
                     "  total (allocated tensors)" + " " * 34 + "   1.500 GiB"]
    assert b.table(1.5).splitlines()[-1] == "  -> fits in 1.50 GiB = 1.6 GB (CUDA context, ~0.3-0.5 GiB, comes on top)"
    assert b.table(1.49).splitlines()[-1].startswith("  -> does NOT fit in 1.49 GiB = 1.6 GB")
    assert cost.MemoryBudget().total == 0 and cost.MemoryBudget().items == []


def t1_counts(num_classes: int = 10, latent: int = 4):
    from repro.models.lightningdit import build_model

    with torch.device("meta"):
        m = build_model(ModelConfig(**T1), latent, num_classes)
    n_all = sum(p.numel() for p in m.parameters())
    n_block = sum(p.numel() for p in m.blocks[0].parameters())
    return n_all, n_all - latent * latent * 64, n_block  # pos_embed (tokens x 64) is frozen


def test_cost_memory_items_of_one_process():
    cfg = ModelConfig(**T1)
    n_all, n_train, _ = t1_counts()
    residual = 3 * 16 * 64 * 4  # micro-batch 3, 16 tokens, width 64, fp32
    widest = 2 * int(2 / 3 * 256)  # SwiGLU's w12 (340 outputs; the adaLN's 384 act per image, not per token)
    head = [(f"weights fp32 ({n_all / 1e6:.1f}M parameters)", 4 * n_all), ("gradients fp32", 4 * n_train),
            ("AdamW exp_avg + exp_avg_sq fp32", 8 * n_train)]
    tail = [("activations: embedding + final layer + loss", 4 * residual),
            ("backward transients (gradients of the widest layer output)", 2 * 3 * 16 * widest * 4)]
    b = cost.training_memory_budget(cfg, 4, 3, "bf16", True, num_classes=10, block_saved=12345)
    assert b.items == head + [("EMA fp32 on the GPU", 4 * n_all),
                              ("activations: 2 block inputs kept (checkpointing), micro-batch 3", 2 * residual),
                              ("activations: one block recomputed in backward (measured)", 12345)] + tail
    b = cost.training_memory_budget(cfg, 4, 3, "bf16", False, ema_on_device=False, fused_adam=False, num_classes=10,
                                    block_saved=5 * 2**20, shards=1)
    assert b.items == head + [("AdamW foreach temporaries (fused AdamW has none)", 4 * n_train),
                              ("EMA fp32 (on the CPU: 0 on the GPU)", 0),
                              ("activations: 2 blocks x 5 MiB (measured), micro-batch 3", 2 * 5 * 2**20)] + tail
    assert b.total == sum(v for _, v in b.items)


def test_cost_memory_items_under_fsdp():
    cfg = ModelConfig(**T1)
    n_all, n_train, n_block = t1_counts(num_classes=9)
    n_root = n_all - 2 * n_block
    ceil7 = lambda v: -(-v // 7)  # noqa: E731
    assert (4 * n_all) % 7 and (4 * n_train) % 7  # the rounding up shows
    gathered = [("FSDP gathered: root weights (embeddings, final layer) whole", 4 * n_root),
                ("FSDP gathered: 2 blocks' weights + 1 block's gradient before reduce-scatter", 12 * n_block)]
    b = cost.training_memory_budget(cfg, 4, 2, "fp32", True, fused_adam=False, num_classes=9, block_saved=1, shards=7)
    share = "1/7 per process"
    assert b.items[:7] == [(f"weights fp32 ({n_all / 1e6:.1f}M parameters), {share}", ceil7(4 * n_all)),
                           (f"gradients fp32, {share}", ceil7(4 * n_train)),
                           (f"AdamW exp_avg + exp_avg_sq fp32, {share}", ceil7(8 * n_train)),
                           ("AdamW foreach temporaries (fused AdamW has none)", ceil7(4 * n_train)),
                           (f"EMA fp32, {share}", ceil7(4 * n_all))] + gathered
    b = cost.training_memory_budget(cfg, 4, 2, "fp32", True, ema_on_device=False, num_classes=9, block_saved=1,
                                    shards=7)
    assert b.items[3] == ("EMA fp32, in host memory: 0 on the GPU", 0) and b.items[4:6] == gathered
    host = "in host memory: 0 on the GPU"
    b = cost.training_memory_budget(cfg, 4, 2, "fp32", True, fused_adam=False, num_classes=9, block_saved=1,
                                    offload=True)
    assert b.items[:6] == [(f"weights fp32 ({n_all / 1e6:.1f}M parameters), {host}", 0), (f"gradients fp32, {host}", 0),
                           (f"AdamW exp_avg + exp_avg_sq fp32, {host}", 0), (f"EMA fp32, {host}", 0)] + gathered
    assert b.items[6:8] == [("activations: 2 block inputs kept (checkpointing), micro-batch 2", 2 * 2 * 16 * 64 * 4),
                            ("activations: one block recomputed in backward (measured)", 1)]


def hand_usable(total: int) -> int:
    return int(0.92 * total) - GiB // 2


def card_with_usable(limit: int) -> int:
    """The smallest card (bytes) whose usable bytes reach `limit`: exactly `limit` (0.92 per byte steps < 1)."""
    m = math.ceil((limit + GiB // 2) / 0.92)
    while hand_usable(m) < limit:
        m += 1
    while hand_usable(m - 1) >= limit:
        m -= 1
    assert hand_usable(m) == limit
    return m


def test_cost_block_saved_fn_usable_bytes_and_fits_on_card(monkeypatch):
    cfg = ModelConfig(**T1)
    assert cost.usable_bytes(16 * GiB) == 15_268_608_737 == hand_usable(16 * GiB)  # 0.92 of the card - 0.5 GiB
    calls = []

    def fake_measure(model_cfg, latent_size, micro_batch, precision, num_classes=1000):
        calls.append((model_cfg, latent_size, micro_batch, precision, num_classes))
        return 1000 + 300 * micro_batch + (7 if precision == "bf16" else 0)

    monkeypatch.setattr(cost, "measure_block_saved_bytes", fake_measure)
    fn = cost.block_saved_fn(cfg, 4, "bf16", num_classes=9)
    assert calls == [(cfg, 4, 1, "bf16", 9), (cfg, 4, 2, "bf16", 9)]
    assert [fn(m) for m in (1, 2, 5)] == [1307, 1607, 2507]
    saved = lambda m: 4 * 2**20 * m  # noqa: E731
    for kw in (dict(checkpointing=True, ema_on_device=True), dict(checkpointing=False, ema_on_device=False),
               dict(checkpointing=True, ema_on_device=True, shards=2), dict(checkpointing=True, ema_on_device=False,
                                                                            offload=True)):
        ckpt = kw.pop("checkpointing")
        total = cost.training_memory_budget(cfg, 4, 3, "bf16", ckpt, num_classes=9, block_saved=saved(3), **kw).total
        card = card_with_usable(total)
        assert cost.fits_on_card(cfg, 4, 3, "bf16", card, checkpointing=ckpt, num_classes=9, block_saved=saved, **kw)
        assert not cost.fits_on_card(cfg, 4, 3, "bf16", card - 1, checkpointing=ckpt, num_classes=9,
                                     block_saved=saved, **kw)
    # the default class count is ImageNet's 1000
    total = cost.training_memory_budget(cfg, 4, 3, "bf16", True, num_classes=1000, block_saved=saved(3)).total
    assert cost.training_memory_budget(cfg, 4, 3, "bf16", True, block_saved=saved(3)).total == total
    assert cost.fits_on_card(cfg, 4, 3, "bf16", card_with_usable(total), checkpointing=True, ema_on_device=True,
                             block_saved=saved)
    calls.clear()  # without block_saved: one measurement at the micro-batch asked
    total = cost.training_memory_budget(cfg, 4, 3, "bf16", True, num_classes=9, block_saved=fake_measure(cfg, 4, 3,
                                                                                                       "bf16")).total
    calls.clear()
    assert cost.fits_on_card(cfg, 4, 3, "bf16", card_with_usable(total), checkpointing=True, ema_on_device=True,
                             num_classes=9)
    assert calls == [(cfg, 4, 3, "bf16", 9)]


def test_cost_layout_choice_follows_the_documented_order(monkeypatch):
    cfg = ModelConfig(**T1)
    saved = lambda m: 4 * 2**20 * m  # noqa: E731  (4 MiB per sample per block)
    pow2 = [1, 2, 4, 8, 16, 32, 64, 128]
    budget = {(ck, cpu): {m: cost.training_memory_budget(cfg, 4, m, "fp16", ck, ema_on_device=not cpu, num_classes=9,
                                                         block_saved=saved(m), shards=2).total for m in pow2}
              for ck, cpu in ((False, False), (True, False), (True, True))}

    def rule(limit, max_micro=128):
        """The docstring's order: no saver at >= 16, checkpointing at >= 8, then the EMA in host memory at >= 1."""
        for (ck, cpu), least in (((False, False), 16), ((True, False), 8), ((True, True), 1)):
            fitting = [m for m in pow2 if m <= max_micro and budget[ck, cpu][m] <= limit]
            if fitting and max(fitting) >= least:
                return max(fitting), ck, cpu, budget[ck, cpu][max(fitting)], True
        return 1, True, True, budget[True, True][1], False

    assert budget[True, False][8] < budget[False, False][16]
    cases = [budget[False, False][32], budget[False, False][16], budget[False, False][16] - 1, budget[True, False][8],
             budget[True, False][8] - 1, budget[True, True][1] - 1]  # each rule's least micro-batch exactly, and less
    expected = [(32, False, False), (16, False, False), (None, True, False), (8, True, False), (None, True, True),
                (1, True, True)]
    for limit, want in zip(cases, expected):
        got = cost.choose_training_layout(cfg, 4, card_with_usable(limit), "fp16", num_classes=9, block_saved=saved,
                                          shards=2)
        ref = rule(limit)
        assert (got.micro_batch, got.checkpointing, got.ema_on_cpu, got.peak, got.fits) == ref
        assert want[0] in (None, ref[0]) and ref[1:3] == want[1:]
        shown = f"{got.peak / GiB:.1f} GiB computed of {limit / GiB:.1f} GiB usable"
        if got.fits:
            how = ("no checkpointing" if not got.checkpointing else
                   "per-block checkpointing" + (", EMA in host memory" if got.ema_on_cpu else ""))
            assert got.reason == f"FSDP over 2 process(es), {how}: {shown}"
        else:
            assert got.reason == ("does not fit even at micro-batch 1 with checkpointing and the EMA in host memory "
                                  f"({shown}): use a smaller model")
    huge = card_with_usable(budget[False, False][128])
    assert cost.choose_training_layout(cfg, 4, huge, "fp16", num_classes=9, block_saved=saved, shards=2,
                                       max_micro=48).micro_batch == 32
    one = cost.choose_training_layout(cfg, 4, huge, "fp16", num_classes=9, block_saved=saved, offload=True)
    assert one.micro_batch == 128 and one.reason.startswith("FSDP over 1 process(es) with host-memory offload, no "
                                                            "checkpointing: ")
    assert one.peak == cost.training_memory_budget(cfg, 4, 128, "fp16", False, num_classes=9, block_saved=saved(128),
                                                   offload=True).total
    plain = cost.choose_training_layout(cfg, 4, huge, "fp16", num_classes=9, block_saved=saved, max_micro=1)
    assert (plain.micro_batch, plain.checkpointing, plain.ema_on_cpu, plain.fits) == (1, True, True, True)  # 1 < 8
    assert plain.reason.startswith("per-block checkpointing, EMA in host memory: ")
    # without block_saved: measured at micro-batches 1 and 2 for the precision asked
    calls = []
    monkeypatch.setattr(cost, "measure_block_saved_bytes",
                        lambda *a, **k: calls.append((a, k)) or 4 * 2**20 * a[2])
    assert cost.choose_training_layout(cfg, 4, huge, "bf16", num_classes=9, shards=2).micro_batch == 128
    assert [(a[0], a[1], a[2], a[3]) for a, _ in calls] == [(cfg, 4, 1, "bf16"), (cfg, 4, 2, "bf16")]
    # offloaded and not fitting: the peak reported is the offloaded one
    tight = cost.training_memory_budget(cfg, 4, 1, "fp16", True, ema_on_device=False, num_classes=9,
                                        block_saved=saved(1), offload=True).total
    got = cost.choose_training_layout(cfg, 4, card_with_usable(tight - 1), "fp16", num_classes=9, block_saved=saved,
                                      offload=True)
    assert (got.micro_batch, got.fits, got.peak) == (1, False, tight)
    # the default class count is ImageNet's 1000 (its embedding rows count in the weights)
    default = cost.choose_training_layout(cfg, 4, huge, "fp16", block_saved=saved)
    assert default.peak == cost.training_memory_budget(cfg, 4, default.micro_batch, "fp16", False, num_classes=1000,
                                                       block_saved=saved(default.micro_batch)).total


# =============================================================================================
# repro/models/checkpoint.py

EXPORT_HINT = ("Use the official file, or an EMA-only safetensors export of a kit run: "
               "`python -m steps.step11_export --from RUN_FOLDER --out DIR`")


def fake_classes(monkeypatch, names: list[str]) -> list[type]:
    """Classes pickled by reference as `names` (modules registered for the save, removed again by the caller)."""
    import sys
    import types

    out = []
    for name in names:
        module_name, _, cls_name = name.rpartition(".")
        parts = module_name.split(".")
        for i in range(1, len(parts) + 1):
            if ".".join(parts[:i]) not in sys.modules:
                monkeypatch.setitem(sys.modules, ".".join(parts[:i]), types.ModuleType(".".join(parts[:i])))
        cls = type(cls_name, (), {"__init__": lambda self, content=None: setattr(self, "content", content)})
        cls.__module__, cls.__qualname__ = module_name, cls_name
        setattr(sys.modules[module_name], cls_name, cls)
        out.append(cls)
    return out


def forget(monkeypatch, names: list[str]) -> None:
    import sys

    for name in names:
        monkeypatch.delitem(sys.modules, name.rpartition(".")[0], raising=False)


def test_checkpoint_placeholders_keep_the_state_and_the_log_names_the_types(tmp_path, monkeypatch, capsys):
    from repro.models.checkpoint import MetadataPlaceholder, read_checkpoint

    import argparse

    names = ["omegaconf.dictconfig.DictConfig", "omegaconf.listconfig.ListConfig", "lightning.fabric.Fabric",
             "pytorch_lightning.callbacks.ModelCheckpoint"]  # and argparse.Namespace, the real one
    classes = fake_classes(monkeypatch, names)

    for count in (5, 4):
        objs = [cls({"lr": i}) for i, cls in enumerate(classes[:count - 1])] + [argparse.Namespace(a=1)]
        path = tmp_path / f"run{count}.ckpt"
        torch.save({"state_dict": {"w": torch.ones(2)}, "meta": objs}, path)
        listed = list(torch.serialization.get_unsafe_globals_in_checkpoint(str(path)))
        assert len(listed) == count
        forget(monkeypatch, names)  # the loader must not need the real packages
        monkeypatch.setenv("TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD", "1")  # and stays weights-only when told otherwise
        capsys.readouterr()
        obj = read_checkpoint(path, metadata_placeholders=True)
        more = " ..." if count > 4 else ""
        assert capsys.readouterr().out == (f"{path.name}: {count} run-metadata type(s) read as inert placeholders "
                                           f"({', '.join(listed[:4])}{more}); only tensors are used\n")
        monkeypatch.delenv("TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD")
        assert torch.equal(obj["state_dict"]["w"], torch.ones(2))
        first = obj["meta"][0]
        assert isinstance(first, MetadataPlaceholder) and type(first).__name__ == "DictConfig"
        assert first.original == "omegaconf.dictconfig.DictConfig" and first.state == {"content": {"lr": 0}}
        assert repr(first) == "<placeholder for omegaconf.dictconfig.DictConfig>"
        classes = fake_classes(monkeypatch, names)
    # a framework file is refused where placeholders were not asked for: load_checkpoint never reads metadata
    with pytest.raises(CheckpointError, match="refuses"):
        load_checkpoint(torch.nn.Linear(2, 1), tmp_path / "run5.ckpt")


def test_checkpoint_refusal_messages_are_exact(tmp_path, monkeypatch):
    from repro.models.checkpoint import read_checkpoint

    names = [f"mylib.config.Setting{i}" for i in range(6)]  # CapWords classes, but of no metadata module
    classes = fake_classes(monkeypatch, names)
    path = tmp_path / "other.ckpt"
    torch.save({"state_dict": {"w": torch.ones(2)}, "meta": [cls() for cls in classes]}, path)
    listed = list(torch.serialization.get_unsafe_globals_in_checkpoint(str(path)))
    forget(monkeypatch, names)
    with pytest.raises(CheckpointError) as err:
        read_checkpoint(path, metadata_placeholders=True)
    assert str(err.value) == (f"{path} holds Python objects that a weights-only load refuses "
                              f"({', '.join(listed[:5])}); they are not executed. {EXPORT_HINT} "
                              "(Pipeline.from_pretrained(RUN).export(DIR))")
    try:
        torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        first_line = str(e).splitlines()[0]
    with pytest.raises(CheckpointError) as err:
        read_checkpoint(path)
    assert str(err.value) == (f"{path} holds Python objects that a weights-only load refuses ({first_line}); "
                              f"this file is not a plain checkpoint and is not executed. {EXPORT_HINT}")


class _Marker:
    def __init__(self, path):
        self.path = str(path)

    def __reduce__(self):
        return (open, (self.path, "w"))


def test_checkpoint_plain_pickles_are_refused_even_with_placeholders(tmp_path, monkeypatch):
    """A raw pickle (or a pre-zip torch.save) has no zip directory to list globals from: still a CheckpointError."""
    from repro.models.checkpoint import read_checkpoint

    marker = tmp_path / "code_ran"
    raw, legacy = tmp_path / "raw.pkl", tmp_path / "legacy.pt"
    with open(raw, "wb") as f:
        pickle.dump({"w": torch.ones(2), "evil": _Marker(marker)}, f)
    torch.save({"w": torch.ones(2), "evil": _Marker(marker)}, legacy, _use_new_zipfile_serialization=False)
    monkeypatch.setenv("TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD", "1")
    for path in (raw, legacy):
        for placeholders in (False, True):
            with pytest.raises(CheckpointError, match=f"^{path} holds Python objects that a weights-only load refuses "
                                                      r"\(Weights only load failed"):  # torch's own words
                read_checkpoint(path, metadata_placeholders=placeholders)
    assert not marker.exists()


def test_checkpoint_memory_mapping_only_when_asked(tmp_path, monkeypatch):
    from repro.models.checkpoint import read_checkpoint

    maps = Path("/proc/self/maps")
    if not maps.exists():
        pytest.skip("needs /proc/self/maps")
    for name, mmap in (("plain.pt", False), ("mapped.pt", True)):
        torch.save({"w": torch.arange(4096.0)}, tmp_path / name)
        held = read_checkpoint(tmp_path / name, mmap=mmap) if mmap else read_checkpoint(tmp_path / name)
        assert torch.equal(held["w"], torch.arange(4096.0))
        assert (str(tmp_path / name) in maps.read_text()) == mmap, name
    torch.save({"w": torch.ones(3)}, tmp_path / "legacy.pt", _use_new_zipfile_serialization=False)
    assert torch.equal(read_checkpoint(tmp_path / "legacy.pt", mmap=True)["w"], torch.ones(3))  # pre-zip: read as usual
    # the corrupt-file message keeps the first 200 characters of the first line of torch's error
    monkeypatch.setattr(torch, "load", lambda *a, **k: (_ for _ in ()).throw(RuntimeError("E" * 250 + "\nmore")))
    with pytest.raises(CheckpointError) as err:
        read_checkpoint(tmp_path / "plain.pt")
    assert str(err.value) == (f"{tmp_path / 'plain.pt'} is truncated or corrupt ({'E' * 200}); "
                              "delete it and download/save it again")


def test_checkpoint_key_and_shape_messages_are_exact(tmp_path):
    from repro.models.checkpoint import check_state_dict

    model = torch.nn.Sequential(*[torch.nn.Linear(2, 2) for _ in range(4)])  # keys 0.weight, 0.bias, ... 3.bias
    keys = list(model.state_dict())
    hint = "(is model.model_type / the config right for this checkpoint?)"

    def message(sd):
        with pytest.raises(CheckpointError) as err:
            check_state_dict(model, sd, "P")
        return str(err.value)

    full = dict(model.state_dict())
    six = {k: v for k, v in full.items() if k not in keys[:6]} | {f"x{i}": torch.zeros(1) for i in range(6)}
    assert message(six) == (f"P does not match the model: 6 missing key(s): {', '.join(keys[:5])} ...; "
                            f"6 unexpected key(s): x0, x1, x2, x3, x4 ... {hint}")
    five = {k: v for k, v in full.items() if k not in keys[:5]} | {f"x{i}": torch.zeros(1) for i in range(5)}
    assert message(five) == (f"P does not match the model: 5 missing key(s): {', '.join(keys[:5])}; "
                             f"5 unexpected key(s): x0, x1, x2, x3, x4 {hint}")
    assert message({k: v for k, v in full.items() if k != "2.bias"}) == (
        f"P does not match the model: 1 missing key(s): 2.bias {hint}")
    assert message(full | {"extra": torch.zeros(1)}) == f"P does not match the model: 1 unexpected key(s): extra {hint}"
    assert message(full | {"1.weight": torch.zeros(2, 3)}) == (
        "P: '1.weight' has shape (2, 3) but the model expects (2, 2) (check model.model_type, model.in_chans, "
        "data.image_size / vae.downsample_ratio and num_classes)")
    check_state_dict(model, full, "P")  # a match says nothing
    torch.save({"model": full | {"extra": torch.zeros(1)}}, tmp_path / "keys.pt")
    with pytest.raises(CheckpointError) as err:
        load_checkpoint(model, tmp_path / "keys.pt")
    assert str(err.value) == f"{tmp_path / 'keys.pt'} does not match the model: 1 unexpected key(s): extra {hint}"


def test_checkpoint_what_is_picked_inside_a_file(tmp_path):
    from repro.models.checkpoint import MetadataPlaceholder, select_state_dict, strip_prefixes

    model = torch.nn.Linear(2, 1)
    sd = {k: v + 1 for k, v in model.state_dict().items()}
    assert strip_prefixes({"_orig_mod.module.weight": 1, "module._orig_mod.module.bias": 2, "modules.x": 3}) == {
        "weight": 1, "bias": 2, "modules.x": 3}  # compiled inside DDP, in either order, repeated; a look-alike kept
    torch.save({"ema": {f"_orig_mod.module.{k}": v for k, v in sd.items()}, "step": 3}, tmp_path / "ema_only.pt")
    assert load_checkpoint(model, tmp_path / "ema_only.pt", prefer="model") == {"path": str(tmp_path / "ema_only.pt"),
                                                                               "source": "ema"}  # falls back to ema
    assert torch.equal(model.weight, sd["weight"])
    torch.save(sd, tmp_path / "bare.pt")
    assert load_checkpoint(model, tmp_path / "bare.pt") == {"path": str(tmp_path / "bare.pt"), "source": "state_dict"}
    assert select_state_dict({"state_dict": sd, "ema": 3}) == (sd, "state_dict")  # under 'state_dict' (Lightning)
    with pytest.raises(CheckpointError) as err:
        select_state_dict([1, 2], "F")
    assert str(err.value) == "F holds a list, not a state dict or a dict with 'ema'/'model'"
    with pytest.raises(CheckpointError, match="^<checkpoint> holds a dict_keys"):  # no path given
        select_state_dict({}.keys())
    mixed = {"w": torch.ones(1), **{f"k{i}": i for i in range(9)}}  # tensors and other things: not a bare state dict
    with pytest.raises(CheckpointError) as err:
        select_state_dict(mixed, "F")
    assert str(err.value) == ("F has neither 'ema' nor 'model' weights and is not a bare state dict (top-level keys: "
                              "k0, k1, k2, k3, k4, k5, k6, k7)")
    torch.save([1, 2], tmp_path / "list.pt")
    with pytest.raises(CheckpointError, match=f"^{tmp_path / 'list.pt'} holds a list"):
        load_checkpoint(model, tmp_path / "list.pt")
    from repro.models.checkpoint import read_state_dict

    with pytest.raises(CheckpointError, match=f"^{tmp_path / 'list.pt'} holds a list"):
        read_state_dict(tmp_path / "list.pt")
    torch.save({"model": {"a": torch.zeros(1)}, "ema": {"b": torch.ones(1)}}, tmp_path / "two.pt")
    assert list(read_state_dict(tmp_path / "two.pt")) == ["b"]
    assert list(read_state_dict(tmp_path / "two.pt", "model")) == ["a"]
    p = MetadataPlaceholder(1, k=2)
    assert (p.args, p.kwargs, p.state, repr(p)) == ((1,), {"k": 2}, None, "<placeholder for ?>")


def as_if_saved_on_mps(path: Path) -> None:
    """Rewrite torch.save's storage location tag 'cpu' to 'mps' (same length: the zip stays valid), as a file
    written on another accelerator carries its device."""
    data = path.read_bytes()
    assert data.count(b"X\x03\x00\x00\x00cpu") >= 1
    path.write_bytes(data.replace(b"X\x03\x00\x00\x00cpu", b"X\x03\x00\x00\x00mps"))


def test_checkpoint_a_file_written_on_another_device_loads_on_the_cpu(tmp_path, monkeypatch):
    from repro.models.checkpoint import read_checkpoint

    path = tmp_path / "gpu.pt"
    torch.save({"ema": {"w": torch.arange(3.0)}}, path)
    as_if_saved_on_mps(path)
    for mmap in (False, True):
        w = read_checkpoint(path, mmap=mmap)["ema"]["w"]
        assert w.device.type == "cpu" and torch.equal(w, torch.arange(3.0))
    (cls,) = fake_classes(monkeypatch, ["omegaconf.dictconfig.DictConfig"])
    torch.save({"state_dict": {"w": torch.arange(3.0)}, "hparams": cls({"lr": 1})}, tmp_path / "gpu.ckpt")
    as_if_saved_on_mps(tmp_path / "gpu.ckpt")
    forget(monkeypatch, ["omegaconf.dictconfig.DictConfig"])
    w = read_checkpoint(tmp_path / "gpu.ckpt", metadata_placeholders=True)["state_dict"]["w"]
    assert w.device.type == "cpu" and torch.equal(w, torch.arange(3.0))


# =============================================================================================
# repro/models/lightningdit.py (beyond tests/test_mutants_lightningdit.py: the fixture checkpoint there is loaded
# over every weight, so these build models from scratch: initialisation, the fixed position table, the LayerNorm /
# GELU layout, learn_sigma, checkpointing, the CFG forward's edge cases, the registry and the builders)

# depth, hidden, patch, heads (upstream's table + the kit's three)
REGISTRY = {"LightningDiT-B/1": (12, 768, 1, 12), "LightningDiT-B/2": (12, 768, 2, 12),
            "LightningDiT-L/2": (24, 1024, 2, 16), "LightningDiT-XL/1": (28, 1152, 1, 16),
            "LightningDiT-XL/2": (28, 1152, 2, 16), "LightningDiT-1p0B/1": (24, 1536, 1, 24),
            "LightningDiT-1p0B/2": (24, 1536, 2, 24), "LightningDiT-1p6B/1": (28, 1792, 1, 28),
            "LightningDiT-1p6B/2": (28, 1792, 2, 28), "LightningDiT-T/1": (2, 64, 1, 4),
            "LightningDiT-Mini/2": (4, 128, 2, 4), "LightningDiT-Mini/4": (4, 128, 4, 4)}


def hand_pos_embed(hidden: int, side: int) -> torch.Tensor:
    """MAE 2-D sin-cos: token r * side + c; first half encodes the column c, second the row r; each half is
    [sin(p w_j), cos(p w_j)] with w_j = 10000^(-j / (hidden / 4)), j < hidden / 4."""
    quarter = hidden // 4
    out = torch.zeros(side * side, hidden, dtype=torch.float64)
    for r in range(side):
        for c in range(side):
            for half, p in ((0, c), (1, r)):
                for j in range(quarter):
                    w = 10000.0 ** (-j / quarter)
                    out[r * side + c, half * 2 * quarter + j] = math.sin(p * w)
                    out[r * side + c, half * 2 * quarter + quarter + j] = math.cos(p * w)
    return out


def hand_gelu_tanh(x: torch.Tensor) -> torch.Tensor:
    return 0.5 * x * (1 + torch.tanh(math.sqrt(2 / math.pi) * (x + 0.044715 * x ** 3)))


def hand_layer_norm(x: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    mean = x.mean(-1, keepdim=True)
    return (x - mean) / torch.sqrt(((x - mean) ** 2).mean(-1, keepdim=True) + eps)


def tiny_dit(**kw) -> LightningDiT:
    args = dict(input_size=4, patch_size=1, in_channels=4, hidden_size=32, depth=1, num_heads=2, num_classes=5)
    return LightningDiT(**{**args, **kw})


def test_lightningdit_fresh_model_position_table_and_initialisation():
    from repro.models.lightningdit import get_2d_sincos_pos_embed

    torch.manual_seed(0)
    m = LightningDiT(input_size=6, patch_size=2, in_channels=4, hidden_size=64, depth=2, num_heads=4, num_classes=1000)
    torch.testing.assert_close(m.pos_embed[0].double(), hand_pos_embed(64, 3), rtol=0, atol=1e-6)
    assert not m.pos_embed.requires_grad  # frozen, as upstream
    torch.testing.assert_close(torch.from_numpy(get_2d_sincos_pos_embed(16, 5)).double(), hand_pos_embed(16, 5),
                               rtol=0, atol=1e-6)
    # DiT initialisation: xavier-uniform linears with zero biases, the patch conv as a (D, C p p) matrix
    for name, mod in m.named_modules():
        if isinstance(mod, torch.nn.Linear):
            assert mod.bias.abs().max() == 0, name
            if "adaLN" not in name and "final_layer" not in name and "t_embedder" not in name:
                bound = math.sqrt(6 / (mod.in_features + mod.out_features))
                assert 0.9 * bound < mod.weight.abs().max() <= bound, name
    w = m.x_embedder.proj.weight
    bound = math.sqrt(6 / (64 + 4 * 2 * 2))
    assert 0.9 * bound < w.abs().max() <= bound and m.x_embedder.proj.bias.abs().max() == 0
    for p in (m.y_embedder.embedding_table.weight, m.t_embedder.mlp[0].weight, m.t_embedder.mlp[2].weight):
        assert abs(float(p.detach().std()) - 0.02) < 0.001
    zeroed = [*m.final_layer.adaLN_modulation[-1].parameters(), *m.final_layer.linear.parameters()]
    zeroed += [p for b in m.blocks for p in b.adaLN_modulation[-1].parameters()]
    assert len(zeroed) == 8 and all(p.abs().max() == 0 for p in zeroed)
    # the timm attributes of the patch embedding and DiT's of the timestep embedder
    assert (m.x_embedder.patch_size, m.x_embedder.grid_size, m.x_embedder.num_patches) == ((2, 2), 3, 9)
    assert m.t_embedder.frequency_embedding_size == 256
    assert (m.in_channels, m.out_channels, m.num_heads, m.num_classes, m.input_size, m.use_checkpoint,
            m.learn_sigma) == (4, 4, 4, 1000, 6, False, False)


def test_lightningdit_layernorm_gelu_layout_is_the_hand_formula():
    """use_rmsnorm / use_swiglu off: LayerNorm without affine (eps 1e-6) and timm's Mlp with tanh-GELU."""
    from repro.models.lightningdit import Attention, FinalLayer, LightningDiTBlock, Mlp
    from tests.test_mutants_lightningdit import hand_attention

    torch.manual_seed(1)
    block = randomise(LightningDiTBlock(32, 2, mlp_ratio=2.0), seed=6, std=0.2).double()
    for norm in (block.norm1, block.norm2):
        assert isinstance(norm, torch.nn.LayerNorm) and not norm.elementwise_affine and norm.eps == 1e-6
    assert isinstance(block.mlp, Mlp) and block.mlp.fc1.out_features == 64 and not block.wo_shift
    x, c = torch.randn(2, 5, 32, dtype=torch.float64), torch.randn(2, 32, dtype=torch.float64)
    mod = hand_silu(c) @ block.adaLN_modulation[1].weight.T + block.adaLN_modulation[1].bias
    sh1, sc1, g1, sh2, sc2, g2 = (mod[:, i * 32:(i + 1) * 32, None].transpose(1, 2) for i in range(6))
    h = x + g1 * hand_attention(block.attn, hand_layer_norm(x) * (1 + sc1) + sh1, None)
    mlp_in = hand_layer_norm(h) * (1 + sc2) + sh2
    fc1, fc2 = block.mlp.fc1, block.mlp.fc2
    mlp = hand_gelu_tanh(mlp_in @ fc1.weight.T + fc1.bias) @ fc2.weight.T + fc2.bias
    with torch.no_grad():
        torch.testing.assert_close(block(x, c), h + g2 * mlp, rtol=1e-6, atol=1e-6)
    final = randomise(FinalLayer(32, 2, 3), seed=7, std=0.2).double()
    assert isinstance(final.norm_final, torch.nn.LayerNorm) and not final.norm_final.elementwise_affine
    assert final.norm_final.eps == 1e-6
    shift, scale = (hand_silu(c) @ final.adaLN_modulation[1].weight.T + final.adaLN_modulation[1].bias).chunk(2, dim=1)
    ref = (hand_layer_norm(x) * (1 + scale[:, None]) + shift[:, None]) @ final.linear.weight.T + final.linear.bias
    with torch.no_grad():
        torch.testing.assert_close(final(x, c), ref, rtol=1e-6, atol=1e-6)
    # Attention: no QK-norm by default, LayerNorm (eps 1e-5) QK-norm without RMSNorm, RMSNorm QK-norm in an RMS block
    assert isinstance(Attention(32, 2).q_norm, torch.nn.Identity)
    qk = Attention(32, 2, qk_norm=True)
    assert isinstance(qk.q_norm, torch.nn.LayerNorm) and qk.q_norm.eps == qk.k_norm.eps == 1e-5
    rms_block = LightningDiTBlock(32, 2, use_qknorm=True, use_rmsnorm=True)
    assert type(rms_block.attn.q_norm).__name__ == type(rms_block.norm1).__name__ == "RMSNorm"
    with pytest.raises(AssertionError, match="^hidden_size must be divisible by num_heads$"):
        Attention(30, 4)


def test_lightningdit_constructor_defaults_are_upstream_xl2_without_the_options():
    from repro.models.lightningdit import FinalLayer, LightningDiTBlock, Mlp

    with torch.device("meta"):
        m = LightningDiT()
    assert (m.input_size, m.patch_size, m.in_channels, m.out_channels, m.hidden_size, m.depth, m.num_heads) == (
        32, 2, 32, 32, 1152, 28, 16)
    assert m.num_classes == 1000 and m.y_embedder.embedding_table.num_embeddings == 1001  # dropout 0.1: a null row
    assert m.y_embedder.dropout_prob == 0.1 and not m.use_checkpoint and m.feat_rope is None
    b = m.blocks[0]
    assert isinstance(b.mlp, Mlp) and b.mlp.fc1.out_features == 4 * 1152 and isinstance(b.norm1, torch.nn.LayerNorm)
    assert isinstance(b.attn.q_norm, torch.nn.Identity) and b.adaLN_modulation[1].out_features == 6 * 1152
    small = LightningDiTBlock(16, 2)
    assert isinstance(small.mlp, Mlp) and small.mlp.fc1.out_features == 64
    assert isinstance(small.norm1, torch.nn.LayerNorm)
    assert isinstance(small.attn.q_norm, torch.nn.Identity) and not small.wo_shift
    assert isinstance(FinalLayer(16, 2, 4).norm_final, torch.nn.LayerNorm)


def test_lightningdit_rms_norm_timestep_features_and_low_precision():
    from repro.models.lightningdit import RMSNorm, TimestepEmbedder, VisionRotaryEmbeddingFast

    torch.manual_seed(2)
    norm = RMSNorm(16)
    with torch.no_grad():
        norm.weight.copy_(torch.rand(16) + 0.5)
    x = torch.randn(3, 16) * 1e-4  # mean square 1e-8: the eps (1e-6) dominates, a wrong eps shows
    xf = x.double()
    torch.testing.assert_close(norm(x).double(), xf / torch.sqrt((xf * xf).mean(-1, keepdim=True) + 1e-6)
                               * norm.weight.double(), rtol=1e-5, atol=0)
    xb = torch.randn(3, 16).bfloat16()  # low-precision input, float32 weight: normalised in float32, rounded once
    xbf = xb.float()
    ref = (xbf * torch.rsqrt(xbf.pow(2).mean(-1, keepdim=True) + 1e-6)).bfloat16() * norm.weight
    assert torch.equal(norm(xb), ref)
    norm_b = RMSNorm(16).bfloat16()
    with torch.no_grad():
        norm_b.weight.copy_(torch.rand(16) + 0.5)
    ref = (xbf * torch.rsqrt(xbf.pow(2).mean(-1, keepdim=True) + 1e-6)).bfloat16() * norm_b.weight
    assert norm_b(xb).dtype == torch.bfloat16 and torch.equal(norm_b(xb), ref)
    # the timestep features: cos then sin of t 10000^(-j/128), j < 128, before the MLP
    emb = TimestepEmbedder(32)
    seen = []
    emb.mlp[0].register_forward_hook(lambda mod, inp, out: seen.append(inp[0]))
    t = torch.tensor([0.0, 0.25, 1.0, 37.0, 999.0])
    emb(t)
    torch.testing.assert_close(seen[0].double(), hand_sinusoid(t, 256), rtol=0, atol=2e-4)
    assert emb.to(torch.bfloat16)(t).dtype == torch.bfloat16  # a bf16 copy of the model takes float t
    rope = VisionRotaryEmbeddingFast(4, 3)
    assert rope(torch.randn(1, 2, 9, 8).bfloat16()).dtype == torch.bfloat16  # q/k stay in their compute dtype


def test_lightningdit_label_dropout_learn_sigma_and_checkpointing():
    torch.manual_seed(3)
    assert tiny_dit(class_dropout_prob=0.0).y_embedder.embedding_table.num_embeddings == 5  # no null row without CFG
    m = tiny_dit(class_dropout_prob=0.0).train()
    state = torch.get_rng_state()
    m.y_embedder(torch.tensor([1, 2]), True)
    assert torch.equal(torch.get_rng_state(), state)  # p = 0: no coin drawn
    # the model passes its training flag to the label embedder: at p = 1 every label is the null class
    m = randomise(tiny_dit(class_dropout_prob=1.0), seed=8, std=0.2)
    x, t = torch.randn(2, 4, 4, 4), torch.rand(2)
    with torch.no_grad():
        dropped = m.train()(x, t, torch.tensor([1, 2]))
        torch.testing.assert_close(dropped, m.eval()(x, t, torch.tensor([5, 5])))
        assert not torch.allclose(dropped, m.eval()(x, t, torch.tensor([1, 2])))
    # learn_sigma: twice the output channels, the first half returned
    s = randomise(tiny_dit(patch_size=2, learn_sigma=True), seed=9, std=0.2).eval()
    assert s.out_channels == 8 and s.final_layer.linear.out_features == 2 * 2 * 8
    seen = []
    s.final_layer.register_forward_hook(lambda mod, inp, out: seen.append(out))
    with torch.no_grad():
        out = s(x, t, torch.tensor([1, 2]))
    tokens = seen[0]  # (N, 4 tokens of a 2x2 grid, p * p * 8)
    ref = torch.zeros(2, 8, 4, 4)
    for r in range(2):
        for c in range(2):
            ref[:, :, 2 * r:2 * r + 2, 2 * c:2 * c + 2] = tokens[:, r * 2 + c].reshape(2, 2, 2, 8).permute(0, 3, 1, 2)
    torch.testing.assert_close(out, ref[:, :4])
    # per-block checkpointing: the block runs again in backward, only when asked and only with gradients on
    for use_checkpoint, grad, runs in ((True, True, 2), (True, False, 1), (False, True, 1)):
        c = randomise(tiny_dit(use_checkpoint=use_checkpoint), seed=10, std=0.2).train()
        calls = []
        c.blocks[0].register_forward_pre_hook(lambda mod, inp: calls.append(1))
        with torch.set_grad_enabled(grad):
            out = c(x, t, torch.tensor([1, 2]))
            if grad:  # non-reentrant checkpointing: torch.autograd.grad reaches the weights inside the block
                (g,) = torch.autograd.grad(out.square().sum(), [c.blocks[0].attn.qkv.weight])
                assert g.abs().sum() > 0
        assert len(calls) == runs, (use_checkpoint, grad)


def test_lightningdit_cfg_forward_edge_cases():
    from repro.transport.guidance import combine_cfg

    torch.manual_seed(4)
    m = randomise(tiny_dit(input_size=2), seed=11, std=0.3).eval()
    half = torch.randn(3, 4, 2, 2)
    x = torch.cat([half, torch.randn(3, 4, 2, 2)])  # the second half is ignored
    y = torch.tensor([0, 1, 2, 5, 5, 5])

    def reference(t, scale, n, guide=True):
        with torch.no_grad():
            out = m(torch.cat([half, half]), t, y)
        cond, uncond = out[:3], out[3:]
        g = torch.cat([uncond[:, :n] + scale * (cond[:, :n] - uncond[:, :n]), cond[:, n:]], dim=1) if guide else cond
        return torch.cat([g, torch.cat([g[:, :n], uncond[:, n:]], dim=1)])

    with torch.no_grad():
        t = torch.full((6,), 0.5)
        torch.testing.assert_close(m.forward_with_cfg(x, t, y, 3.0), reference(t, 3.0, 3))  # defaults: 3 channels
        torch.testing.assert_close(m.forward_with_cfg(x, t, y, 3.0, cfg_channels=None), reference(t, 3.0, 4))
        torch.testing.assert_close(m.forward_with_cfg(x, t, y, 3.0, cfg_channels=None)[:3],
                                   combine_cfg(*m(torch.cat([half, half]), t, y).chunk(2), 3.0, None))
        # the interval is decided by the first sample's time (upstream: one t per batch); guidance from t = start on
        t = torch.tensor([0.05, 0.9, 0.9, 0.05, 0.9, 0.9])
        torch.testing.assert_close(m.forward_with_cfg(x, t, y, 3.0, cfg_interval=True, cfg_interval_start=0.1),
                                   reference(t, 3.0, 3, guide=False))
        t = torch.tensor([0.25, 0.0, 0.0, 0.25, 0.0, 0.0])  # t[0] == start exactly (0.25 is exact in float32)
        torch.testing.assert_close(m.forward_with_cfg(x, t, y, 3.0, cfg_interval=True, cfg_interval_start=0.25),
                                   reference(t, 3.0, 3))
        t = torch.full((6,), 0.5)  # the interval switched on without a start: guidance everywhere (start 0)
        torch.testing.assert_close(m.forward_with_cfg(x, t, y, 3.0, cfg_interval=True), reference(t, 3.0, 3))


def test_lightningdit_registry_names_and_builder():
    from repro.errors import ConfigError
    from repro.models.lightningdit import LIGHTNINGDIT_MODELS, RMSNorm, SwiGLUFFN, build_model, create_model

    assert set(LIGHTNINGDIT_MODELS) == set(REGISTRY)
    with torch.device("meta"):
        for name, (depth, hidden, patch, heads) in REGISTRY.items():
            m = create_model(name, input_size=8, in_channels=3, num_classes=7)
            assert (m.depth, len(m.blocks), m.hidden_size, m.patch_size, m.num_heads) == (depth, depth, hidden, patch,
                                                                                           heads), name
            assert m.x_embedder.proj.kernel_size == (patch, patch) and m.blocks[0].attn.num_heads == heads
            assert m.in_channels == 3 and m.x_embedder.proj.in_channels == 3 and m.input_size == 8
    with pytest.raises(ConfigError) as err:
        create_model("LightningDiT-XL1")
    assert str(err.value) == "unknown model.model_type 'LightningDiT-XL1'; did you mean 'LightningDiT-XL/1'?"
    with pytest.raises(ConfigError) as err:
        create_model("Foo")
    assert str(err.value) == f"unknown model.model_type 'Foo'; known: {', '.join(REGISTRY)}"
    # build_model: every key of the model section reaches the model; keyword overrides win
    on = dict(use_qknorm=True, use_swiglu=True, use_rope=True, use_rmsnorm=True, wo_shift=True, use_checkpoint=True)
    for flag in (True, False):
        cfg = ModelConfig(model_type="LightningDiT-T/1", in_chans=3 if flag else 5,
                          class_dropout_prob=0.3 if flag else 0.0, **{k: v == flag for k, v in on.items()})
        with torch.device("meta"):
            m = build_model(cfg, 6, 9)
        b = m.blocks[0]
        assert (m.input_size, m.in_channels, m.num_classes, m.y_embedder.dropout_prob) == (6, cfg.in_chans, 9,
                                                                                         cfg.class_dropout_prob)
        assert isinstance(b.attn.q_norm, torch.nn.Identity) != cfg.use_qknorm
        assert isinstance(b.mlp, SwiGLUFFN) == cfg.use_swiglu and (m.feat_rope is not None) == cfg.use_rope
        assert isinstance(b.norm1, RMSNorm) == cfg.use_rmsnorm and b.wo_shift == cfg.wo_shift
        assert m.use_checkpoint == cfg.use_checkpoint
    with torch.device("meta"):
        assert build_model(cfg, 6, 9, use_checkpoint=True, in_channels=2).in_channels == 2

