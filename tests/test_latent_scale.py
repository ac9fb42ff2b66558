"""kit (issue 23): `data.latent_scaling` global / global_means, one factor 1/sigma (SD's scaling_factor, lightdiff)
beside the per-channel statistics: its closed form, where it is computed and stored, the dataset, the
denormalisation, the run record, the default path unchanged, and the refusals."""

from __future__ import annotations

import copy
import hashlib
import json
import pathlib

import pytest
import torch

from repro.config import Config, apply_overrides, load_config
from repro.data.latents import LatentShardDataset, image_seed, shard_name, write_shard
from repro.data.stats import SCALE_NAME, STATS_NAME, read_scale_file, write_stats
from repro.data.stats_recompute import compute_global_scales, compute_stats, global_scale, recompute_stats_file
from repro.errors import ConfigError, ReproError
from repro.sampling.engine import check_inputs, denormalize, latent_scale_of, sampler_from_parts

C = 4
# sha256 of latents_stats.pt for _sample_shards(...) written by step 5 --recompute, recorded before issue 23
STATS_SHA256 = "7a95be04c99b2770a32ad8a202a4cef2481119db7c806767be6fb9d7e4a9045a"


def _sample_shards(folder: pathlib.Path, sizes=(6, 5, 4)) -> torch.Tensor:
    g = torch.Generator().manual_seed(0)
    parts = []
    for k, n in enumerate(sizes):
        lat = torch.randn(n, C, 2, 2, generator=g) * torch.arange(1, C + 1).view(1, -1, 1, 1) + 3.0
        write_shard(folder / shard_name(0, k), lat, lat.flip(-1), torch.arange(n) % 3 + k)
        parts.append(lat)
    return torch.cat(parts)


def _moment_shards(folder: pathlib.Path, n: int = 9) -> torch.Tensor:
    g = torch.Generator().manual_seed(1)
    mean = torch.randn(n, C, 2, 2, generator=g) * 2.0 + 1.0
    logvar = torch.full((n, C, 2, 2), -1.0)
    write_shard(folder / shard_name(0, 0), None, None, torch.arange(n) % 3, mean=mean, logvar=logvar,
                mean_flip=mean.flip(-1), logvar_flip=logvar)
    return mean


def test_global_factor_is_one_over_the_std_of_every_latent_element(tmp_path):
    lat = _sample_shards(tmp_path)
    record = compute_global_scales(tmp_path, subset=10000, seed=0)
    assert record["global"]["std"] == pytest.approx(float(lat.double().std()), rel=1e-12)
    assert record["global"]["scale"] == pytest.approx(1.0 / float(lat.double().std()), rel=1e-12)
    assert record["global"]["elements"] == lat.numel() and record["num_latents"] == 15
    assert "global_means" not in record and "draws" in record["unavailable"]["global_means"]  # no means stored
    # a subset: the same seeded latents as compute_stats
    part = compute_global_scales(tmp_path, subset=5, seed=3)
    picked = torch.randperm(15, generator=torch.Generator().manual_seed(3))[:5].sort().values
    assert part["global"]["std"] == pytest.approx(float(lat[picked].double().std()), rel=1e-12)


def test_means_only_variant_uses_the_posterior_means(tmp_path):
    mean = _moment_shards(tmp_path)
    record = compute_global_scales(tmp_path, subset=100, seed=0)
    assert record["global_means"]["scale"] == pytest.approx(1.0 / float(mean.double().std()), rel=1e-12)
    ds = LatentShardDataset(tmp_path, latent_norm=False)
    draws = torch.stack([ds.raw(i, generator=torch.Generator().manual_seed(image_seed(0, i)))[0] for i in range(9)])
    assert record["global"]["scale"] == pytest.approx(1.0 / float(draws.double().std()), rel=1e-12)
    assert record["global"]["scale"] != pytest.approx(record["global_means"]["scale"], rel=1e-3)


def test_dataset_scales_and_sampling_denormalises_back(tmp_path):
    lat = _sample_shards(tmp_path)
    s = compute_global_scales(tmp_path)["global"]["scale"]
    ds = LatentShardDataset(tmp_path, latent_norm=False, latent_multiplier=0.5, global_scale=s)
    x = torch.stack([ds.get(i, flip=False)[0] for i in range(len(ds))])
    torch.testing.assert_close(x, lat * s * 0.5)
    assert float((lat * s).double().std()) == pytest.approx(1.0, rel=1e-6)  # unit variance, as SD's factor
    cfg = apply_overrides(Config(), ["data.latent_norm=false", "data.latent_scaling=global", f"data.latent_scale={s}",
                                     "data.latent_multiplier=0.5", f"model.in_chans={C}", "data.image_size=32"])
    setup = sampler_from_parts(cfg, torch.nn.Identity(), device=torch.device("cpu"))
    assert setup.scale == s and setup.mean is None
    torch.testing.assert_close(denormalize(setup, x), lat)
    with pytest.raises(ReproError, match="latent_norm=False"):
        LatentShardDataset(tmp_path, latent_norm=True, global_scale=s)


