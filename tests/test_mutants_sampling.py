"""Latent de-normalisation before decoding, with a latent_multiplier that is not 1.

Upstream inference.py: `samples = (samples * latent_std) / latent_multiplier + latent_mean` with statistics,
and the missing-key default multiplier is 0.18215. Training normalises a stored latent z as
`(z - mean) / std * latent_multiplier` (repro.data.latents, upstream's dataset), or `z * latent_multiplier`
without statistics; sampling must invert exactly that. Every config of the kit uses 1.0, where
`(x * std + mean) / m` and `x * std / m + mean` (and `x * m` and `x / m`) agree: these tests do not.
"""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import pytest
import torch

from repro.config import Config
from repro.data.latents import LatentShardDataset, shard_name, write_shard
from repro.data.stats import STATS_NAME, load_latent_stats
from repro.sampling.engine import decode_to_uint8, denormalize, sampler_from_parts
from repro.tokenizer.images import to_uint8
from tests.tiny_assets import TINY_CHANNELS, TINY_LATENT, tiny_model, tiny_vae

UPSTREAM_DEFAULT_MULTIPLIER = 0.18215


def _setup(latent_norm: bool, multiplier: float, stats, vae=None, channels: int = TINY_CHANNELS):
    cfg = Config()
    cfg.data.latent_norm, cfg.data.latent_multiplier = latent_norm, multiplier
    cfg.data.image_size, cfg.vae.downsample_ratio = TINY_LATENT * 16, 16
    cfg.model.in_chans = channels
    return sampler_from_parts(cfg, tiny_model(), device=torch.device("cpu"), vae=vae, stats=stats)


def test_denormalize_closed_form_with_statistics_and_a_multiplier():
    mean = torch.tensor([2.0, -1.0]).view(1, 2, 1, 1)
    std = torch.tensor([3.0, 0.5]).view(1, 2, 1, 1)
    setup = _setup(True, 0.5, (mean, std), channels=2)
    x = torch.tensor([1.0, 4.0]).view(1, 2, 1, 1)
    # x * std / m + mean: 1 * 3 / 0.5 + 2 = 8 and 4 * 0.5 / 0.5 - 1 = 3
    assert denormalize(setup, x).flatten().tolist() == pytest.approx([8.0, 3.0])
    plain = _setup(False, 0.5, None, channels=2)
    assert denormalize(plain, x).flatten().tolist() == pytest.approx([2.0, 8.0])  # x / m


@pytest.fixture(scope="module")
def shards(tmp_path_factory) -> Path:
    """A shard of latents far from zero mean / unit std, and its statistics file."""
    folder = tmp_path_factory.mktemp("latents")
    g = torch.Generator().manual_seed(0)
    c, s = TINY_CHANNELS, TINY_LATENT
    centre = torch.linspace(-3.0, 3.0, c).view(1, c, 1, 1)
    spread = torch.linspace(0.3, 2.5, c).view(1, c, 1, 1)
    lat = centre + spread * torch.randn(8, c, s, s, generator=g)
    write_shard(folder / shard_name(0, 0), lat, lat.flip(-1), torch.arange(8) % 3)
    mean, std = lat.mean(dim=(0, 2, 3), keepdim=True), lat.std(dim=(0, 2, 3), keepdim=True)
    torch.save({"mean": mean, "std": std}, folder / STATS_NAME)
    return folder


@pytest.mark.parametrize("latent_norm", [True, False])
def test_sampling_inverts_the_training_normalisation(shards, latent_norm):
    """A training latent (normalised by the dataset) decodes to the image of the stored latent."""
    m = UPSTREAM_DEFAULT_MULTIPLIER
    ds = LatentShardDataset(shards, latent_norm=latent_norm, latent_multiplier=m)
    stats = load_latent_stats(shards / STATS_NAME, TINY_CHANNELS) if latent_norm else None
    assert stats is None or float(stats[1].std()) > 0.3  # a non-uniform std
    vae = tiny_vae()
    setup = _setup(latent_norm, m, stats, vae=vae)
    normalised = torch.stack([ds.get(i, flip=False)[0] for i in range(4)])
    stored = torch.stack([ds.raw(i)[0] for i in range(4)])
    torch.testing.assert_close(denormalize(setup, normalised), stored, rtol=1e-5, atol=1e-5)
    with torch.no_grad():
        direct = to_uint8(vae.decode(stored)).numpy()
    decoded = decode_to_uint8(setup, normalised)
    assert np.abs(decoded.astype(int) - direct.astype(int)).max() <= 1


# ---------------------------------------------------------------------------------------------
# From mutation testing (docs/mutation_testing.md, `python scripts/mutation.py sampling`): the pieces of
# repro.sampling whose mutants survived the end-to-end tests, each checked against what it must produce.

import json  # noqa: E402
import os  # noqa: E402
import re  # noqa: E402

from PIL import Image  # noqa: E402

from repro.errors import ReproError  # noqa: E402
from repro.sampling import grid, plan, writer  # noqa: E402


def _images(n: int, size: int = 8, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (n, size, size, 3), dtype=np.uint8)


def test_show_samples_lays_out_titles_and_sizes_the_figure():
    from matplotlib.layout_engine import ConstrainedLayoutEngine

    images = _images(5)
    fig = grid.show_samples(images, [0, 1, 2, 3, 4], class_names=["a", "b", "c", "d"], title="T")
    assert tuple(fig.get_size_inches()) == pytest.approx((4 * 2.2, 2 * 2.2 + 0.4))  # 2 x 4 grid of 2.2 in cells
    assert isinstance(fig.get_layout_engine(), ConstrainedLayoutEngine)
    assert len(fig.axes) == 8 and not any(ax.axison for ax in fig.axes)
    for k, ax in enumerate(fig.axes):
        if k < 5:
            assert np.array_equal(ax.images[0].get_array(), images[k])
            assert ax.images[0].get_interpolation() == "nearest"
        else:
            assert not ax.images and ax.get_title() == ""
    # label 4 is past the 4 names: "class 4"
    assert [ax.get_title() for ax in fig.axes[:5]] == ["0: a", "1: b", "2: c", "3: d", "class 4"]
    assert all(ax.title.get_fontsize() == 9 for ax in fig.axes[:5])
    assert fig._suptitle.get_text() == "T" and fig._suptitle.get_fontsize() == 10
    # no title: no suptitle and no extra height; no labels: no axis titles; at most 8 images (max_images)
    plain = grid.show_samples(_images(9))
    assert tuple(plain.get_size_inches()) == pytest.approx((8.8, 4.4)) and plain._suptitle is None
    assert len(plain.axes) == 8 and all(ax.get_title() == "" for ax in plain.axes)
    three = grid.show_samples(images, cols=3)  # 5 images, 3 columns: 2 rows
    assert tuple(three.get_size_inches()) == pytest.approx((3 * 2.2, 2 * 2.2)) and len(three.axes) == 6
    one = grid.show_samples(_images(1), [3])
    assert tuple(one.get_size_inches()) == pytest.approx((2.2, 2.2)) and one.axes[0].get_title() == "class 3"
    with pytest.raises(ReproError, match=r"^show_samples: no images to show$"):
        grid.show_samples(_images(0))


def test_grid_shape_and_the_preview_file(tmp_path, monkeypatch):
    assert grid.grid_shape(10) == (3, 4) and grid.grid_shape(1) == (1, 1) and grid.grid_shape(3) == (1, 3)
    seen = {}
    real = grid.show_samples

    def spy(images, labels=None, **kw):
        seen.update(labels=labels, **kw)
        return real(images, labels, **kw)

    monkeypatch.setattr(grid, "show_samples", spy)
    path = grid.save_preview(_images(3), [1, 2, 0], tmp_path / "p.png", title="T", class_names=["x", "y", "z"])
    assert seen == {"labels": [1, 2, 0], "class_names": ["x", "y", "z"], "title": "T"}
    with Image.open(path) as im:  # 3 cells of 2.2 in at 100 dpi, plus the title's 0.4 in
        assert im.format == "PNG" and im.size == (660, 260)


def test_read_png_refuses_other_modes_shapes_and_garbage(tmp_path):
    Image.fromarray(np.zeros((4, 4, 4), dtype=np.uint8), "RGBA").save(tmp_path / "a.png")
    with pytest.raises(ReproError, match=rf"^{tmp_path / 'a.png'} is a RGBA image, expected RGB: delete it and run "
                                         r"the same command again to re-sample it$"):
        writer.read_png(tmp_path / "a.png")
    writer.write_png(tmp_path / "b.png", _images(1, 4)[0])
    with pytest.raises(ReproError, match=rf"^{tmp_path / 'b.png'} has shape \(4, 4, 3\), expected \(8, 8, 3\): it "
                                         r"comes from another run; delete it \(or use a new --out\) and run again$"):
        writer.read_png(tmp_path / "b.png", (8, 8, 3))
    (tmp_path / "c.png").write_bytes(b"not a png")
    with pytest.raises(ReproError, match=rf"^{tmp_path / 'c.png'} is not a readable PNG \(.*\): delete it and run the "
                                         r"same command again$"):
        writer.read_png(tmp_path / "c.png")


def test_pack_npz_checks_every_image_and_the_labels(tmp_path):
    images = _images(4)
    for i, im in enumerate(images):
        writer.write_png(tmp_path / f"{i:06d}.png", im)
    one = writer.pack_npz(tmp_path, 1, tmp_path / "one.npz", labels=np.array([7], dtype=np.int32))
    with np.load(one) as npz:  # a single image; labels stored as int64 whatever they came as
        assert np.array_equal(npz["arr_0"], images[:1]) and npz["arr_1"].dtype == np.int64
    with pytest.raises(ReproError, match=r"^pack_npz: 3 labels for 4 images$"):
        writer.pack_npz(tmp_path, 4, tmp_path / "x.npz", labels=[0, 1, 2])
    writer.write_png(tmp_path / "000002.png", _images(1, 4)[0])  # another run's size in the middle
    with pytest.raises(ReproError, match=r"000002\.png has shape \(4, 4, 3\), expected \(8, 8, 3\)"):
        writer.pack_npz(tmp_path, 4, tmp_path / "y.npz")
    assert not (tmp_path / "x.npz").exists() and not (tmp_path / "y.npz").exists()


def test_writer_abort_finishes_the_batch_in_progress_and_drops_the_queue(tmp_path):
    import threading

    started, release = threading.Event(), threading.Event()

    def decode(batch):
        started.set()
        assert release.wait(60)
        return batch

    w = writer.ImageWriter(decode, max_pending=2)
    batches = [_images(2, seed=s) for s in range(3)]
    w.submit(batches[0], [tmp_path / "a0.png", tmp_path / "a1.png"])
    assert started.wait(60)  # the thread is inside batch 0; 1 and 2 wait in the queue
    w.submit(batches[1], [tmp_path / "b0.png", tmp_path / "b1.png"])
    w.submit(batches[2], [tmp_path / "c0.png", tmp_path / "c1.png"])
    aborter = threading.Thread(target=w.abort)
    aborter.start()
    for _ in range(6000):  # abort drains the queue before it waits for the batch in progress
        if w._queue.unfinished_tasks <= 2 and w._queue.qsize() <= 1:
            break
        threading.Event().wait(0.01)
    release.set()
    aborter.join(60)
    assert not aborter.is_alive() and not w._thread.is_alive()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a0.png", "a1.png"]
    w.close()  # nothing left to raise: abort clears its own "aborted"
    writer.ImageWriter(threaded=False).abort()  # no thread: nothing to stop


def test_plan_golden_values_never_change():
    """Image i's label and noise are functions of (seed, i) only, and stay so across versions (resume)."""
    assert plan.plan_labels(6, 10, seed=0).tolist() == [6, 0, 1, 2, 9, 6]
    assert plan.plan_labels(6, 10, seed=3).tolist() == [5, 4, 9, 3, 8, 7]
    assert plan.noise_seed(0, 0) == 7825963189948464654
    torch.testing.assert_close(plan.image_noise(0, 0, (3,)), torch.tensor([-0.42129257, -0.94074541, 0.41100883]))
    assert plan.plan_labels(10, 5, seed=0, mode="balanced").tolist() == [1, 2, 3, 0, 1, 4, 4, 3, 0, 2]


