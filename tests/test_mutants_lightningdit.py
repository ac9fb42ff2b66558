"""LightningDiT pieces built from scratch and compared with hand-written formulas (no fixture loaded over them).

The fixture checkpoint carries the RoPE buffers and RMSNorm weights of ones, so a strict load hides a wrong
RoPE table, and uniform norm weights make "norm before RoPE" and "norm after RoPE" agree. Here every reference
is written out by hand from the facts of EVA-02 / LightningDiT's `VisionRotaryEmbeddingFast` and
`Attention` / `LightningDiTBlock`:

- RoPE on a head of D = 2d channels over an S x S token grid (token index r * S + c): channels [0, d) rotate
  with the row r, channels [d, 2d) with the column c; within each half, the pair (2j, 2j + 1) turns by the
  angle pos * theta ** (-2j / d), j = 0 .. d/2 - 1 (theta = 10000), as (a, b) -> (a cos - b sin, b cos + a sin).
- Attention: q and k are normalised per head (q_norm/k_norm) and only then rotated.
- adaLN: (shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp), or with `wo_shift`
  (scale_msa, gate_msa, scale_mlp, gate_mlp), chunks of the adaLN linear's output in that order.
"""

from __future__ import annotations

import math

import pytest
import torch

from repro.models.lightningdit import Attention, LightningDiT, LightningDiTBlock, VisionRotaryEmbeddingFast

THETA = 10000.0


def hand_rope_angles(d: int, side: int) -> torch.Tensor:
    """(side * side, 2d) float64 angle of every channel of a head, built loop by loop."""
    angles = torch.zeros(side * side, 2 * d, dtype=torch.float64)
    for r in range(side):
        for c in range(side):
            token = r * side + c
            for j in range(d // 2):
                freq = THETA ** (-(2.0 * j) / d)
                for half, pos in ((0, r), (1, c)):
                    angles[token, half * d + 2 * j] = pos * freq
                    angles[token, half * d + 2 * j + 1] = pos * freq
    return angles


def hand_rotate(x: torch.Tensor, angles: torch.Tensor) -> torch.Tensor:
    """Rotate consecutive channel pairs of x (..., T, 2d) by angles (T, 2d) (each pair shares one angle)."""
    a, b = x[..., 0::2], x[..., 1::2]
    ang = angles[:, 0::2].to(x.dtype)
    cos, sin = torch.cos(ang), torch.sin(ang)
    out = torch.empty_like(x)
    out[..., 0::2] = a * cos - b * sin
    out[..., 1::2] = b * cos + a * sin
    return out


def hand_rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    return x / torch.sqrt((x * x).mean(-1, keepdim=True) + eps) * weight


def hand_attention(attn: Attention, x: torch.Tensor, angles: torch.Tensor | None) -> torch.Tensor:
    """Multi-head attention written out: qkv projection, per-head norm, then RoPE, softmax(q k^T / sqrt(hd)) v."""
    n, t, dim = x.shape
    h, hd = attn.num_heads, attn.head_dim
    qkv = x @ attn.qkv.weight.T + attn.qkv.bias  # (N, T, 3 * dim), laid out [q | k | v], each [head0 | head1 | ...]
    q, k, v = (qkv[..., i * dim:(i + 1) * dim].reshape(n, t, h, hd).transpose(1, 2) for i in range(3))
    if isinstance(attn.q_norm, torch.nn.LayerNorm):
        q = torch.nn.functional.layer_norm(q, (hd,), attn.q_norm.weight, attn.q_norm.bias, attn.q_norm.eps)
        k = torch.nn.functional.layer_norm(k, (hd,), attn.k_norm.weight, attn.k_norm.bias, attn.k_norm.eps)
    elif not isinstance(attn.q_norm, torch.nn.Identity):
        q, k = hand_rms_norm(q, attn.q_norm.weight), hand_rms_norm(k, attn.k_norm.weight)
    if angles is not None:
        q, k = hand_rotate(q, angles), hand_rotate(k, angles)
    weights = torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(hd), dim=-1)
    out = (weights @ v).transpose(1, 2).reshape(n, t, dim)
    return out @ attn.proj.weight.T + attn.proj.bias


