"""The VFM-VAE's computed inference memory (repro.tokenizer.vfm_vae_budget) and where steps 1 and 3 print it.

Everything runs on the meta device: no weights, no images, nothing timed. The parameter counts are upstream's
(tests/fixtures/reference/vfm_vae/official_manifest.json, written from tianciB/VFM-VAE's own generator)."""

from __future__ import annotations

import json

import pytest
import torch

from repro.models.cost import usable_bytes
from repro.setup import envinfo
from repro.setup.resolve import HARDWARE_PROFILES
from repro.tokenizer.vfm_vae_budget import (DECODE, ENCODE, LiveTensorBytes, activation_peak, official_meta_model,
                                            vfm_vae_cost)
from tests.conftest import FIXTURES

MANIFEST = json.loads((FIXTURES / "reference" / "vfm_vae" / "official_manifest.json").read_text())
T4, H100 = HARDWARE_PROFILES["t4"][0], HARDWARE_PROFILES["h100-80gb"][0]
MiB = 2**20
needs_transformers = pytest.mark.skipif(not __import__("importlib").util.find_spec("transformers"),
                                        reason="the SigLIP2 tower (encode) is built with transformers")


def _line(cost, word: str) -> int:
    return next(b for name, b in cost.weights if word in name)


@needs_transformers
def test_weights_are_the_official_parameter_bytes_in_fp32_for_every_loader_option():
    n_all, n_tower = MANIFEST["num_params"], MANIFEST["num_params_vfm_encoder"]
    enc, dec = vfm_vae_cost(ENCODE), vfm_vae_cost(DECODE)
    assert _line(enc, "SigLIP2 vision tower") == 4 * n_tower
    assert _line(enc, "generator") == _line(dec, "generator") == 4 * (n_all - n_tower)
    assert not any("SigLIP2" in name for name, _ in dec.weights)  # decoding loads the generator only
    # the precision options are autocast: the weights stay float32
    assert vfm_vae_cost(ENCODE, siglip_precision="bf16").static == enc.static
    assert vfm_vae_cost(DECODE, num_fp16_res=3).static == dec.static
    table = dec.budget(8)
    assert table.total == dec.static + 8 * dec.per_image
    assert f"{table.total / 2**30:8.3f} GiB" in table.table()


def test_live_tensor_bytes_follows_allocations_frees_views_and_in_place_ops():
    weight = torch.empty(512, 1024, device="meta")  # made before: a weight, not counted, nor its views
    counter = LiveTensorBytes()
    with counter:
        weight.t().contiguous().t()  # a 2 MiB copy, gone at once; .t() views the uncounted weight
        assert counter.live == 0 and counter.peak == 2 * MiB
        counter.peak = 0
        a = torch.empty(256, 1024, device="meta")  # 1 MiB
        b = a * 2  # 2 MiB alive
        view = b.view(1024, 256)  # a view: no new bytes
        del a  # 1 MiB alive
        c = b + view.view(256, 1024)  # 2 MiB alive
        b.add_(1)  # in place: no new bytes
        peak_before = counter.peak
        d = torch.cat([b, c])  # 4 MiB alive
        del d, view
    assert peak_before == 2 * MiB  # a's MiB was given back before c was made
    assert counter.peak == 4 * MiB and counter.live == 2 * MiB  # b and c remain


def test_activation_peak_grows_with_the_batch_and_batch_times_one_image_bounds_it():
    model = official_meta_model(with_encoder=False)
    one, two, four = (activation_peak(model, DECODE, b) for b in (1, 2, 4))
    assert one < two < four
    assert vfm_vae_cost(DECODE).per_image == one  # the budget's per-image figure is the peak of one image,
    assert two <= 2 * one and four <= 4 * one  # which bounds the peak of a batch from above
    assert four >= 0.95 * 4 * one  # and not a loose one: almost all of it grows with the batch
    # fp16 top blocks (emulated autocast) need less; math attention (scores materialized) never less
    assert activation_peak(model, DECODE, 2, num_fp16_res=3) < two
    assert activation_peak(model, DECODE, 2, attention="math") >= two


@needs_transformers
def test_encode_bound_and_what_fused_attention_saves():
    model = official_meta_model(with_encoder=True)
    one, two = activation_peak(model, ENCODE, 1), activation_peak(model, ENCODE, 2)
    assert one < two <= 2 * one
    # SigLIP2 at 512 px: 16 heads x 1024 x 1024 float32 scores = 64 MiB per image that a fused kernel never keeps
    assert activation_peak(model, ENCODE, 1, attention="math") - one >= 64 * MiB
    assert activation_peak(model, ENCODE, 1, siglip_precision="bf16") < one