def test_check_labels_and_demo_labels():
    plan.check_labels([0, 9, torch.tensor(3)], 10)
    for bad in (torch.tensor([3]), 2.5):
        with pytest.raises(ReproError, match=f"^{re.escape(f'label {bad!r} is not an integer class index')}$"):
            plan.check_labels([bad], 10)
    with pytest.raises(ReproError, match=r"^label 10 is outside \[0, 10\) \(data.num_classes = 10\); pass class "
                                         r"indices between 0 and 9$"):
        plan.check_labels([10], 10)
    assert plan.demo_labels(1000) == (list(plan.DEMO_LABELS), "the official demo labels")
    assert plan.demo_labels(10) == ([5, 3, 7, 7, 8, 8, 9, 9], "the official demo labels mod 10 (this model has 10 "
                                                              "classes)")
    assert plan.demo_labels(979)[0][6] == 0  # 979 itself is not a class of a 979-class model


def test_existing_indices_count_only_finished_pngs(tmp_path):
    assert plan.existing_indices(tmp_path / "missing") == set()
    for name in ("000003.png", ".000004.png.ab12.tmp.png", "notes.txt", "abc.png", "000007.jpg"):
        (tmp_path / name).write_bytes(b"")
    assert plan.existing_indices(tmp_path) == {3}


class _Recorder(torch.nn.Module):
    """Records each call's input shapes, dtypes and modes; returns x."""

    num_classes = 10

    def __init__(self):
        super().__init__()
        self.calls = []

    def forward(self, x, t, y):
        self.calls.append(dict(x=x.clone(), t=t.clone(), y=y.clone(), inference=torch.is_inference_mode_enabled(),
                               autocast=torch.is_autocast_cpu_enabled()))
        return x


def _compile_recorder(monkeypatch, fail: bool):
    modes = []

    def fake_compile(model, mode=None, **kw):
        modes.append(mode)
        if fail:
            def broken(*a, **k):
                raise RuntimeError("no backend here")
            return broken
        return model

    monkeypatch.setattr(torch, "compile", fake_compile)
    return modes


def test_compile_for_sampling_modes_and_its_cache_folder(tmp_path, monkeypatch):
    from repro.sampling.engine import compile_for_sampling
    from repro.utils.distributed import print0
    from repro.utils.hardware import CompiledOrEager

    monkeypatch.setenv("REPRO_RUNS_DIR", str(tmp_path / "runs"))
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", "placeholder")
    monkeypatch.delenv("TORCHINDUCTOR_CACHE_DIR")  # restored (absent) after the test
    modes = _compile_recorder(monkeypatch, fail=False)
    model = _Recorder()
    assert compile_for_sampling(model, None, torch.device("cpu")) is model and modes == []  # CPU default: eager
    assert "TORCHINDUCTOR_CACHE_DIR" not in os.environ
    wrapped = compile_for_sampling(model, None, torch.device("cuda"))  # GPU default: CUDA graphs
    assert isinstance(wrapped, CompiledOrEager) and modes == ["reduce-overhead"] and wrapped.graphs
    assert wrapped.eager is model and wrapped.what == "sampling" and wrapped.note is print0
    cache = (tmp_path / "runs" / "compile_cache").resolve()
    assert os.environ["TORCHINDUCTOR_CACHE_DIR"] == str(cache) and cache.is_dir()
    plain = compile_for_sampling(model, True, torch.device("cpu"))
    assert isinstance(plain, CompiledOrEager) and modes[-1] is None and not plain.graphs


@pytest.mark.parametrize("fail", [True, False])
def test_warm_up_calls_each_shape_three_times_and_says_so(monkeypatch, capsys, fail):
    from repro.sampling.engine import SamplerSetup, warm_up
    from repro.utils.hardware import CompiledOrEager

    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", "/somewhere/cache")
    _compile_recorder(monkeypatch, fail=fail)
    inner = _Recorder()
    cfg = Config()
    cfg.sample.cfg_scale = 1.5
    setup = SamplerSetup(cfg=cfg, model=CompiledOrEager(inner, "default", "sampling", note=print), eager_model=inner,
                         vae=None, mean=None, std=None, device=torch.device("cpu"), precision="bf16",
                         vae_precision="fp32", latent_shape=(3, 2, 5), num_classes=10)
    t0 = time.perf_counter()
    seconds = warm_up(setup, 4)
    assert isinstance(seconds, float) and 0 <= seconds <= time.perf_counter() - t0  # the time it took
    assert [tuple(c["x"].shape) for c in inner.calls] == [(4, 3, 2, 5)] * 3 + [(8, 3, 2, 5)] * 3  # B, then 2B (CFG)
    for c in inner.calls:
        assert not c["x"].any() and c["t"].shape == c["x"].shape[:1] and c["t"].dtype == torch.float32
        assert not c["t"].any() and c["y"].dtype == torch.int64 and not c["y"].any()
        assert c["inference"] and c["autocast"]  # under inference mode and the transformer's precision
    state = "eager after a compile failure" if fail else "compiled"
    line = capsys.readouterr().out.strip().splitlines()[-1]
    assert re.fullmatch(rf"sampling model {state} at batch 4 in \d+\.\ds \(cache: /somewhere/cache\); this is paid "
                        r"once per process", line), line
    cfg.sample.cfg_scale = 1.0  # no guidance: B rows only
    inner.calls.clear()
    monkeypatch.delenv("TORCHINDUCTOR_CACHE_DIR")
    warm_up(setup, 2)
    assert [tuple(c["x"].shape) for c in inner.calls] == [(2, 3, 2, 5)] * 3
    assert "(cache: torch default)" in capsys.readouterr().out
    setup.model = inner  # an eager model: nothing to warm up
    inner.calls.clear()
    assert warm_up(setup, 2) is None and inner.calls == []


# ---------------------------------------------------------------------------------------------
# The engine: what sample_latents hands the samplers, the DDPM paths, x0 trajectories, decoding


class _LinearField(torch.nn.Module):
    """v (or ε) = a x + b t + c y, per element: cheap, label- and time-dependent."""

    num_classes = 10

    def forward(self, x, t, y):
        shape = (-1,) + (1,) * (x.dim() - 1)
        return 0.7 * x + 0.01 * t.view(shape) + 0.05 * y.to(x.dtype).view(shape)


def _engine_setup(model=None, process: str = "flow", precision: str = "fp32", channels: int = 4, **sample):
    from repro.sampling.engine import SamplerSetup

    cfg = Config()
    cfg.transport.process = process
    for k, v in sample.items():
        setattr(cfg.sample, k, v)
    model = model or _LinearField()
    return SamplerSetup(cfg=cfg, model=model, eager_model=model, vae=None, mean=None, std=None,
                        device=torch.device("cpu"), precision=precision, vae_precision="fp32",
                        latent_shape=(channels, 2, 2), num_classes=10)


def test_sample_latents_hands_the_ode_every_setting_in_fp32_and_int64(monkeypatch):
    from repro.sampling import engine

    seen = {}

    def spy(model, z, y, **kw):
        seen.update(model=model, z=z, y=y, kw=kw, inference=torch.is_inference_mode_enabled(),
                    autocast=torch.is_autocast_cpu_enabled())
        return z.to(torch.bfloat16)

    monkeypatch.setattr(engine, "sample_ode", spy)
    setup = _engine_setup(precision="bf16", sampling_method="rk4", num_sampling_steps=7, timestep_shift=0.3,
                          cfg_scale=2.0, cfg_interval_start=0.1, cfg_channels=2, atol=1e-4, rtol=1e-2)
    noise, labels = torch.randn(3, 4, 2, 2, dtype=torch.float64), torch.tensor([1, 2, 3], dtype=torch.int32)
    stats, other = {}, _LinearField()
    x = engine.sample_latents(setup, noise, labels, stats)
    assert x.dtype == torch.float32 and seen["model"] is setup.model and seen["inference"] and seen["autocast"]
    assert seen["z"].dtype == torch.float32 and seen["y"].dtype == torch.int64 and seen["y"].tolist() == [1, 2, 3]
    assert seen["kw"] == dict(method="rk4", num_steps=7, timestep_shift=0.3, cfg_scale=2.0, cfg_interval_start=0.1,
                              null_class=10, cfg_channels=2, atol=1e-4, rtol=1e-2, stats=stats)
    engine.sample_latents(setup, noise, labels, model=other)
    assert seen["model"] is other


@pytest.mark.parametrize("method, eta, stochastic", [("ddim", 0.0, False), ("ddim", 0.4, True), ("ddpm", 0.0, True)])
def test_ddpm_sampling_through_the_engine(monkeypatch, method, eta, stochastic):
    from repro.sampling import engine
    from repro.transport import process
    from repro.transport.ddpm import DiffusionSchedule, sample_ddpm

    setup = _engine_setup(process="ddpm", sampling_method=method, num_sampling_steps=4, eta=eta, ddpm_variance="beta",
                   cfg_scale=1.5, cfg_channels=None)
    noise, labels = torch.randn(3, 4, 2, 2, generator=torch.Generator().manual_seed(0)), torch.tensor([4, 5, 6])
    stats = {}
    x = engine.sample_latents(setup, noise, labels, stats)
    gens = engine.step_generators(noise) if stochastic else None
    want = sample_ddpm(setup.model, noise, labels, schedule=DiffusionSchedule.from_config(setup.cfg.transport),
                       method=method, num_steps=4, eta=eta, variance="beta", cfg_scale=1.5, null_class=10,
                       cfg_channels=None, generators=gens)
    assert torch.equal(x, want) and x.dtype == torch.float32 and stats == {"nfe": 4, "model_rows": 24}
    # an image does not depend on its batch (its step noise comes from its own starting noise)
    torch.testing.assert_close(engine.sample_latents(setup, noise[1:2], labels[1:2]), x[1:2], rtol=1e-5, atol=1e-5)
    seen = {}
    real = process.sample

    def spy(model, z, y, transport_cfg, sample_cfg, **kw):
        seen.update(model=model, z=z, kw=kw, inference=torch.is_inference_mode_enabled(),
                    autocast=torch.is_autocast_cpu_enabled())
        return real(model, z, y, transport_cfg, sample_cfg, **kw)

    monkeypatch.setattr(process, "sample", spy)
    other = _LinearField()
    setup.precision = "bf16"
    engine.sample_latents(setup, noise.double(), labels, model=other)
    assert seen["model"] is other and seen["z"].dtype == torch.float32 and seen["inference"] and seen["autocast"]
    assert seen["kw"]["null_class"] == 10 and seen["kw"]["on_clean"] is None
    assert (seen["kw"]["generators"] is not None) == stochastic


def test_step_generators_are_seeded_by_each_images_noise():
    import hashlib

    from repro.sampling.engine import step_generators
    from repro.utils.seeding import seed_from

    noise = torch.randn(3, 2, 2, 2, generator=torch.Generator().manual_seed(1))
    seeds = [g.initial_seed() for g in step_generators(noise)]
    assert seeds == [seed_from("repro-ddpm-steps", hashlib.sha256(r.numpy().tobytes()).hexdigest()) for r in noise]
    assert len(set(seeds)) == 3 and [g.initial_seed() for g in step_generators(noise.double()[1:])] == seeds[1:]
    assert all(g.device.type == "cpu" for g in step_generators(noise))


def test_trajectory_steps_for_every_kind_of_sampler():
    from repro.sampling.engine import trajectory_steps

    assert trajectory_steps(10, 3) == [0, 4, 8]  # euler: 9 steps
    assert trajectory_steps(10, 1) == [8] and trajectory_steps(10, 9) == list(range(9))
    assert trajectory_steps(10, 3, "ddim") == [0, 4, 9] and trajectory_steps(10, 1, "ddpm") == [9]  # 10 steps
    assert trajectory_steps(10, 2, "rk4") == [0, 8]
    with pytest.raises(ReproError, match=r"^--trajectory reads the predicted sample at the grid points of a fixed-step "
                                         r"sampler \(euler, midpoint, heun2, rk4\); sample.sampling_method is 'dopri5'$"):
        trajectory_steps(10, 3, "dopri5")
    for k, total in ((0, 9), (10, 9)):
        with pytest.raises(ReproError, match=rf"^--trajectory {k}: choose 1 to {total} \(the sampler takes {total} "
                                             rf"steps\)$"):
            trajectory_steps(10, k)
    with pytest.raises(ReproError, match=r"^--trajectory 11: choose 1 to 10"):
        trajectory_steps(10, 11, "ddim")


