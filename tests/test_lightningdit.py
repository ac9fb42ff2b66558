"""LightningDiT parity with upstream: key/shape manifest, parameter formula, forward and CFG fixtures."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

from repro.models.lightningdit import LIGHTNINGDIT_MODELS, LightningDiT, create_model
from tests.conftest import REFERENCE

DIT_FIXTURE = REFERENCE / "dit_p1_swiglu_rope_rms.safetensors"
DIT_SIDECAR = REFERENCE / "dit_p1_swiglu_rope_rms.json"
OFFICIAL_XL1 = dict(input_size=16, in_channels=32, num_classes=1000, use_swiglu=True, use_rope=True, use_rmsnorm=True)


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm())


def load_fixture_model() -> tuple[LightningDiT, dict]:
    tensors = load_file(str(DIT_FIXTURE))
    side = json.loads(DIT_SIDECAR.read_text())
    kw = dict(side["model"])
    model = LightningDiT(**kw).eval()
    sd = {k[2:]: v for k, v in tensors.items() if k.startswith("w.")}
    model.load_state_dict(sd, strict=True)
    return model, tensors


def test_xl1_state_dict_matches_manifest():
    manifest = json.loads((REFERENCE / "lightningdit_xl1_state_dict.json").read_text())
    with torch.device("meta"):
        model = create_model("LightningDiT-XL/1", **OFFICIAL_XL1)
    ours = {k: list(v.shape) for k, v in model.state_dict().items()}
    assert ours == manifest["shapes"]  # 351 tensors, RoPE buffers included
    # The parameter count (pos_embed is a frozen parameter; the RoPE tables are buffers).
    assert sum(p.numel() for p in model.parameters()) == manifest["num_params"] == 675_256_736


def upstream_param_formula(depth, hidden, patch, heads, in_ch=32, classes=1000, input_size=16):
    """Parameter count of upstream LightningDiT (SwiGLU, RoPE, RMSNorm, shift on); RoPE buffers excluded."""
    d = hidden
    swiglu_hidden = int(2 / 3 * int(d * 4.0))
    tokens = (input_size // patch) ** 2
    block = (
        d * 3 * d + 3 * d  # qkv
        + d * d + d  # proj
        + d * 2 * swiglu_hidden + 2 * swiglu_hidden  # w12
        + swiglu_hidden * d + d  # w3
        + 2 * d  # norm1, norm2 (RMSNorm weights)
        + d * 6 * d + 6 * d  # adaLN
    )
    embed = (
        in_ch * patch * patch * d + d  # x_embedder conv
        + 256 * d + d + d * d + d  # t_embedder
        + (classes + 1) * d  # y_embedder with the null row
        + tokens * d  # pos_embed (a frozen parameter upstream)
    )
    final = d + d * 2 * d + 2 * d + d * patch * patch * in_ch + patch * patch * in_ch
    return depth * block + embed + final


@pytest.mark.parametrize("name", sorted(LIGHTNINGDIT_MODELS))
def test_registry_sizes_param_count(name):
    kw = dict(OFFICIAL_XL1)
    with torch.device("meta"):
        model = create_model(name, **kw)
    n = sum(p.numel() for p in model.parameters())
    expected = upstream_param_formula(model.depth, model.hidden_size, model.patch_size, model.num_heads)
    assert n == expected
    if name == "LightningDiT-XL/1":
        assert n == 675_256_736


def test_unknown_model_name_suggests():
    from repro.errors import ConfigError

    with pytest.raises(ConfigError, match="LightningDiT-XL/1"):
        create_model("LightningDiT-XL1", **OFFICIAL_XL1)


def test_forward_matches_upstream():
    model, t = load_fixture_model()
    with torch.no_grad():
        out = model(t["in.x"], t["in.t"], t["in.y"])
    assert out.shape == t["out.forward"].shape
    assert rel_err(out, t["out.forward"]) < 1e-5


@pytest.mark.parametrize("which,time", [("cfg_high", 0.7), ("cfg_low", 0.05)])
def test_cfg_forward_matches_upstream(which, time):
    model, t = load_fixture_model()
    side = json.loads(DIT_SIDECAR.read_text())
    x, y = t["in.cfg_x"], t["in.cfg_y"]
    tt = torch.full((x.shape[0],), time)
    with torch.no_grad():
        out = model.forward_with_cfg(x, tt, y, side["cfg_scale"], cfg_interval=True,
                                     cfg_interval_start=side["cfg_interval_start"])
    assert rel_err(out, t[f"out.{which}"]) < 1e-5


def test_train_mode_label_dropout_and_checkpointing_keep_gradients():
    model = create_model("LightningDiT-T/1", input_size=4, in_channels=4, num_classes=10, use_swiglu=True,
                         use_rope=True, use_rmsnorm=True, use_checkpoint=True)
    torch.nn.init.normal_(model.final_layer.linear.weight, std=0.02)
    x = torch.randn(3, 4, 4, 4)
    out = model(x, torch.rand(3), torch.tensor([1, 2, 3]))
    out.square().mean().backward()
    assert model.blocks[0].attn.qkv.weight.grad is not None


def test_nonswiglu_layout_keys():
    model = LightningDiT(input_size=8, patch_size=2, in_channels=4, hidden_size=32, depth=1, num_heads=2,
                         num_classes=5, use_qknorm=True, wo_shift=True)
    keys = set(model.state_dict())
    assert {"blocks.0.mlp.fc1.weight", "blocks.0.mlp.fc2.weight", "blocks.0.attn.q_norm.weight",
            "blocks.0.attn.q_norm.bias"} <= keys
    assert model.blocks[0].adaLN_modulation[1].weight.shape == (4 * 32, 32)
    assert "feat_rope.freqs_cos" not in keys


def test_rope_fast_path_equals_upstream_formula():
    """The three-kernel rotation equals upstream's x * cos + rotate_half(x) * sin."""
    from repro.models.lightningdit import VisionRotaryEmbeddingFast

    rope = VisionRotaryEmbeddingFast(36, 16)
    q = torch.randn(2, 3, 16, 256, 72)
    ref = q * rope.freqs_cos + VisionRotaryEmbeddingFast.rotate_half(q) * rope.freqs_sin
    assert torch.allclose(rope(q), ref, atol=1e-6, rtol=0)
    assert "pair_sign" not in rope.state_dict()