def test_default_path_keeps_latents_stats_bytes_and_writes_the_factor_beside(tmp_path):
    _sample_shards(tmp_path)
    recompute_stats_file(tmp_path, C, subset=10000, seed=0)  # step 5 --recompute
    assert hashlib.sha256((tmp_path / STATS_NAME).read_bytes()).hexdigest() == STATS_SHA256
    record = read_scale_file(tmp_path / SCALE_NAME)
    assert record == json.loads((tmp_path / SCALE_NAME).read_text()) and record["global"]["scale"] > 0
    # channel scaling (the default) reads and applies exactly upstream's statistics
    cfg = Config()
    assert cfg.data.latent_scaling == "channel" and cfg.data.latent_scale is None and latent_scale_of(cfg) is None
    stats = compute_stats(tmp_path)
    write_stats(tmp_path / "again.pt", stats, backup=False)
    assert (tmp_path / "again.pt").read_bytes() == (tmp_path / STATS_NAME).read_bytes()


def test_on_demand_factor_is_cached_and_recomputed_for_other_shards(tmp_path):
    lat = _sample_shards(tmp_path)
    notes = []
    s = global_scale(tmp_path, "global", note=notes.append)
    assert s == pytest.approx(1.0 / float(lat.double().std()), rel=1e-12) and (tmp_path / SCALE_NAME).is_file()
    record = read_scale_file(tmp_path / SCALE_NAME)
    record["global"]["scale"] = 2.5  # the cache is what is read while it describes the same shards
    (tmp_path / SCALE_NAME).write_text(json.dumps(record))
    assert global_scale(tmp_path, "global") == 2.5
    extra = torch.ones(2, C, 2, 2)
    write_shard(tmp_path / shard_name(0, 3), extra, extra, torch.zeros(2))
    assert global_scale(tmp_path, "global") == pytest.approx(1.0 / float(torch.cat([lat, extra]).double().std()))
    with pytest.raises(ReproError, match="no 'global_means' factor.*--store moments"):
        global_scale(tmp_path, "global_means")


@pytest.mark.parametrize("sets, key", [
    (["data.latent_scaling=global"], "data.latent_norm"),  # the kit's default latent_norm is true
    (["data.latent_scaling=global_means", "data.latent_norm=true"], "data.latent_norm"),
    (["data.latent_scale=0.2"], "data.latent_scale"),  # channel never uses it
    (["data.latent_scaling=global", "data.latent_norm=false", "data.latent_scale=0"], "data.latent_scale"),
    (["data.latent_scaling=global", "data.latent_norm=false", "data.latent_scale=-1.5"], "data.latent_scale"),
    (["data.latent_scaling=globl", "data.latent_norm=false"], "data.latent_scaling"),
])
def test_contradictions_are_refused(sets, key):
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        apply_overrides(Config(), sets)


def test_sampling_needs_the_factor_not_the_statistics(tmp_path):
    base = ["data.latent_norm=false", "data.latent_scaling=global", f"data.data_path={tmp_path}"]
    cfg = apply_overrides(Config(), base)
    with pytest.raises(ReproError, match="latents_scale.json does not exist"):
        latent_scale_of(cfg)
    _sample_shards(tmp_path)
    global_scale(tmp_path, "global")
    assert latent_scale_of(cfg) == read_scale_file(tmp_path / SCALE_NAME)["global"]["scale"]
    assert latent_scale_of(apply_overrides(copy.deepcopy(cfg), ["data.latent_scale=0.3"])) == 0.3
    with pytest.raises(ReproError, match="latent_scale is null"):
        sampler_from_parts(cfg, torch.nn.Identity(), device=torch.device("cpu"))


def test_training_records_the_factor_and_sampling_uses_it(tmp_path):
    from steps.step7_train import main as train_main
    from tests.test_training import make_latents
    from tests.tiny_assets import write_tiny_assets

    data = make_latents(tmp_path / "latents", stats=False)  # no latents_stats.pt: global scaling needs none
    result = train_main("configs/train/tiny_stage_0.yaml", set=[
        f"data.data_path={data}", f"train.output_dir={tmp_path / 'out'}", "data.latent_norm=false",
        "data.latent_scaling=global", "train.max_steps=2", "train.ckpt_every=2", "train.log_every=1"])
    s = read_scale_file(data / SCALE_NAME)["global"]["scale"]
    run_cfg = load_config(pathlib.Path(result["run_dir"]) / "config.yaml")
    assert run_cfg.data.latent_scaling == "global" and run_cfg.data.latent_scale == s
    # the run's config samples without the shards or statistics: the factor travels with it
    from repro.sampling.engine import build_sampler

    assets = write_tiny_assets(tmp_path / "assets")
    (tmp_path / "empty").mkdir()
    sample_cfg = apply_overrides(run_cfg, [f"ckpt_path={result['checkpoint']}", f"data.data_path={tmp_path / 'empty'}",
                                           f"vae.ckpt_path={assets['vavae-f16d32']}"])
    check_inputs(sample_cfg)
    setup = build_sampler(sample_cfg, device="cpu", compile=False)
    assert setup.scale == s and setup.mean is None