@pytest.mark.parametrize("method, cfg_scale", [("euler", 1.0), ("midpoint", 1.0), ("euler", 2.0)])
def test_flow_trajectory_keeps_x_plus_one_minus_t_v_at_the_chosen_steps(method, cfg_scale):
    from repro.sampling.engine import sample_latents, sample_latents_with_trajectory
    from repro.transport import combine_cfg, sample_ode, time_grid

    setup = _engine_setup(sampling_method=method, num_sampling_steps=6, cfg_scale=cfg_scale, cfg_channels=2,
                          timestep_shift=0.3)
    noise, labels = torch.randn(2, 4, 2, 2, generator=torch.Generator().manual_seed(2)), torch.tensor([1, 7])
    x, kept = sample_latents_with_trajectory(setup, noise, labels, [0, 2, 4])
    assert torch.equal(x, sample_latents(setup, noise, labels)) and kept.shape == (2, 3, 4, 2, 2)
    # by hand: the state at each grid point (the conditional rows of the model's calls at that time) ...
    states, model = {}, setup.model

    def record(a, tt, yy):
        states.setdefault(round(float(tt[0]), 6), a[:2].clone())
        return model(a, tt, yy)

    sample_ode(record, noise, labels, method=method, num_steps=6, timestep_shift=0.3, cfg_scale=cfg_scale,
               cfg_channels=2, null_class=10)
    # ... and x1_hat = x_t + (1 - t) v there, v guided as the sampler guides it
    for j, step in enumerate([0, 2, 4]):
        t = float(time_grid(6, 0.3)[step])
        xs, tt = states[round(t, 6)], torch.full((2,), t)
        v = model(xs, tt, labels)
        if cfg_scale > 1:
            v = combine_cfg(v, model(xs, tt, torch.full_like(labels, 10)), cfg_scale, 2)
        torch.testing.assert_close(kept[:, j], xs + (1 - t) * v, rtol=1e-5, atol=1e-5)


def test_ddpm_trajectory_keeps_the_samplers_own_x_hat():
    from repro.sampling.engine import sample_latents, sample_latents_with_trajectory
    from repro.transport.ddpm import DiffusionSchedule, sample_ddpm

    setup = _engine_setup(process="ddpm", sampling_method="ddim", num_sampling_steps=5)
    noise, labels = torch.randn(2, 4, 2, 2, generator=torch.Generator().manual_seed(3)), torch.tensor([0, 9])
    x, kept = sample_latents_with_trajectory(setup, noise, labels, [0, 3, 4])
    assert torch.equal(x, sample_latents(setup, noise, labels))
    cleans = []
    sample_ddpm(setup.model, noise, labels, schedule=DiffusionSchedule.from_config(setup.cfg.transport),
                num_steps=5, on_clean=lambda i, xh: cleans.append(xh.clone()))
    assert kept.shape == (2, 3, 4, 2, 2)
    for j, step in enumerate([0, 3, 4]):
        torch.testing.assert_close(kept[:, j], cleans[step])


@pytest.mark.parametrize("process", ["ddpm", "flow"])
def test_a_trajectory_of_more_images_than_channels_passes_the_noise_and_the_stats_on(process):
    from repro.sampling.engine import sample_latents, sample_latents_with_trajectory

    # 5 images of 4 channels, guided: every row of the batch is kept (not as many as there are channels),
    # DDPM with eta > 0 draws its per-step noise from the images' own generators, and `stats` is filled
    sample = dict(sampling_method="ddim", eta=0.5) if process == "ddpm" else dict(sampling_method="euler")
    setup = _engine_setup(process=process, num_sampling_steps=4, cfg_scale=2.0, **sample)
    noise, labels = torch.randn(5, 4, 2, 2, generator=torch.Generator().manual_seed(5)), torch.tensor([0, 1, 2, 3, 4])
    stats, stats_ref = {}, {}
    x, kept = sample_latents_with_trajectory(setup, noise, labels, [0, 2], stats=stats)
    assert torch.equal(x, sample_latents(setup, noise, labels, stats=stats_ref))
    assert kept.shape == (5, 2, 4, 2, 2) and stats == stats_ref and stats


def test_decoding_names_images_from_zero_unless_told():
    from repro.sampling.engine import decode_strips, decode_to_uint8

    setup = _engine_setup()
    setup.vae = _PatternVAE()
    bad = torch.zeros(4, 4, 2, 2)
    bad[0, 1, 0, 0] = float("nan")
    with pytest.raises(ReproError, match=r"latents for image\(s\) 0 \("):
        decode_to_uint8(setup, bad)
    with pytest.raises(ReproError, match=r"latents for image\(s\) 0 \("):
        decode_strips(setup, bad.view(2, 2, 4, 2, 2))


class _PatternVAE(torch.nn.Module):
    """decode: (N, C, h, w) -> (N, 3, 4h, 4w) images whose pixels are tanh of the first channel, upsampled."""

    def __init__(self):
        super().__init__()
        self.calls = []

    def decode(self, z):
        self.calls.append((z.shape[0], torch.is_inference_mode_enabled()))
        self.seen = (z.dtype, torch.is_autocast_cpu_enabled())
        img = torch.tanh(z[:, :1]).repeat_interleave(4, -1).repeat_interleave(4, -2)
        return img.expand(-1, 3, -1, -1)


def test_decode_to_uint8_in_chunks_and_decode_strips_side_by_side():
    from repro.sampling.engine import decode_strips, decode_to_uint8
    from repro.tokenizer.images import to_uint8

    setup = _engine_setup()
    setup.vae = _PatternVAE()
    setup.cfg.data.latent_norm, setup.cfg.data.latent_multiplier = False, 0.5
    lat = torch.randn(5, 4, 2, 2, generator=torch.Generator().manual_seed(4))
    whole = to_uint8(setup.vae.decode(lat / 0.5)).numpy()  # de-normalised before decoding
    setup.vae.calls.clear()
    assert np.array_equal(decode_to_uint8(setup, lat, chunk=2), whole)
    assert setup.vae.calls == [(2, True), (2, True), (1, True)]
    setup.vae.calls.clear()
    assert np.array_equal(decode_to_uint8(setup, lat), whole) and setup.vae.calls == [(5, True)]  # 16 a chunk
    assert setup.vae.seen == (torch.float32, False)
    setup.vae_precision = "bf16"  # the VA-VAE's own precision, float32 latents in
    decode_to_uint8(setup, lat.double())
    assert setup.vae.seen == (torch.float32, True)
    setup.vae_precision = "fp32"
    bad = lat.clone()
    bad[3, 0, 0, 0] = float("nan")
    with pytest.raises(ReproError, match=r"latents for image\(s\) 13 \("):
        decode_to_uint8(setup, bad, first_index=10)
    strips = decode_strips(setup, lat[:4].view(2, 2, 4, 2, 2))  # (B=2, K=2): left = first step
    assert strips.shape == (2, 8, 16, 3)
    for b in range(2):
        for k in range(2):
            assert np.array_equal(strips[b, :, 8 * k:8 * (k + 1)], whole[2 * b + k])


def test_check_finite_latents_names_the_images_and_the_precision():
    from repro.sampling.engine import check_finite_latents, decode_strips

    setup = _engine_setup()
    x = torch.zeros(12, 4, 2, 2)
    check_finite_latents(setup, x)
    x[1, 0, 0, 0], x[3, 2, 1, 1] = float("nan"), float("inf")
    with pytest.raises(ReproError, match=r"^the sampler produced NaN/inf latents for image\(s\) 101, 103 \(fp32 "
                                         r"transformer\); nothing was written for them: ckpt_path or the latent "
                                         r"statistics in data.data_path hold NaN/inf values, or the sampler settings "
                                         r"diverge \(sample.cfg_scale, sample.timestep_shift\)$"):
        check_finite_latents(setup, x, first_index=100)
    x[:] = float("nan")
    setup.precision = "fp16"
    with pytest.raises(ReproError, match=r"image\(s\) 0, 1, 2, 3, 4, 5, 6, 7 and 4 more \(fp16 transformer\); nothing "
                                         r"was written for them: fp16 overflowed \(GPUs without bf16, e\.g\. T4/P100\): "
                                         r"sample with --precision fp32 into a new --out$"):
        check_finite_latents(setup, x)
    for n, shown in ((8, "0, 1, 2, 3, 4, 5, 6, 7 ("), (9, "0, 1, 2, 3, 4, 5, 6, 7 and 1 more (")):
        with pytest.raises(ReproError, match=re.escape(f"image(s) {shown}")):
            check_finite_latents(setup, x[:n])
    setup.precision = "bf16"
    with pytest.raises(ReproError, match=r"\(bf16 transformer\); nothing was written for them: sample with --precision "
                                         r"fp32 into a new --out; if fp32 fails too"):
        check_finite_latents(setup, x[:1])
    setup.precision = "tf32"  # no hint for a precision the kit does not have: nothing after the colon
    with pytest.raises(ReproError, match=r"\(tf32 transformer\); nothing was written for them: $"):
        check_finite_latents(setup, x[:1])
    # a strip (B, K, ...) names its image, not the flattened (image, step) row
    setup.vae = _PatternVAE()
    strips = torch.zeros(3, 2, 4, 2, 2)
    strips[2, 1, 0, 0, 0] = float("inf")
    with pytest.raises(ReproError, match=r"latents for image\(s\) 12 \("):
        decode_strips(setup, strips, first_index=10)


def test_stats_path_and_the_global_latent_scale(tmp_path):
    from repro.data.stats import SCALE_NAME, write_scale_file
    from repro.sampling.engine import denormalize, latent_scale_of, sampler_from_parts, stats_path

    cfg = Config()
    with pytest.raises(ReproError, match=r"^config key 'data.data_path' is not set: point it at the folder holding "
                                         r"latents_stats.pt \(python -m steps.step2_download --only latents-stats\)$"):
        stats_path(cfg)
    cfg.data.data_path = str(tmp_path / "mine.pt")
    assert stats_path(cfg) == tmp_path / "mine.pt"
    cfg.data.data_path = str(tmp_path)
    assert stats_path(cfg) == tmp_path / "latents_stats.pt"
    assert latent_scale_of(cfg) is None  # channel statistics
    cfg.data.latent_scaling = "global"
    with pytest.raises(ReproError, match=rf"^data.latent_scaling is global and data.latent_scale is null, but "
                                         rf"{tmp_path / SCALE_NAME} does not exist: set data.latent_scale to the factor "
                                         r"the model was trained with \(its run's config.yaml records it\), or write "
                                         r"the file with step 5 --recompute on the latent shards$"):
        latent_scale_of(cfg)
    write_scale_file(tmp_path / SCALE_NAME, {"global": {"scale": -1.0}})  # the file is named in its errors
    with pytest.raises(ReproError, match=rf"^{re.escape(str(tmp_path / SCALE_NAME))}\['global'\]\['scale'\] is "
                                         r"-1\.0, expected a finite number > 0$"):
        latent_scale_of(cfg)
    write_scale_file(tmp_path / SCALE_NAME, {"global": {"scale": 0.25}, "global_means": {"scale": 0.5}})
    assert latent_scale_of(cfg) == 0.25
    cfg.data.latent_scaling = "global_means"
    assert latent_scale_of(cfg) == 0.5
    cfg.data.latent_scale = 2
    assert latent_scale_of(cfg) == 2.0 and isinstance(latent_scale_of(cfg), float)
    # sampler_from_parts: the config's factor (or the one given), for global scalings only
    cfg.data.latent_scale = None
    with pytest.raises(ReproError, match=r"^data.latent_scaling is global_means but data.latent_scale is null: give "
                                         r"the factor the model was trained with$"):
        sampler_from_parts(cfg, _LinearField(), device=torch.device("cpu"))
    cfg.data.latent_scale = 4
    setup = sampler_from_parts(cfg, _LinearField(), device=torch.device("cpu"))
    assert setup.scale == 4.0 and isinstance(setup.scale, float)
    assert sampler_from_parts(cfg, _LinearField(), device=torch.device("cpu"), scale=8.0).scale == 8.0
    lat = torch.tensor([2.0, -4.0]).view(1, 2, 1, 1)
    cfg.data.latent_norm, cfg.data.latent_multiplier = False, 0.5
    torch.testing.assert_close(denormalize(setup, lat), lat / 0.5 / 4.0)  # the dataset's x * scale * m undone
    cfg.data.latent_scaling = "channel"
    assert sampler_from_parts(cfg, _LinearField(), device=torch.device("cpu"), scale=8.0).scale is None
    # the rest of the setup: defaults, the model twice, the class count, the VA-VAE's precision
    model = _LinearField()
    cfg.data.num_classes, cfg.vae.precision = 7, "fp16"
    setup = sampler_from_parts(cfg, model, device=torch.device("cpu"), stats=(torch.ones(1, 2, 1, 1),
                                                                               torch.full((1, 2, 1, 1), 3.0)))
    assert setup.precision == "fp32" and setup.model is model and setup.eager_model is model
    assert setup.num_classes == 7 and setup.vae_precision == "fp16" and setup.vae is None
    assert setup.mean.flatten().tolist() == [1.0, 1.0] and setup.std.flatten().tolist() == [3.0, 3.0]
    cfg.vae.precision = "auto"
    assert sampler_from_parts(cfg, model, device=torch.device("cpu")).vae_precision == "fp32"  # auto: fp32 on CPU
    cfg.vae.precision = "half"
    with pytest.raises(ReproError, match=r"^vae.precision='half' is not a precision; choose auto, fp32, bf16 or fp16$"):
        sampler_from_parts(cfg, model, device=torch.device("cpu"))