@pytest.mark.parametrize("part", [DECODE, pytest.param(ENCODE, marks=needs_transformers)])
def test_the_planned_t4_batch_fits_and_twice_it_does_not(part):
    cost = vfm_vae_cost(part)
    limit = usable_bytes(T4.total_memory)
    batch = cost.largest_batch(T4.total_memory)
    assert batch >= 1 and batch & (batch - 1) == 0  # a power of two
    assert cost.static + batch * cost.per_image <= limit
    assert cost.static + 2 * batch * cost.per_image > limit
    # counted directly at that batch (not from the per-image figure), it fits too
    model = official_meta_model(with_encoder=part == ENCODE)
    assert cost.static + activation_peak(model, part, batch) <= limit
    assert cost.largest_batch(H100.total_memory) > batch


@needs_transformers
def test_step1_prints_a_vfm_vae_line_per_reference_card_on_a_cpu_machine(monkeypatch, capsys):
    from steps import step1_install

    monkeypatch.setattr(envinfo, "detect_gpus", lambda: [])
    report = step1_install.main(install=False)
    out = capsys.readouterr().out
    enc, dec = vfm_vae_cost(ENCODE), vfm_vae_cost(DECODE)
    for card in (T4, H100):
        e, d = enc.largest_batch(card.total_memory), dec.largest_batch(card.total_memory)
        assert (f"vfm-vae    {card.name}, {card.total_memory / 2**30:.1f} GiB (reference: no GPU here): "
                f"encode batch {e}, decode batch {d} (fp32") in out
        assert f"step 6 --batch-size up to {e // 2}" in out
    assert [p["encode_batch"] for p in report["vfm_vae"]] == [enc.largest_batch(c.total_memory) for c in (T4, H100)]


@needs_transformers
def test_step1_plans_once_per_kind_of_card():
    plans = envinfo.vfm_vae_plans(HARDWARE_PROFILES["t4x2"])
    assert len(plans) == 1 and plans[0]["card"] == "Tesla T4" and not plans[0]["reference"]
    assert plans[0]["decode_batch"] == vfm_vae_cost(DECODE).largest_batch(T4.total_memory)


@needs_transformers
def test_step3_prints_the_budget_for_a_vfm_vae_config_only(capsys):
    from steps import step3_configs

    step3_configs.main(config="tiny", set=["vae.model_name=vfm_vae_f16d32"], profile="t4", dry_run=True)
    out = capsys.readouterr().out
    dec = vfm_vae_cost(DECODE)
    batch = dec.largest_batch(T4.total_memory)
    assert "VFM-VAE f16d32 memory on Tesla T4" in out and "NVIDIA H100" not in out  # the profile's card only
    assert f"  decode, batch {batch} (the largest power of two that fits):" in out
    assert dec.budget(batch).table(usable_bytes(T4.total_memory) / 2**30) in out  # the whole table
    step3_configs.main(config="tiny", profile="t4", dry_run=True)
    assert "VFM-VAE" not in capsys.readouterr().out


@needs_transformers
def test_bench_vfm_vae_prints_throughput_and_the_computed_column_of_the_budget():
    import re
    import subprocess
    import sys

    from repro.tokenizer.vfm_vae import VFMVAE
    from repro.tokenizer.vfm_vae_budget import cost_of
    from tests.conftest import PROJECT_ROOT
    from tests.tiny_vfm_vae import tiny_architecture

    proc = subprocess.run([sys.executable, "benchmarks/bench_vfm_vae.py", "--configs", "tiny", "--batch", "2",
                           "--repeats", "1", "--threads", "1", "--device", "cpu", "--no-budget", "--no-record"], cwd=PROJECT_ROOT,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    g_kwargs, siglip = tiny_architecture()
    with torch.device("meta"):
        meta = VFMVAE(g_kwargs, siglip_config=siglip)
    for part in (ENCODE, DECODE):
        row = re.search(rf"^\| tiny \| [0-9.]+M \| {part} \(fp32\) \| 2 \| ([0-9.e+]+) \| ([0-9.e+]+) \| [0-9.]+ "
                        rf"\(RSS peak - before\) \| ([0-9.]+) / ([0-9.]+) \|", proc.stdout, re.M)
        assert row, proc.stdout
        images_per_s, seconds, fused, math = map(float, row.groups())
        assert abs(images_per_s * seconds - 2) < 2 * 2e-3  # 4 significant figures each
        assert fused == round(2 * cost_of(meta, part).per_image / MiB, 1)
        assert math == round(2 * cost_of(meta, part, attention="math").per_image / MiB, 1)