def test_checkpointed_blocks_give_the_same_gradients_everywhere_conditioning_included():
    """Per-block checkpointing recomputes, it must not change a gradient: the label and timestep
    embedders (reached through every block's adaLN) get the same gradients as without it."""
    torch.manual_seed(0)
    kw = dict(input_size=4, in_channels=4, num_classes=10, use_swiglu=True, use_rope=True, use_rmsnorm=True)
    plain = create_model("LightningDiT-T/1", **kw)
    with torch.no_grad():  # leave the identity start (zeroed adaLN/output): every path carries gradient
        for p in plain.parameters():
            if p.requires_grad:
                p.add_(torch.randn_like(p) * 0.05)
    ckpt = create_model("LightningDiT-T/1", **kw, use_checkpoint=True)
    ckpt.load_state_dict(plain.state_dict(), strict=True)
    x, t, y = torch.randn(3, 4, 4, 4), torch.rand(3), torch.tensor([1, 2, 10])  # 10 = the null label
    grads = []
    for model in (plain, ckpt):
        model.train()
        torch.manual_seed(1)  # the same label dropout draws in both
        model(x, t, y).square().mean().backward()
        grads.append({n: p.grad for n, p in model.named_parameters() if p.requires_grad})
    assert grads[0].keys() == grads[1].keys()
    for name, g in grads[0].items():
        assert grads[1][name] is not None, name
        torch.testing.assert_close(grads[1][name], g, rtol=1e-5, atol=1e-7, msg=name)
    for name in ("y_embedder.embedding_table.weight", "t_embedder.mlp.0.weight", "t_embedder.mlp.2.weight",
                 "blocks.0.adaLN_modulation.1.weight"):
        assert grads[1][name].abs().sum() > 0, name