def test_auto_batch_size_on_the_cpu_is_upstreams_four():
    from repro.sampling.engine import auto_batch_size

    setup = _engine_setup()
    assert auto_batch_size(setup, 100) == (4, "CPU: upstream's per-process batch 4")
    assert auto_batch_size(setup, 3)[0] == 3 and auto_batch_size(setup, 0)[0] == 1


def test_the_batch_that_fits_free_memory_by_hand():
    from repro.sampling.engine import MAX_AUTO_BATCH, batch_that_fits

    mib, gib = 2**20, 2**30
    # 0.85 x 2000 B - 300 B of decode = 1400 B, 100 B an image: 14 (under 16, not rounded to a multiple of 8)
    assert batch_that_fits(2000, 100, 300, False, 1000)[0] == 14
    assert batch_that_fits(2000, 50, 300, True, 1000)[0] == 14  # guidance doubles the rows of each image
    assert batch_that_fits(2000, 100, 300, False, 9)[0] == 9  # the cap
    assert batch_that_fits(2000, 100, 300, False, 0)[0] == 1
    # 16 and up: rounded down to a multiple of 8 (here 0.85 x 10 GiB - 1 GiB = 7,680 MiB, 100 MiB an image: 76)
    batch, why = batch_that_fits(10 * gib, 100 * mib, gib, False, 1000)
    assert (batch, why) == (72, "10.0 GiB free: 100 MiB per image, decode 1.0 GiB")
    batch, why = batch_that_fits(10 * gib, 100 * mib, gib, True, 1000)
    assert (batch, why) == (32, "10.0 GiB free: 200 MiB per image, decode 1.0 GiB")  # 38 rounded down
    assert batch_that_fits(10 * gib, 100 * mib, gib, False, 50)[0] == 50  # capped after the rounding
    assert batch_that_fits(1700, 100, 0, False, 1000)[0] == 14  # 14.45 images: 14
    assert batch_that_fits(1800, 100, 0, False, 1000)[0] == 15
    assert batch_that_fits(1900, 100, 0, False, 1000)[0] == 16
    assert batch_that_fits(2500, 100, 0, False, 1000)[0] == 16  # 21: from 16 up, a multiple of 8
    # less free than the decode needs: one image (the sampler then reports an out-of-memory as advice)
    assert batch_that_fits(gib, 100 * mib, gib, False, 1000)[0] == 1
    # a model with no measurable activations: the kit's ceiling, not a division by zero
    assert batch_that_fits(80 * gib, 0, 0, False, 10**6)[0] == MAX_AUTO_BATCH == 1024
    assert batch_that_fits(80 * gib, 0.25, 0, True, 10**6)[0] == 1024


@pytest.mark.gpu
def test_auto_batch_size_on_a_gpu_measures_a_batch_that_runs():
    from repro.sampling.engine import auto_batch_size, sample_latents

    setup = _engine_setup(cfg_scale=2.0)
    setup.device = torch.device("cuda")
    setup.model = setup.eager_model = setup.model.cuda()

    class _Decoder(torch.nn.Module):  # latents (B, 4, 2, 2) -> images (B, 3, 8, 8) in [-1, 1]
        def decode(self, z):
            return torch.tanh(z[:, :3].repeat_interleave(4, -1).repeat_interleave(4, -2))

    setup.vae = _Decoder()
    batch, why = auto_batch_size(setup, 64)
    assert 1 <= batch <= 64 and " GiB free: " in why and why.endswith(" GiB")
    noise = torch.randn(batch, *setup.latent_shape, device="cuda")
    assert sample_latents(setup, noise, torch.zeros(batch, dtype=torch.int64, device="cuda")).shape == noise.shape


def test_plan_labels_defaults_edges_and_messages():
    assert torch.equal(plan.plan_labels(6, 10), plan.plan_labels(6, 10, seed=0, mode="uniform"))  # defaults
    assert plan.plan_labels(1, 10).tolist() == [6]
    assert plan.plan_labels(3, 10, labels=[4]).tolist() == [4, 4, 4]
    assert torch.equal(plan.plan_labels(3, 10, labels=[]), plan.plan_labels(3, 10))  # no labels: uniform
    with pytest.raises(ReproError, match=r"^--num-samples must be >= 1, got 0$"):
        plan.plan_labels(0, 10)
    with pytest.raises(ReproError, match=r"^--class-balanced needs --num-samples to be a multiple of data.num_classes "
                                         r"\(10\); got 25 \(use 20 or 30\)$"):
        plan.plan_labels(25, 10, mode="balanced")
    with pytest.raises(ReproError, match=r"^unknown label mode 'sorted' \(choose one of uniform, balanced\)$"):
        plan.plan_labels(4, 2, mode="sorted")


# ---------------------------------------------------------------------------------------------
# check_inputs and build_sampler on the tiny profile's files


def _tiny_files_config(tmp_path, *extra):
    from repro.config import load_config
    from tests.conftest import PROJECT_ROOT
    from tests.tiny_assets import write_tiny_assets

    files = write_tiny_assets(tmp_path / "weights")
    cfg = load_config(PROJECT_ROOT / "configs" / "tiny.yaml", [
        f"ckpt_path={files['lightningdit-xl-800ep']}", f"vae.ckpt_path={files['vavae-f16d32']}",
        f"data.data_path={files['latents-stats'].parent}", "sample.num_sampling_steps=2", *extra])
    return cfg, files


def test_check_inputs_names_each_missing_file_and_refuses_unknown_settings(tmp_path):
    import copy

    from repro.sampling.engine import VFM_DIT_HINT, check_inputs

    cfg, files = _tiny_files_config(tmp_path)
    check_inputs(cfg)

    def refused(message, **changes):
        c = copy.deepcopy(cfg)
        for key, value in changes.items():
            section, _, leaf = key.rpartition("__")
            setattr(getattr(c, section) if section else c, leaf, value)
        with pytest.raises(ReproError, match=f"^{re.escape(message)}$"):
            check_inputs(c)

    refused("config key 'ckpt_path' is not set: give the file, or run `python -m steps.step2_download --only "
            "lightningdit-xl-800ep` and step 3", ckpt_path=None)
    refused(f"vae.ckpt_path not found: {tmp_path / 'x.pt'} (config key 'vae.ckpt_path'); fix the path or run `python -m "
            "steps.step2_download --only vavae-f16d32`", vae__ckpt_path=str(tmp_path / "x.pt"))
    refused(f"config key 'ckpt_path' is not set: give the file, or {VFM_DIT_HINT} and step 3", ckpt_path=None,
            vae__model_name="vfm_vae_f16d32")
    refused("config key 'vae.ckpt_path' is not set: give the file, or run `python -m steps.step2_download --only "
            "vfm-vae` and step 3", vae__ckpt_path=None, vae__model_name="vfm_vae_f16d32")
    refused(f"latent statistics not found: {tmp_path / 'none' / 'latents_stats.pt'} (config key 'data.data_path'); run "
            "`python -m steps.step2_download --only latents-stats` or step 5 to compute them",
            data__data_path=str(tmp_path / "none"))
    scale_file = files["latents-stats"].parent / "latents_scale.json"
    refused(f"data.latent_scaling is global and data.latent_scale is null, but {scale_file} does not exist: set "
            "data.latent_scale to the factor the model was trained with (its run's config.yaml records it), or write "
            "the file with step 5 --recompute on the latent shards",
            data__latent_scaling="global")  # a global scaling needs its factor, not the statistics
    refused("config key 'sample.mode' is 'SDE': only 'ODE' sampling exists (as upstream)", sample__mode="SDE")
    refused("config key 'sample.sampling_method' is 'ddim'; choose one of euler, midpoint, heun2, rk4, dopri5",
            sample__sampling_method="ddim")
    refused("config key 'sample.sampling_method' is 'euler'; choose one of ddim, ddpm", transport__process="ddpm")
    for key in ("reverse", "likelihood"):
        refused("config keys 'sample.reverse' / 'sample.likelihood' must be false to generate images",
                **{f"sample__{key}": True})
    refused("config key 'sample.num_sampling_steps' must be >= 2, got 1", sample__num_sampling_steps=1)
    refused("config key 'sample.cfg_channels' must be in [1, 32] or null, got 0", sample__cfg_channels=0)
    refused("config key 'sample.cfg_channels' must be in [1, 32] or null, got 33", sample__cfg_channels=33)
    for ok in (dict(num_sampling_steps=1, sampling_method="dopri5"), dict(num_sampling_steps=2),
               dict(cfg_channels=None), dict(cfg_channels=1), dict(cfg_channels=32)):
        c = copy.deepcopy(cfg)
        for key, value in ok.items():
            setattr(c.sample, key, value)
        check_inputs(c)
    c = copy.deepcopy(cfg)
    c.transport.process, c.sample.sampling_method, c.sample.num_sampling_steps = "ddpm", "ddim", 1
    check_inputs(c)  # one DDIM step is a sampler


def test_build_sampler_loads_what_the_config_names(tmp_path, monkeypatch):
    import copy

    from repro.data.stats import SCALE_NAME, write_scale_file
    from repro.sampling.engine import build_sampler
    from repro.tokenizer import loader

    cfg, files = _tiny_files_config(tmp_path, "sample.precision=fp16")
    calls = []
    real = loader.load_vae

    def spy(vae_cfg, device="cpu", encoder=True):
        calls.append((vae_cfg.ckpt_path, device, encoder))
        return real(vae_cfg, device=device, encoder=encoder)

    monkeypatch.setattr(loader, "load_vae", spy)
    setup = build_sampler(cfg, device="cpu")
    assert calls == [(cfg.vae.ckpt_path, torch.device("cpu"), False)]  # decoding only
    assert setup.device == torch.device("cpu") and setup.precision == "fp16"  # sample.precision
    assert setup.eager_model is setup.model and not setup.model.training
    assert not any(p.requires_grad for p in setup.model.parameters())
    stats = torch.load(files["latents-stats"], weights_only=True)
    torch.testing.assert_close(setup.mean, stats["mean"]) and torch.testing.assert_close(setup.std, stats["std"])
    assert build_sampler(cfg, device="cpu", precision="fp32").precision == "fp32"  # --precision wins
    for key, bad, message in (("sample", "half", "sample.precision='half' is not a precision"),
                              ("vae", "half", "vae.precision='half' is not a precision")):
        c = copy.deepcopy(cfg)
        getattr(c, key).precision = bad
        calls.clear()
        with pytest.raises(ReproError, match=re.escape(message)):
            build_sampler(c, device="cpu")
        assert calls == []  # refused before anything loads
    with pytest.raises(ReproError, match=re.escape("--precision='half' is not a precision")):
        build_sampler(cfg, device="cpu", precision="half")
    # a global scaling: its factor from latents_scale.json, no statistics read
    folder = tmp_path / "scaled"
    folder.mkdir()
    write_scale_file(folder / SCALE_NAME, {"global": {"scale": 0.5}})
    c = copy.deepcopy(cfg)
    c.data.data_path, c.data.latent_scaling, c.data.latent_norm = str(folder), "global", False
    scaled = build_sampler(c, device="cpu")
    assert scaled.scale == 0.5 and scaled.mean is None and scaled.std is None

    # a tokenizer whose latents have another channel count than the model's
    class Narrow(torch.nn.Module):
        embed_dim = 16

    monkeypatch.setattr(loader, "load_vae", lambda *a, **k: Narrow())
    with pytest.raises(ReproError, match=rf"^the tokenizer {re.escape(cfg.vae.ckpt_path)} makes 16-channel latents but "
                                         r"model.in_chans is 32: set model.in_chans=16$"):
        build_sampler(cfg, device="cpu")
    monkeypatch.setattr(loader, "load_vae", lambda *a, **k: torch.nn.Identity())  # no embed_dim: not checked
    build_sampler(cfg, device="cpu")