def _randomise(module: torch.nn.Module, seed: int) -> None:
    """Non-trivial values in every parameter, norm weights included (not ones, not uniform)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in module.named_parameters():
            if name.endswith("norm.weight") or name.endswith("norm1.weight") or name.endswith("norm2.weight"):
                p.copy_(0.5 + 1.5 * torch.rand(p.shape, generator=g))
            else:
                p.copy_(0.3 * torch.randn(p.shape, generator=g))


# ---------------------------------------------------------------------------------------------------
# RoPE tables of a model built from scratch


@pytest.mark.parametrize("hidden,heads,input_size,patch", [(64, 4, 3, 1), (96, 2, 10, 2)])
def test_rope_buffers_of_a_fresh_model_equal_the_hand_built_2d_table(hidden, heads, input_size, patch):
    model = LightningDiT(input_size=input_size, patch_size=patch, in_channels=4, hidden_size=hidden, depth=1,
                         num_heads=heads, num_classes=3, use_rope=True, use_rmsnorm=True, use_swiglu=True)
    d, side = hidden // heads // 2, input_size // patch
    angles = hand_rope_angles(d, side)
    rope = model.feat_rope
    assert rope.freqs_cos.shape == (side * side, 2 * d)
    torch.testing.assert_close(rope.freqs_cos.double(), torch.cos(angles), rtol=0, atol=1e-5)
    torch.testing.assert_close(rope.freqs_sin.double(), torch.sin(angles), rtol=0, atol=1e-5)
    # the buffers travel in the state dict (upstream's keys), so a checkpoint written from scratch carries these
    assert {"feat_rope.freqs_cos", "feat_rope.freqs_sin"} <= set(model.state_dict())


def test_rope_rotates_rows_with_the_first_half_and_columns_with_the_second():
    d, side = 8, 4
    rope = VisionRotaryEmbeddingFast(d, side)
    g = torch.Generator().manual_seed(1)
    x = torch.randn(2, 3, side * side, 2 * d, generator=g, dtype=torch.float64)
    got = rope(x.float()).double()
    torch.testing.assert_close(got, hand_rotate(x, hand_rope_angles(d, side)), rtol=0, atol=1e-5)
    # token (r=2, c=0) vs (r=0, c=2): the row moves only the first half, the column only the second
    row_token, col_token = 2 * side + 0, 0 * side + 2
    one = torch.zeros(1, side * side, 2 * d)
    one[0, :, :] = 1.0
    out = rope(one)[0]
    assert torch.allclose(out[0], one[0, 0])  # token (0, 0): no rotation
    assert torch.allclose(out[row_token, d:], one[0, 0, d:]) and not torch.allclose(out[row_token, :d], one[0, 0, :d])
    assert torch.allclose(out[col_token, :d], one[0, 0, :d]) and not torch.allclose(out[col_token, d:], one[0, 0, d:])


# ---------------------------------------------------------------------------------------------------
# Attention: qk-norm, then RoPE


@pytest.mark.parametrize("use_rmsnorm", [True, False])
def test_attention_with_non_uniform_qk_norm_weights_equals_hand_written_attention(use_rmsnorm):
    torch.manual_seed(0)
    dim, heads, side = 32, 2, 3
    attn = Attention(dim, heads, qk_norm=True, use_rmsnorm=use_rmsnorm).double()
    _randomise(attn, seed=3)
    assert attn.q_norm.weight.std() > 0.1  # the case where norm-then-rotate and rotate-then-norm differ
    rope = VisionRotaryEmbeddingFast(dim // heads // 2, side).double()
    x = torch.randn(2, side * side, dim, dtype=torch.float64)
    angles = hand_rope_angles(dim // heads // 2, side)
    with torch.no_grad():
        torch.testing.assert_close(attn(x, rope=rope), hand_attention(attn, x, angles), rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(attn(x), hand_attention(attn, x, None), rtol=1e-5, atol=1e-5)


# ---------------------------------------------------------------------------------------------------
# Blocks: adaLN chunk order, with and without the shift


def hand_block(block: LightningDiTBlock, x: torch.Tensor, c: torch.Tensor, angles) -> torch.Tensor:
    mod = torch.nn.functional.silu(c) @ block.adaLN_modulation[1].weight.T + block.adaLN_modulation[1].bias
    hs = x.shape[-1]
    parts = [mod[:, i * hs:(i + 1) * hs].unsqueeze(1) for i in range(mod.shape[1] // hs)]
    if block.wo_shift:
        scale_msa, gate_msa, scale_mlp, gate_mlp = parts
        shift_msa = shift_mlp = torch.zeros_like(scale_msa)
    else:
        shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = parts
    h1 = hand_rms_norm(x, block.norm1.weight) * (1 + scale_msa) + shift_msa
    x = x + gate_msa * hand_attention(block.attn, h1, angles)
    h2 = hand_rms_norm(x, block.norm2.weight) * (1 + scale_mlp) + shift_mlp
    w12 = h2 @ block.mlp.w12.weight.T + block.mlp.w12.bias
    a, b = w12.chunk(2, dim=-1)
    return x + gate_mlp * ((torch.nn.functional.silu(a) * b) @ block.mlp.w3.weight.T + block.mlp.w3.bias)


@pytest.mark.parametrize("wo_shift", [True, False])
def test_block_adaln_chunks_are_in_upstream_order(wo_shift):
    torch.manual_seed(0)
    hidden, heads, side = 32, 2, 3
    block = LightningDiTBlock(hidden, heads, mlp_ratio=2.0, use_qknorm=True, use_swiglu=True, use_rmsnorm=True,
                              wo_shift=wo_shift).double()
    _randomise(block, seed=5)  # adaLN is zero-initialised: with zeros every chunk order agrees
    assert block.adaLN_modulation[1].weight.shape[0] == (4 if wo_shift else 6) * hidden
    rope = VisionRotaryEmbeddingFast(hidden // heads // 2, side).double()
    x = torch.randn(2, side * side, hidden, dtype=torch.float64)
    c = torch.randn(2, hidden, dtype=torch.float64)
    with torch.no_grad():
        got = block(x, c, rope)
        ref = hand_block(block, x, c, hand_rope_angles(hidden // heads // 2, side))
    torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-5)


# ---------------------------------------------------------------------------------------------------
# Label dropout inside the model (upstream's LabelEmbedder): one coin per sample


def test_label_embedder_drops_each_sample_with_its_own_coin():
    model = LightningDiT(input_size=2, patch_size=1, in_channels=4, hidden_size=32, depth=1, num_heads=2,
                         num_classes=5, class_dropout_prob=0.5)
    emb = model.y_embedder
    labels = torch.arange(400) % 5
    torch.manual_seed(0)
    out = emb(labels, train=True)
    null_row = emb.embedding_table.weight[5]
    dropped = (out == null_row).all(dim=1)
    assert 0.35 < dropped.float().mean().item() < 0.65
    assert dropped.any() and (~dropped).any()  # mixed within one batch, not one coin for all
    kept_rows = emb.embedding_table.weight[labels[~dropped]]
    assert torch.equal(out[~dropped], kept_rows)
    forced = emb(labels[:4], train=False, force_drop_ids=torch.tensor([1, 0, 1, 0]))
    assert torch.equal(forced[0], null_row) and torch.equal(forced[1], emb.embedding_table.weight[1])