def test_build_sampler_builds_the_denoiser_for_the_process(tmp_path):
    from repro.models.denoisers import FLOW_TIME_SCALE, build_denoiser
    from repro.sampling.engine import build_sampler

    cfg, _ = _tiny_files_config(tmp_path, "model.model_type=UNet-T", "transport.process=ddpm",
                                "sample.sampling_method=ddim", "transport.prediction=noise",
                                "transport.use_cosine_loss=false", "transport.use_lognorm=false",
                                "sample.timestep_shift=0.0", "sample.cfg_interval_start=0.0")
    unet = build_denoiser(cfg.model, 4, cfg.data.num_classes, "ddpm")
    torch.save({"ema": unet.state_dict()}, tmp_path / "unet.pt")
    cfg.ckpt_path = str(tmp_path / "unet.pt")
    assert build_sampler(cfg, device="cpu").eager_model.time_scale == 1.0  # DDPM's k, not flow's t * 1000
    (tmp_path / "f").mkdir()
    flow, _ = _tiny_files_config(tmp_path / "f", "model.model_type=UNet-T")
    torch.save({"ema": build_denoiser(flow.model, 4, flow.data.num_classes, "flow").state_dict()}, tmp_path / "f.pt")
    flow.ckpt_path = str(tmp_path / "f.pt")
    assert build_sampler(flow, device="cpu").eager_model.time_scale == FLOW_TIME_SCALE  # flow's t * 1000


# ---------------------------------------------------------------------------------------------
# A whole run (repro.sampling.run) in-process on the tiny files: what it records, prints, returns and refuses


@pytest.fixture
def tiny_run(tmp_path, monkeypatch):
    monkeypatch.setenv("REPRO_RUNS_DIR", str(tmp_path / "runs"))
    cfg, files = _tiny_files_config(tmp_path, "sample.num_sampling_steps=3")  # 2 Euler steps, the 2nd guided
    return cfg, files


class _Bar:
    def __init__(self, **kw):
        self.kw, self.updates, self.closed = kw, [], False

    def update(self, n):
        self.updates.append(n)

    def close(self):
        self.closed = True


def _fast_engine(monkeypatch, fail_at=None, error=None):
    """engine.sample_latents / decode_to_uint8 as stubs (the noise itself; 2 x 2 images): the run's bookkeeping, fast.
    `fail_at`: the call (1-based) of sample_latents that raises `error`."""
    from repro.sampling import engine

    calls = []

    def sample(setup, noise, labels, stats=None, model=None):
        calls.append(len(noise))
        if fail_at is not None and len(calls) == fail_at:
            raise error
        stats["nfe"] = stats.get("nfe", 0) + 1
        stats["model_rows"] = stats.get("model_rows", 0) + len(noise)
        return noise.clone()

    def decode(setup, x, first_index=0):  # 2 x 2 images from the first 12 latent values
        return (x.flatten(1)[:, :12].reshape(-1, 2, 2, 3) * 40 + 128).clamp(0, 255).to(torch.uint8).numpy()

    real_build, built = engine.build_sampler, []

    def build(cfg, **kw):  # the files are checked and loaded once; later runs reuse them under their own config
        import dataclasses

        engine.check_inputs(cfg)
        if not built:
            built.append(real_build(cfg, **kw))
        return dataclasses.replace(built[0], cfg=cfg)

    monkeypatch.setattr(engine, "sample_latents", sample)
    monkeypatch.setattr(engine, "decode_to_uint8", decode)
    monkeypatch.setattr(engine, "build_sampler", build)
    return calls


def test_run_sampling_returns_records_and_prints_what_it_did(tiny_run, tmp_path, monkeypatch, capsys):
    from repro.config import load_config
    from repro.sampling import run as run_mod
    from repro.utils import progress
    from repro.utils.io import sha256_file

    cfg, files = tiny_run
    out = tmp_path / "fid"
    bars, previews = [], []
    monkeypatch.setattr(progress, "progress_bar", lambda **kw: bars.append(_Bar(**kw)) or bars[-1])
    real_preview = run_mod.save_preview

    def preview_spy(images, labels, path, title=None, class_names=None):
        previews.append(dict(n=len(images), labels=labels, path=path, title=title, class_names=class_names))
        return real_preview(images, labels, path, title, class_names=class_names)

    monkeypatch.setattr(run_mod, "save_preview", preview_spy)
    builds, warmups, writers = [], [], []
    real_build, real_warm, real_writer = run_mod.engine.build_sampler, run_mod.engine.warm_up, run_mod.ImageWriter
    monkeypatch.setattr(run_mod.engine, "build_sampler", lambda c, **kw: builds.append(kw) or real_build(c, **kw))
    monkeypatch.setattr(run_mod.engine, "warm_up", lambda st, b: warmups.append(b) or real_warm(st, b))
    monkeypatch.setattr(run_mod, "ImageWriter", lambda *a, **kw: writers.append(kw) or real_writer(*a, **kw))
    monkeypatch.setattr(run_mod, "time", _Clock(1.0))  # the first batch takes 1 s, the whole run 2 s
    names = [f"c{i}" for i in range(10)]
    capsys.readouterr()
    r = run_mod.run_sampling(cfg, out_dir=str(out), num_samples=5, batch_size=2, seed=3, device="cpu",
                             config_header=("hello",), class_names=names, precision="fp32", compile="none")
    assert builds == [dict(device="cpu", precision="fp32", compile="none")] and warmups == [2]
    assert writers == [dict(threaded=True)] and not (out / "latent_batches").exists()
    labels = plan.plan_labels(5, 10, seed=3).tolist()
    summary = r.pop("summary")
    timing = {k: r.pop(k) for k in ("images_per_s", "seconds", "peak_memory_bytes")}
    assert r == {"out_dir": str(out), "images_dir": str(out / "images"), "config": str(out / "config.yaml"),
                 "record": str(out / "run.json"), "num_samples": 5, "new_images": 5, "existing_images": 0,
                 "batch_size": 2, "world_size": 1, "precision": "fp32", "seed": 3, "labels": labels,
                 "npz": str(out / "samples.npz"), "grid": None, "preview": str(out / "preview.png"),
                 "class_names": names, "trajectories_dir": None, "trajectory_steps": None,
                 "nfe_per_image": 2.0, "model_rows_per_image": 3.0, "peak_memory_kind": "process peak RSS"}
    assert timing["images_per_s"] == 2.5 and timing["seconds"] == 2.0  # 5 images in 2 s
    peak = timing["peak_memory_bytes"]
    assert isinstance(peak, int) and peak > 2 ** 20
    lines = capsys.readouterr().out.strip().splitlines()
    assert re.fullmatch(rf"sampling 5 images into {re.escape(str(out))}: 0 already there; batch 2 x 1 process\(es\), "
                        r"fp32 on cpu \(.*\), vavae_f16d32 decode fp32", lines[-4]), lines
    assert re.fullmatch(r"first batch: 1\.0s for 2 image\(s\) per process -> about 2 s for this run, 6\.94 h "
                        r"for 50,000 images on 1 process\(es\) \(cpu .*\)", lines[-3]), lines
    assert lines[-2] == summary == (
        f"5 images (5 new) in {out}: 2 NFE per image, 2.5 images/s, peak memory {peak / 2 ** 30:.2f} GiB "
        "(process peak RSS), fp32, batch 2 x 1 process(es); 50,000 images at this rate: 5.56 h")
    assert lines[-1] == (f"wrote: {out / 'samples.npz'}, {out / 'preview.png'}, {out / 'images'}/ (5 PNGs), "
                         f"{out / 'config.yaml'}, {out / 'run.json'}")
    s = cfg.sample
    assert json.loads((out / "run.json").read_text()) == {
        "trajectory": None, "seed": 3, "batch_size": 2, "num_samples": 5, "label_mode": "uniform", "labels": None,
        "precision": "fp32", "vae_precision": "fp32", "ckpt": files["lightningdit-xl-800ep"].name,
        "sample": {k: getattr(s, k) for k in ("mode", "sampling_method", "atol", "rtol", "num_sampling_steps",
                                              "cfg_scale", "cfg_interval_start", "timestep_shift", "cfg_channels")},
        "model_type": "LightningDiT-T/1", "image_size": 64, "num_classes": 10,
        "inputs": {key: {"file": str(files[name]), "sha256": sha256_file(files[name])} for key, name in
                   (("ckpt_path", "lightningdit-xl-800ep"), ("vae.ckpt_path", "vavae-f16d32"),
                    ("data.data_path", "latents-stats"))}}
    header = (out / "config.yaml").read_text().splitlines()[:2]
    assert header == ["# Resolved config of this sampling run (step 4)", "# hello"]
    assert load_config(out / "config.yaml").sample.num_sampling_steps == 3
    with np.load(out / "samples.npz") as npz:
        assert npz["arr_1"].tolist() == labels
        assert all(np.array_equal(npz["arr_0"][i], writer.read_png(out / "images" / f"{i:06d}.png")) for i in range(5))
    assert [(b.kw, b.updates, b.closed) for b in bars] == [(dict(total=5, unit="img", desc="sampling",
                                                                 dynamic_ncols=True, smoothing=0.1), [2, 2, 1], True)]
    assert previews == [dict(n=5, labels=labels, path=out / "preview.png", title="LightningDiT-T/1, cfg 4, 3 steps",
                             class_names=names)]

    # the same command with more images: the folder's batch size; batches [4, 5] and [6] are sampled
    before = np.load(out / "samples.npz")["arr_0"]
    r = run_mod.run_sampling(cfg, out_dir=str(out), num_samples=7, seed=3, progress=False, device="cpu")
    assert (r["batch_size"], r["existing_images"], r["new_images"]) == (2, 5, 3)
    assert f"sampling 7 images into {out}: 5 already there; batch 2 x 1" in capsys.readouterr().out
    assert json.loads((out / "run.json").read_text())["num_samples"] == 7 and len(bars) == 1  # progress=False
    with np.load(out / "samples.npz") as npz:
        # images 0-3 are kept as written; image 4 is drawn again in the batch [4, 5] an uninterrupted run of 7
        # would have, from the same noise, so it matches up to the arithmetic of a batch of 2 vs 1 (threads)
        assert np.array_equal(npz["arr_0"][:4], before[:4]) and len(npz["arr_1"]) == 7
        assert np.abs(npz["arr_0"][4].astype(int) - before[4]).max() <= 3
    # ... and once more: nothing to sample, samples.npz untouched, no rates
    stamp = (out / "samples.npz").stat().st_mtime_ns
    r = run_mod.run_sampling(cfg, out_dir=str(out), num_samples=7, seed=3, progress=False, device="cpu")
    assert r["new_images"] == 0 and r["nfe_per_image"] is None and r["model_rows_per_image"] is None
    assert r["images_per_s"] is None and (out / "samples.npz").stat().st_mtime_ns == stamp
    assert warmups == [2, 2]  # nothing to sample: no warm-up
    assert re.search(r": - NFE per image, - images/s, peak memory", r["summary"]) and "at this rate" not in r["summary"]
    (out / "samples.npz").write_bytes(b"torn")  # a broken npz is packed again even with nothing new
    run_mod.run_sampling(cfg, out_dir=str(out), num_samples=7, seed=3, progress=False, device="cpu")
    with np.load(out / "samples.npz") as npz:
        assert len(npz["arr_0"]) == 7


def test_run_sampling_refuses_what_would_mix_or_make_no_sense(tiny_run, tmp_path, monkeypatch):
    import copy

    from repro.sampling.run import run_sampling

    cfg, _ = tiny_run
    _fast_engine(monkeypatch)
    out = tmp_path / "fid"
    kw = dict(progress=False, device="cpu", threaded_writer=False)
    run_sampling(cfg, out_dir=str(out), num_samples=2, batch_size=1, seed=3, **kw)  # batch 1 is a batch
    with pytest.raises(ReproError, match=f"^{re.escape(str(out))} holds samples made with seed=3 "
                                         rf"\({re.escape(str(out / 'run.json'))}\); this run asks for seed=4: run with "
                                         r"the old value to resume, or choose a new --out$"):
        run_sampling(cfg, out_dir=str(out), num_samples=2, seed=4, **kw)
    other = copy.deepcopy(cfg)
    other.sample.num_sampling_steps = 4
    with pytest.raises(ReproError, match=r"made with sample.num_sampling_steps=3 .*asks for "
                                         r"sample.num_sampling_steps=4"):
        run_sampling(other, out_dir=str(out), num_samples=2, seed=3, **kw)
    with pytest.raises(ReproError, match=r"^--batch-size must be >= 1, got 0$"):
        run_sampling(cfg, out_dir=str(tmp_path / "b0"), num_samples=2, batch_size=0, **kw)
    with pytest.raises(ReproError, match=r"^--labels and --class-balanced exclude each other: give one$"):
        run_sampling(cfg, out_dir=str(tmp_path / "lb"), num_samples=10, labels=[1], class_balanced=True, **kw)
    (out / "run.json").write_text("{torn")
    with pytest.raises(ReproError, match=rf"^{re.escape(str(out / 'run.json'))} is unreadable \(.*\): delete it \(the "
                                         r"PNGs stay\) and run again$"):
        run_sampling(cfg, out_dir=str(out), num_samples=2, seed=3, **kw)


def test_run_sampling_class_balanced_and_named_labels(tiny_run, tmp_path, capsys, monkeypatch):
    from repro.sampling.run import run_sampling

    cfg, _ = tiny_run
    _fast_engine(monkeypatch)
    kw = dict(progress=False, device="cpu", threaded_writer=False, batch_size=4)
    r = run_sampling(cfg, out_dir=str(tmp_path / "bal"), num_samples=10, class_balanced=True, **kw)
    assert sorted(r["labels"]) == list(range(10)) and r["labels"] == plan.plan_labels(10, 10, 0, "balanced").tolist()
    assert json.loads((tmp_path / "bal" / "run.json").read_text())["label_mode"] == "balanced"
    names = [f"c{i}" for i in range(10)]
    capsys.readouterr()
    r = run_sampling(cfg, out_dir=str(tmp_path / "named"), num_samples=3, labels=["c3", "c1"], class_names=names, **kw)
    assert r["labels"] == [3, 1, 3] and "labels: 3 c3, 1 c1" in capsys.readouterr().out.splitlines()
    record = json.loads((tmp_path / "named" / "run.json").read_text())
    assert record["labels"] == [3, 1] and record["label_mode"] == "fixed"


def test_run_sampling_demo_grid_and_its_replacement(tiny_run, tmp_path, capsys, monkeypatch):
    from repro.paths import runs_dir
    from repro.sampling.run import default_out_dir, run_sampling

    cfg, _ = tiny_run
    _fast_engine(monkeypatch)  # 2 x 2 images
    kw = dict(progress=False, device="cpu", threaded_writer=False)
    capsys.readouterr()
    r = run_sampling(cfg, demo=True, **kw)  # the default folder: runs/demo
    out = runs_dir() / "demo"
    assert r["out_dir"] == str(out) and r["num_samples"] == 8 and r["labels"] == [5, 3, 7, 7, 8, 8, 9, 9]
    printed = capsys.readouterr().out
    assert ("demo labels: 5, 3, 7, 7, 8, 8, 9, 9 (the official demo labels mod 10 (this model has 10 classes))"
            in printed.splitlines())
    assert "first batch: " in printed and "for 50,000 images" not in printed  # a demo's pace says nothing of FID
    assert r["npz"] is None and r["grid"] == str(out / "demo_samples.png") and "at this rate" not in r["summary"]
    with Image.open(out / "demo_samples.png") as im:
        assert im.size == (4 * 2, 2 * 2)
    assert f"wrote: {out / 'demo_samples.png'}, {out / 'preview.png'}" in printed
    first = writer.read_png(out / "images" / "000000.png")
    (out / "images" / "000009.png").write_bytes(b"")  # a stale image of another demo: removed on replacement
    r = run_sampling(cfg, demo=True, seed=5, **kw)
    assert f"note: replacing the demo in {out}, made with seed=0" in capsys.readouterr().out
    assert r["new_images"] == 8 and not np.array_equal(writer.read_png(out / "images" / "000000.png"), first)
    assert not (out / "images" / "000009.png").exists()
    r = run_sampling(cfg, demo=True, seed=5, num_samples=9, **kw)  # 9 images: a 3 x 4 grid, every image read
    with Image.open(r["grid"]) as im:
        assert im.size == (4 * 2, 3 * 2)
        assert np.array_equal(np.asarray(im)[4:, :2], writer.read_png(out / "images" / "000008.png"))
    capsys.readouterr()
    run_sampling(cfg, demo=True, seed=5, class_names=[f"c{i}" for i in range(10)], **kw)  # named classes
    assert any(line.startswith("demo labels: 5 c5, 3 c3, 7 c7, 7 c7, 8 c8, 8 c8, 9 c9, 9 c9 (")
               for line in capsys.readouterr().out.splitlines())
    r = run_sampling(cfg, num_samples=2, **kw)  # neither --out nor demo: runs/samples/<upstream-style name>
    assert r["out_dir"] == str(default_out_dir(cfg, False)) and Path(r["out_dir"]).parent == runs_dir() / "samples"


def test_run_sampling_extends_a_folder_from_before_input_hashes_and_says_so(tiny_run, tmp_path, monkeypatch, capsys):
    from repro.sampling.run import run_sampling

    cfg, _ = tiny_run
    _fast_engine(monkeypatch)
    out, kw = tmp_path / "old", dict(progress=False, device="cpu", threaded_writer=False, batch_size=2)
    run_sampling(cfg, out_dir=str(out), num_samples=2, **kw)
    record = json.loads((out / "run.json").read_text())
    del record["inputs"]  # as a kit before input hashes wrote it
    (out / "run.json").write_text(json.dumps(record))
    capsys.readouterr()
    assert run_sampling(cfg, out_dir=str(out), num_samples=3, **kw)["new_images"] == 1
    assert (f"note: {out / 'run.json'} predates input hashes; the input files are older than the folder's first "
            "image, so it is extended, and their sha256 are recorded from now on") in capsys.readouterr().out
    assert json.loads((out / "run.json").read_text())["inputs"]


def test_run_sampling_reads_a_ddpm_trajectory_at_its_own_steps(tiny_run, tmp_path, capsys):
    from repro.sampling.run import run_sampling

    cfg, _ = tiny_run
    cfg.transport.process, cfg.sample.sampling_method = "ddpm", "ddim"
    capsys.readouterr()
    r = run_sampling(cfg, out_dir=str(tmp_path / "t"), num_samples=1, trajectory=2, progress=False, device="cpu",
                     threaded_writer=False)
    assert f"{tmp_path / 't' / 'trajectories'}/ (x0 strips)" in capsys.readouterr().out  # in the "wrote:" line
    assert r["trajectory_steps"] == [0, 2]  # DDIM's 3 steps, each with its x̂ (Euler's 2-step grid: [0, 1])
    plain = run_sampling(cfg, out_dir=str(tmp_path / "p"), num_samples=1, progress=False, device="cpu",
                         threaded_writer=False)
    assert r["nfe_per_image"] == plain["nfe_per_image"] > 0  # the trajectory's model calls are counted too


def test_run_sampling_trajectories_and_latent_shards(tiny_run, tmp_path):
    from safetensors.torch import load_file

    from repro.sampling.run import run_sampling

    cfg, _ = tiny_run
    out = tmp_path / "traj"
    kw = dict(progress=False, device="cpu", threaded_writer=False, batch_size=2)
    r = run_sampling(cfg, out_dir=str(out), num_samples=3, trajectory=2, latent_shards=True, **kw)
    assert r["trajectories_dir"] == str(out / "trajectories") and r["trajectory_steps"] == [0, 1]
    assert r["latent_shards"] == [str(out / "samples_rank00_shard000.safetensors")]
    for i in range(3):
        assert writer.read_png(out / "trajectories" / f"{i:06d}.png").shape == (64, 2 * 64, 3)
    shard = load_file(r["latent_shards"][0])
    assert shard["latents"].shape == (3, 32, 4, 4) and shard["labels"].tolist() == r["labels"]
    assert json.loads((out / "run.json").read_text())["trajectory"] == 2
    # a strip missing: its batch is sampled again; a run without --trajectory keeps the folder's K in run.json
    (out / "trajectories" / "000002.png").unlink()
    r = run_sampling(cfg, out_dir=str(out), num_samples=3, trajectory=2, **kw)
    assert r["new_images"] == 1 and (out / "trajectories" / "000002.png").is_file()
    assert run_sampling(cfg, out_dir=str(out), num_samples=3, **kw)["new_images"] == 0
    assert json.loads((out / "run.json").read_text())["trajectory"] == 2
    # a batch without its latents is sampled again when --latent-shards asks for them
    for p in (out / "latent_batches").glob("0000002_*"):
        p.unlink()
    assert run_sampling(cfg, out_dir=str(out), num_samples=3, latent_shards=True, **kw)["new_images"] == 1
    # an image missing while its strip and latents exist: sampled again too
    (out / "images" / "000000.png").unlink()
    r = run_sampling(cfg, out_dir=str(out), num_samples=3, trajectory=2, latent_shards=True, **kw)
    assert r["new_images"] == 2 and (out / "images" / "000000.png").is_file()


def test_sigterm_mid_run_drops_the_batch_in_flight_and_resumes(tiny_run, tmp_path, monkeypatch):
    import signal

    from repro.errors import Preempted
    from repro.sampling import engine
    from repro.sampling.run import _stop_if_signalled, run_sampling

    cfg, _ = tiny_run
    _fast_engine(monkeypatch)
    out = tmp_path / "term"
    real, calls = engine.sample_latents, []

    def stopped_in_batch_two(*a, **k):
        calls.append(1)
        if len(calls) == 2:
            os.kill(os.getpid(), signal.SIGTERM)  # inside the droppable block: the batch is dropped
        return real(*a, **k)

    monkeypatch.setattr(engine, "sample_latents", stopped_in_batch_two)
    kw = dict(progress=False, device="cpu", threaded_writer=False, batch_size=2, num_samples=6)
    with pytest.raises(Preempted) as err:
        run_sampling(cfg, out_dir=str(out), **kw)
    assert err.value.signum == signal.SIGTERM and str(err.value) == (
        f"stopped by SIGTERM: 2 of 6 images are written in {out / 'images'} (a batch in flight, if any, was dropped); "
        "resume with the same command")
    assert plan.existing_indices(out / "images") == {0, 1} and not (out / "samples.npz").exists()
    assert run_sampling(cfg, out_dir=str(out), **kw)["new_images"] == 4
    assert _stop_if_signalled(None, out / "images", 6) is None and _stop_if_signalled(0, out / "images", 6) is None
    with pytest.raises(Preempted, match=r"^stopped by SIGINT: 6 of 6 images"):
        _stop_if_signalled(signal.SIGINT, out / "images", 6)
    with pytest.raises(Preempted) as err:  # images past the run's n are not counted
        _stop_if_signalled(signal.SIGINT, out / "images", 5)
    assert str(err.value) == (f"stopped by SIGINT: 5 of 5 images are written in {out / 'images'} (a batch in flight, "
                              "if any, was dropped); resume with the same command")


def test_default_out_dir_and_the_record_comparisons(tmp_path, monkeypatch, capsys):
    from repro.sampling.run import _changed_input, _legacy_record_check, _mismatch, default_out_dir

    monkeypatch.setenv("REPRO_RUNS_DIR", str(tmp_path / "runs"))
    cfg = Config()
    cfg.model.model_type, cfg.ckpt_path = "LightningDiT-XL/1", "/w/Step-0800000.pt"
    cfg.sample.sampling_method, cfg.sample.num_sampling_steps = "euler", 250
    assert default_out_dir(cfg, True) == tmp_path / "runs" / "demo"
    assert default_out_dir(cfg, False) == (tmp_path / "runs" / "samples" /
                                           "lightningdit-xl-1-ckpt-step-0800000-euler-250")
    cfg.sample.cfg_scale, cfg.sample.cfg_interval_start, cfg.sample.timestep_shift = 6.7, 0.125, 0.3
    cfg.ckpt_path = None
    assert default_out_dir(cfg, False).name == "lightningdit-xl-1-ckpt-model-euler-250-interval0.12-cfg6.70-shift0.30"
    cfg.sample.cfg_scale = 1.5  # any guidance names its settings
    assert default_out_dir(cfg, False).name == "lightningdit-xl-1-ckpt-model-euler-250-interval0.12-cfg1.50-shift0.30"

    old = {"seed": 0, "num_samples": 8, "label_mode": "uniform", "ckpt": "a.pt", "sample": {"cfg_scale": 4.0}}
    assert _mismatch(old, {**old, "num_samples": 16}) is None  # uniform: image i is the same whatever N is
    assert _mismatch(old, {**old, "seed": 1}) == ("seed", 0, 1)
    assert _mismatch(old, {**old, "sample": {"cfg_scale": 2.0}}) == ("sample.cfg_scale", 4.0, 2.0)
    assert _mismatch(old, {**old, "new_key": 1}) is None  # a key the old record lacks: not a difference
    balanced = {**old, "label_mode": "balanced"}
    assert _mismatch(balanced, {**balanced, "num_samples": 16}) == ("num_samples", 8, 16)
    hashed = {**old, "inputs": {"ckpt_path": {"file": "/w/a.pt", "sha256": "aa"}}}
    assert _mismatch(hashed, {**hashed, "ckpt": "b.pt"}) is None  # with hashes the content counts, not the name
    assert _mismatch(old, {**old, "ckpt": "b.pt"}) == ("ckpt", "a.pt", "b.pt")
    # a record written by hand or by an older kit may lack "sample" or "ckpt": compared on what it has
    assert _mismatch({"seed": 0}, {**old, "seed": 0}) is None
    assert _mismatch({"seed": 0, "inputs": hashed["inputs"]}, {**hashed, "seed": 2}) == ("seed", 0, 2)

    new = {"inputs": {"ckpt_path": {"file": "/w/b.pt", "sha256": "bb"}}}
    assert _changed_input(hashed, {"inputs": {"ckpt_path": {"file": "/x.pt", "sha256": "aa"}}}, tmp_path) is None
    assert _changed_input(old, new, tmp_path) is None  # no hashes recorded: nothing to compare
    assert _changed_input(hashed, new, tmp_path) == (
        f"{tmp_path} holds samples made from ckpt_path /w/a.pt with sha256 aa; this run's /w/b.pt has sha256 bb: run "
        "with the old file to resume, or choose a new --out")

    images = tmp_path / "images"
    images.mkdir()
    model = tmp_path / "m.pt"
    model.write_bytes(b"m")
    legacy_new = {"inputs": {"ckpt_path": {"file": str(model), "sha256": "mm"}}}
    _legacy_record_check(old, legacy_new, images, tmp_path / "run.json")  # no images yet: nothing to check
    (images / "000000.png").write_bytes(b"")
    t = (images / "000000.png").stat().st_mtime
    os.utime(model, (t + 10, t + 10))
    with pytest.raises(ReproError, match=rf"^{re.escape(str(tmp_path / 'run.json'))} predates input hashes and "
                                         rf"{re.escape(str(model))} \(ckpt_path\) was modified after the first image in "
                                         rf"{re.escape(str(images))} was written, so the folder may mix two models: "
                                         r"choose a new --out \(or delete that folder to sample it again\)$"):
        _legacy_record_check(old, legacy_new, images, tmp_path / "run.json")
    _legacy_record_check(hashed, legacy_new, images, tmp_path / "run.json")  # a record with hashes: not legacy
    os.utime(model, (t - 10, t - 10))
    _legacy_record_check(old, legacy_new, images, tmp_path / "run.json")
    os.utime(model, (t, t))  # written in the same instant as the first image: not after it
    capsys.readouterr()
    _legacy_record_check(old, legacy_new, images, tmp_path / "run.json")
    assert capsys.readouterr().out == (f"note: {tmp_path / 'run.json'} predates input hashes; the input files are older "
                                       "than the folder's first image, so it is extended, and their sha256 are "
                                       "recorded from now on\n")


def test_latent_shards_pack_in_index_order_across_shards(tmp_path):
    from safetensors.torch import load_file

    from repro.sampling import latent_shards as shards

    assert shards.shard_name(1, 12) == "samples_rank01_shard012.safetensors"
    assert shards.batch_path(tmp_path, 4, 6) == tmp_path / "latent_batches" / "0000004_0000006.safetensors"
    assert shards.done_indices(tmp_path) == set()
    lat = torch.arange(5 * 2, dtype=torch.float64).view(5, 2, 1, 1)
    shards.save_batch(tmp_path, 3, lat[3:], torch.tensor([3, 4]))  # written out of order, float64 and int64
    assert shards.done_indices(tmp_path) == {3, 4}  # images 0-2 are not done because 3-4 are
    shards.save_batch(tmp_path, 0, lat[:3], torch.tensor([0, 1, 2]))
    assert shards.done_indices(tmp_path) == {0, 1, 2, 3, 4}
    part = load_file(str(shards.batch_path(tmp_path, 3, 5)))
    assert part["latents"].dtype == torch.float32 and part["labels"].dtype == torch.int32
    written = shards.pack_shards(tmp_path, 4, shard_images=3)  # images 0..3 of 5: shards of 3 and 1
    assert written == [tmp_path / shards.shard_name(0, 0), tmp_path / shards.shard_name(0, 1)]
    a, b = (load_file(str(p)) for p in written)
    torch.testing.assert_close(torch.cat([a["latents"], b["latents"]]), lat[:4].float())
    assert torch.cat([a["labels"], b["labels"]]).tolist() == [0, 1, 2, 3]
    assert len(shards.pack_shards(tmp_path, 5)) == 1  # 10,000 a shard by default
    (shards.batch_path(tmp_path, 0, 3)).unlink()
    with pytest.raises(ReproError, match=rf"^{re.escape(str(tmp_path))}: no saved latents for image 0 \(3 missing\): "
                                         r"its PNGs were sampled without --latent-shards; sample into a new --out with "
                                         r"--latent-shards$"):
        shards.pack_shards(tmp_path, 5)


def test_image_writer_defaults_counts_and_checks(tmp_path):
    import threading

    w = writer.ImageWriter()
    assert w._queue.maxsize == 2 and w._thread.name == "repro-image-writer" and w._thread.daemon
    w.close()
    assert writer.ImageWriter(max_pending=1, threaded=False)._queue.maxsize == 1
    assert writer.ImageWriter(max_pending=0, threaded=False)._queue.maxsize == 1
    done = []
    inline = writer.ImageWriter(threaded=False, on_written=done.append)
    inline.submit(_images(3), [tmp_path / f"i{j}.png" for j in range(3)])
    assert (tmp_path / "i2.png").is_file() and inline.written == 3 and done == [3]  # inline: written at once
    threaded = writer.ImageWriter(on_written=done.append)
    assert threaded._thread is not threading.current_thread() and threaded._thread.is_alive()
    for k in range(2):
        threaded.submit(_images(2, seed=k), [tmp_path / f"t{k}{j}.png" for j in range(2)])
    threaded.close()
    assert threaded.written == 4 and done == [3, 2, 2] and not threaded._thread.is_alive()
    assert np.array_equal(writer.read_png(tmp_path / "t10.png"), _images(2, seed=1)[0])
    for bad, what in ((_images(2), "uint8 (2, 8, 8, 3) for 3 paths"),
                      (_images(3).astype(np.float32), "float32 (3, 8, 8, 3) for 3 paths"),
                      (_images(3)[:, 0], "uint8 (3, 8, 3) for 3 paths")):
        w = writer.ImageWriter(lambda _x, bad=bad: bad, threaded=False)
        with pytest.raises(RuntimeError, match=rf"^decode returned {re.escape(what)}$"):
            w.submit(None, [tmp_path / f"x{j}.png" for j in range(3)])
    assert not (tmp_path / "x0.png").exists()


def test_abort_waits_for_the_batch_in_progress_through_a_ctrl_c(tmp_path):
    import signal
    import threading
    import time

    from repro.sampling.writer import ImageWriter

    started = threading.Event()

    def slow(batch):
        started.set()
        time.sleep(0.8)
        return batch

    writer = ImageWriter(decode=slow)
    images = np.zeros((2, 4, 4, 3), np.uint8)
    writer.submit(images, [tmp_path / "a.png", tmp_path / "b.png"])
    writer.submit(images, [tmp_path / "c.png", tmp_path / "d.png"])  # queued: dropped by the abort
    assert started.wait(10)

    def interrupt(*_):
        raise KeyboardInterrupt

    old = signal.signal(signal.SIGALRM, interrupt)
    try:
        signal.setitimer(signal.ITIMER_REAL, 0.2)  # a second Ctrl-C while abort waits for the batch
        writer.abort()
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, old)
    assert not writer._thread.is_alive()
    assert sorted(p.name for p in tmp_path.glob("*.png")) == ["a.png", "b.png"]  # the batch in progress, whole
    writer.close()  # the abort leaves no error behind


def test_make_grid_and_save_grid():
    import tempfile
    from pathlib import Path

    images = _images(8, size=2)
    g = grid.make_grid(images[:6])  # 2 x 4 by default; two black cells
    assert g.shape == (4, 8, 3) and g.dtype == np.uint8
    for k in range(8):
        r, c = divmod(k, 4)
        cell = g[2 * r:2 * r + 2, 2 * c:2 * c + 2]
        assert np.array_equal(cell, images[k]) if k < 6 else not cell.any()
    assert grid.make_grid(images, 4, 2).shape == (8, 4, 3) and np.array_equal(grid.make_grid(images, 4, 2)[2:4, :2],
                                                                               images[2])
    with pytest.raises(ReproError, match=r"^9 images do not fit a 2x4 grid$"):
        grid.make_grid(_images(9, size=2))
    for bad in (images[0], images[..., :2], images.astype(np.int16)):
        with pytest.raises(ReproError, match=re.escape(f"make_grid expects (N, H, W, 3) uint8 images, got {bad.dtype} "
                                                       f"{bad.shape}")):
            grid.make_grid(bad)
    with tempfile.TemporaryDirectory() as d:
        path = grid.save_grid(images[:5], Path(d) / "g.png")
        assert path == Path(d) / "g.png"
        with Image.open(path) as im:
            assert im.format == "PNG" and np.array_equal(np.asarray(im), grid.make_grid(images[:5]))
        path = grid.save_grid(images[:6], Path(d) / "h.png", rows=2, cols=3)  # rows and columns both passed on
        with Image.open(path) as im:
            assert np.array_equal(np.asarray(im), grid.make_grid(images[:6], 2, 3)) and im.size == (6, 4)


def test_oom_error_says_where_and_what_to_lower():
    from repro.sampling.engine import oom_error

    cpu = _engine_setup()
    e = oom_error(5, cpu, RuntimeError("  CUDA out of memory. Tried to allocate 2.00 GiB\nmore detail"))
    assert str(e) == ("a batch of 5 images per process does not fit in CPU RAM (CUDA out of memory. Tried to allocate "
                      "2.00 GiB): lower --batch-size (e.g. --batch-size 2)")
    assert "(MemoryError): lower --batch-size (e.g. --batch-size 1)" in str(oom_error(1, cpu, MemoryError()))
    assert f"({'x' * 160})" in str(oom_error(2, cpu, RuntimeError("x" * 300)))
    gpu = _engine_setup()
    gpu.device = torch.device("cuda")
    assert str(oom_error(8, gpu, RuntimeError("oom"))) == ("a batch of 8 images per process does not fit in GPU (oom): "
                                                          "lower --batch-size (e.g. --batch-size 4), or --precision "
                                                          "bf16/fp16")
    gpu.precision = "bf16"
    assert str(oom_error(8, gpu, RuntimeError("oom"))).endswith("lower --batch-size (e.g. --batch-size 4)")


class _Clock:
    """time.perf_counter stand-in: each call is `step` seconds after the previous one."""

    def __init__(self, step: float):
        self.now, self.step = 1000.0, step

    def perf_counter(self):
        self.now += self.step
        return self.now


def test_estimate_of_the_run_and_of_fid_50k(monkeypatch, capsys):
    from repro.sampling import run as run_mod

    setup = _engine_setup()
    where = re.escape(f"({run_mod.describe_device(setup.device)})")
    monkeypatch.setattr(run_mod, "time", _Clock(4.0))
    run_mod._estimate(setup, 1000.0, 2, 10, 1)  # 2 images in 4 s: 0.5 img/s; 10 left: 20 s; 50,000: 27.78 h
    assert re.fullmatch(r"first batch: 4\.0s for 2 image\(s\) per process -> about 20 s for this run, 27\.78 h for "
                        rf"50,000 images on 1 process\(es\) {where}\n", capsys.readouterr().out)
    monkeypatch.setattr(run_mod, "time", _Clock(100.0))
    run_mod._estimate(setup, 1000.0, 2, 10, 2, fid=False)  # 2 x 2 images in 100 s: 0.04 img/s; 10 x 2 left: 500 s
    assert re.fullmatch(r"first batch: 100\.0s for 2 image\(s\) per process -> about 8\.3 min for this run on 2 "
                        rf"process\(es\) {where}\n", capsys.readouterr().out)
    monkeypatch.setattr(run_mod, "time", _Clock(60.0))
    run_mod._estimate(setup, 1000.0, 1, 1, 1, fid=False)  # exactly 60 s left: minutes
    assert "about 1.0 min for this run" in capsys.readouterr().out
    monkeypatch.setattr(run_mod, "time", _Clock(0.5))
    run_mod._estimate(setup, 1000.0, 1, 1, 1, fid=False)  # under a second is still a time
    assert "first batch: 0.5s" in capsys.readouterr().out
    run_mod._estimate(setup, 1000.0, 0, 1, 1)  # no images, or no time: nothing to say
    monkeypatch.setattr(run_mod, "time", _Clock(0.0))
    run_mod._estimate(setup, 1000.0, 2, 1, 1)
    assert capsys.readouterr().out == ""


def test_progress_bar_only_when_asked_and_there_is_work(monkeypatch):
    from repro.sampling.run import _progress
    from repro.utils import progress

    bars = []
    monkeypatch.setattr(progress, "progress_bar", lambda **kw: bars.append(kw) or kw)
    assert _progress(0, True, 1) is None and _progress(5, False, 1) is None and bars == []
    assert _progress(1, True, 1) == dict(total=1, unit="img", desc="sampling", dynamic_ncols=True, smoothing=0.1)
    assert _progress(5, True, 2)["desc"] == "sampling (rank 0 of 2)"


def test_run_sampling_lists_labels_up_to_64_images_and_reads_fid_num(tiny_run, tmp_path, monkeypatch):
    import copy

    from repro.sampling import run as run_mod
    from repro.sampling.run import run_sampling

    cfg, _ = tiny_run
    _fast_engine(monkeypatch)
    kw = dict(progress=False, device="cpu", threaded_writer=False, batch_size=64)
    assert len(run_sampling(cfg, out_dir=str(tmp_path / "a"), num_samples=64, **kw)["labels"]) == 64
    assert run_sampling(cfg, out_dir=str(tmp_path / "a"), num_samples=65, **kw)["labels"] is None
    c = copy.deepcopy(cfg)
    c.sample.fid_num = 3
    monkeypatch.setattr(run_mod, "time", _Clock(0.0))  # a clock that does not move: no rate to show
    r = run_sampling(c, out_dir=str(tmp_path / "b"), **kw)
    assert r["num_samples"] == 3 and r["images_per_s"] is None  # no --num-samples: fid_num
    assert ": 1 NFE per image, - images/s" in r["summary"] and "at this rate" not in r["summary"]


def test_run_sampling_turns_out_of_memory_into_advice_and_stops_at_a_second_signal(tiny_run, tmp_path,
                                                                                    monkeypatch):
    import signal

    from repro.errors import Preempted
    from repro.sampling.run import run_sampling
    from repro.utils.preemption import StopNow

    cfg, _ = tiny_run
    kw = dict(progress=False, device="cpu", threaded_writer=False, batch_size=2, num_samples=6)
    _fast_engine(monkeypatch, fail_at=2, error=RuntimeError("CUDA out of memory. Tried to allocate 1 GiB\nmore"))
    with pytest.raises(ReproError, match=r"^a batch of 2 images per process does not fit in CPU RAM \(CUDA out of "
                                         r"memory. Tried to allocate 1 GiB\): lower --batch-size \(e.g. --batch-size "
                                         r"1\)$"):
        run_sampling(cfg, out_dir=str(tmp_path / "oom"), **kw)
    _fast_engine(monkeypatch, fail_at=1, error=RuntimeError("something else"))
    with pytest.raises(RuntimeError, match=r"^something else$"):
        run_sampling(cfg, out_dir=str(tmp_path / "other"), **kw)
    _fast_engine(monkeypatch, fail_at=2, error=StopNow(signal.SIGTERM))
    out = tmp_path / "now"
    (out / "images").mkdir(parents=True)
    writer.write_png(out / "images" / "000006.png", _images(1, size=2)[0])  # past this run's 6: not counted
    with pytest.raises(Preempted) as err:
        run_sampling(cfg, out_dir=str(out), **kw)
    assert err.value.signum == signal.SIGTERM and str(err.value) == (
        f"stopped at once by a second SIGTERM: 2 of 6 images are written in {out / 'images'} (queued ones were "
        "dropped); resume with the same command")


def test_a_signal_between_batches_stops_after_the_batch(tiny_run, tmp_path, monkeypatch, capfd):
    import signal

    from repro.errors import Preempted
    from repro.sampling.run import run_sampling
    from repro.utils import progress

    cfg, _ = tiny_run
    calls = _fast_engine(monkeypatch)

    class SignallingBar(_Bar):
        def update(self, n):  # outside the droppable block: the batch is kept, the loop stops before the next
            super().update(n)
            os.kill(os.getpid(), signal.SIGTERM)

    monkeypatch.setattr(progress, "progress_bar", lambda **kw: SignallingBar(**kw))
    out = tmp_path / "between"
    with pytest.raises(Preempted, match=rf"^stopped by SIGTERM: 2 of 6 images are written in "
                                        rf"{re.escape(str(out / 'images'))} "):
        run_sampling(cfg, out_dir=str(out), progress=True, device="cpu", threaded_writer=False, batch_size=2,
                     num_samples=6)
    assert calls == [2] and ("SIGTERM received: dropping the batch in flight, writing the finished images (send it "
                             "again to stop at once)") in capfd.readouterr().err


def test_run_sampling_folder_bookkeeping(tiny_run, tmp_path, monkeypatch, capsys):
    import copy

    from repro.data.extract import REPORT_NAME
    from repro.sampling.run import run_sampling
    from tests.tiny_assets import tiny_model

    cfg, files = tiny_run
    _fast_engine(monkeypatch)
    kw = dict(progress=False, device="cpu", threaded_writer=False)
    # class names recorded by step 6 beside the data; an unknown name says where the names came from
    names = [f"n{i}" for i in range(10)]
    (files["latents-stats"].parent / REPORT_NAME).write_text(json.dumps({"class_names": names}))
    r = run_sampling(cfg, out_dir=str(tmp_path / "named"), num_samples=2, labels=["n2"], batch_size="auto", **kw)
    assert r["class_names"] == names and r["labels"] == [2, 2] and r["batch_size"] == 2
    assert "batch size 2 per process (CPU: upstream's per-process batch 4)" in capsys.readouterr().out
    with pytest.raises(ReproError, match=r"^label 'zebra' is not a class name in --class-names "):
        run_sampling(cfg, out_dir=str(tmp_path / "x"), num_samples=2, labels=["zebra"], class_names=names, **kw)
    # half-written files of a killed run are removed; a run.json from before the hashes is extended
    out = tmp_path / "fid"
    run_sampling(cfg, out_dir=str(out), num_samples=4, batch_size=2, **kw)
    (out / "images" / ".000001.png.ab12.tmp.png").write_bytes(b"")
    (out / ".run.json.cd34.tmp.json").write_bytes(b"")
    record = json.loads((out / "run.json").read_text())
    del record["inputs"]
    (out / "run.json").write_text(json.dumps(record))
    capsys.readouterr()
    run_sampling(cfg, out_dir=str(out), num_samples=4, **kw)
    printed = capsys.readouterr().out
    assert "removed 2 half-written file(s) left by an interrupted run" in printed
    assert "predates input hashes; the input files are older than the folder's first image" in printed
    assert not list(out.rglob(".*.tmp*")) and "inputs" in json.loads((out / "run.json").read_text())
    # another checkpoint under the same name: refused for samples, replaced for a demo
    run_sampling(cfg, demo=True, **kw)
    torch.save({"ema": tiny_model(seed=1).state_dict()}, files["lightningdit-xl-800ep"])
    with pytest.raises(ReproError, match=rf"^{re.escape(str(out))} holds samples made from ckpt_path "):
        run_sampling(cfg, out_dir=str(out), num_samples=4, **kw)
    capsys.readouterr()
    run_sampling(cfg, demo=True, **kw)
    assert "made with other input files (sha256 differs)" in capsys.readouterr().out
    c = copy.deepcopy(cfg)
    c.sample.cfg_scale = 2.0
    run_sampling(c, demo=True, **kw)
    assert "made with sample.cfg_scale=4.0" in capsys.readouterr().out


def test_non_finite_latents_of_a_later_batch_name_their_images(tiny_run, tmp_path, monkeypatch):
    from repro.sampling import engine
    from repro.sampling.run import run_sampling

    cfg, _ = tiny_run
    calls = []

    def nan_in_batch_two(setup, noise, labels, stats=None, model=None):
        calls.append(1)
        x = torch.zeros(len(noise), *setup.latent_shape)
        return x.fill_(float("nan")) if len(calls) == 2 else x

    def strips_nan_in_batch_two(setup, noise, labels, steps, stats=None):
        calls.append(1)
        x, strips = torch.zeros(len(noise), *setup.latent_shape), torch.zeros(len(noise), 2, *setup.latent_shape)
        if len(calls) == 2:
            strips[1, 1] = float("inf")
        return x, strips

    monkeypatch.setattr(engine, "sample_latents", nan_in_batch_two)
    monkeypatch.setattr(engine, "sample_latents_with_trajectory", strips_nan_in_batch_two)
    kw = dict(progress=False, device="cpu", threaded_writer=False, batch_size=2, num_samples=6)
    with pytest.raises(ReproError, match=r"NaN/inf latents for image\(s\) 2, 3 \(fp32 transformer\)"):
        run_sampling(cfg, out_dir=str(tmp_path / "a"), **kw)
    calls.clear()
    with pytest.raises(ReproError, match=r"NaN/inf latents for image\(s\) 3 \(fp32 transformer\)"):  # its strip
        run_sampling(cfg, out_dir=str(tmp_path / "b"), trajectory=2, **kw)
