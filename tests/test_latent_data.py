"""Latent shards reader, latents_stats.pt validation / computation, and step 5's verdicts and repairs."""

from __future__ import annotations

import pathlib
import pickle

import pytest
import torch

from repro.data.latents import LatentShardDataset, load_latent_stats, shard_name, write_shard
from repro.data.stats import validate_stats, write_stats
from repro.data.stats_recompute import compute_stats
from repro.errors import ConfigError, ReproError
from steps import step5_fix_stats

C = 4


def _write_shards(folder: pathlib.Path, sizes=(6, 5, 4), channels: int = C, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    all_lat = []
    for k, n in enumerate(sizes):
        lat = torch.randn(n, channels, 2, 2, generator=g) * torch.arange(1, channels + 1).view(1, -1, 1, 1) + 3.0
        write_shard(folder / shard_name(0, k), lat, lat.flip(-1), torch.arange(n) % 3 + k)
        all_lat.append(lat)
    return torch.cat(all_lat)


def _config(tmp_path: pathlib.Path, data_path, in_chans: int = C) -> pathlib.Path:
    cfg = tmp_path / "cfg.yaml"
    cfg.write_text(f"data:\n  data_path: {data_path}\n  stats_subset: 10000\nmodel:\n  in_chans: {in_chans}\n")
    return cfg


# -- shards and the dataset -------------------------------------------------------------------


def test_shard_name_is_upstream():
    assert shard_name(0, 0) == "latents_rank00_shard000.safetensors"
    assert shard_name(3, 12) == "latents_rank03_shard012.safetensors"


def test_dataset_reads_normalises_and_flips(tmp_path):
    lat = _write_shards(tmp_path)
    write_stats(tmp_path / "latents_stats.pt", compute_stats(tmp_path), backup=False)
    (tmp_path / ".latents_rank00_shard003.safetensors.x.tmp.safetensors").write_bytes(b"half-written")
    ds = LatentShardDataset(tmp_path, latent_multiplier=0.5)
    mean, std = load_latent_stats(tmp_path / "latents_stats.pt", C)
    assert len(ds) == 15 and ds.channels == C and ds.latent_size == 2 and ds.num_classes_seen == 5
    x, y = ds[7]  # shard 1, row 1
    torch.testing.assert_close(x, ((lat[7:8] - mean) / std * 0.5)[0])
    assert y == 1 % 3 + 1 and isinstance(y, int)
    xf, _ = ds.get(7, flip=True)
    torch.testing.assert_close(xf, ((lat[7:8].flip(-1) - mean) / std * 0.5)[0])
    assert ds.labels.tolist()[:6] == [0, 1, 2, 0, 1, 2]
    raw = LatentShardDataset(tmp_path, latent_norm=False)
    assert torch.equal(raw[-1][0], lat[-1])
    with pytest.raises(IndexError):
        raw.get(15, flip=False)


def test_shards_sort_numerically_past_999(tmp_path):
    for k in (999, 1000, 101):
        write_shard(tmp_path / shard_name(0, k), torch.full((1, C, 2, 2), float(k)), torch.zeros(1, C, 2, 2),
                    torch.tensor([k]))
    ds = LatentShardDataset(tmp_path, latent_norm=False)
    assert [ds[i][1] for i in range(3)] == [101, 999, 1000]


def test_empty_folder_explains_upstream_torch_cat(tmp_path):
    with pytest.raises(ReproError) as e:
        LatentShardDataset(tmp_path)
    msg = str(e.value)
    assert str(tmp_path) in msg and "torch.cat(): expected a non-empty list of Tensors" in msg
    assert "step6_extract" in msg and "data.data_path" in msg


def test_mixed_channels_missing_key_and_missing_stats(tmp_path):
    a, b, c = (tmp_path / n for n in "abc")
    for d in (a, b, c):
        d.mkdir()
    _write_shards(a, sizes=(2,), channels=4)
    write_shard(a / shard_name(0, 1), torch.zeros(2, 8, 2, 2), torch.zeros(2, 8, 2, 2), torch.zeros(2))
    with pytest.raises(ReproError, match=r"4 vs 8 channels"):
        LatentShardDataset(a, latent_norm=False)
    from safetensors.torch import save_file

    save_file({"latents": torch.zeros(2, C, 2, 2), "labels": torch.zeros(2, dtype=torch.int64)},
              str(b / shard_name(0, 0)))
    with pytest.raises(ReproError, match=r"latents_rank00_shard000.safetensors lacks key\(s\) 'latents_flip'"):
        LatentShardDataset(b, latent_norm=False)
    _write_shards(c)
    with pytest.raises(ReproError, match=r"latents_stats.pt not found.*run step 5"):
        LatentShardDataset(c)


def test_moment_shards_sample_with_generator(tmp_path):
    mean, logvar = torch.randn(3, C, 2, 2), torch.full((3, C, 2, 2), -2.0)
    write_shard(tmp_path / shard_name(0, 0), None, None, torch.tensor([0, 1, 2]), mean=mean, logvar=logvar,
                mean_flip=mean.flip(-1), logvar_flip=logvar)
    ds = LatentShardDataset(tmp_path, latent_norm=False)
    x = ds.get(1, flip=False, generator=torch.Generator().manual_seed(3))[0]
    noise = torch.randn(C, 2, 2, generator=torch.Generator().manual_seed(3))
    torch.testing.assert_close(x, mean[1] + torch.exp(torch.tensor(-1.0)) * noise)


# -- statistics -------------------------------------------------------------------------------


def test_compute_stats_is_upstream_formula_on_a_seeded_subset(tmp_path):
    lat = _write_shards(tmp_path)
    full = compute_stats(tmp_path, subset=10000)
    torch.testing.assert_close(full["mean"], lat.mean(dim=[0, 2, 3], keepdim=True))
    torch.testing.assert_close(full["std"], lat.std(dim=[0, 2, 3], keepdim=True))  # Bessel, as upstream
    assert full["mean"].dtype == torch.float32 and full["std"].shape == (1, C, 1, 1)
    s1, s1b, s2 = compute_stats(tmp_path, 6, seed=1), compute_stats(tmp_path, 6, seed=1), compute_stats(tmp_path, 6, seed=2)
    assert torch.equal(s1["mean"], s1b["mean"]) and not torch.equal(s1["mean"], s2["mean"])
    subset = lat[torch.randperm(len(lat), generator=torch.Generator().manual_seed(1))[:6]]  # the documented draw
    torch.testing.assert_close(s1["mean"], subset.mean(dim=[0, 2, 3], keepdim=True))
    torch.testing.assert_close(s1["std"], subset.std(dim=[0, 2, 3], keepdim=True))
    chunked = compute_stats(tmp_path, subset=10000, chunk=4)  # chunk merging agrees with one pass
    torch.testing.assert_close(chunked["std"], full["std"])


class _WouldTouch:
    """Unpickling this calls pathlib.Path.touch(marker): the code a weights-only load must refuse."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (pathlib.Path.touch, (pathlib.Path(self.marker),))


def _bad_files(folder: pathlib.Path, marker: pathlib.Path) -> dict[str, tuple[pathlib.Path, str]]:
    good = {"mean": torch.zeros(1, C, 1, 1), "std": torch.ones(1, C, 1, 1)}
    cases = {
        "empty dict": ({}, "lacks key"),
        "wrong shape": ({"mean": torch.zeros(C), "std": torch.ones(C)}, "shape"),
        "nan": (dict(good, mean=torch.full((1, C, 1, 1), float("nan"))), "not finite"),
        "zero std": (dict(good, std=torch.zeros(1, C, 1, 1)), "<= 0"),
        "wrong channels": ({"mean": torch.zeros(1, 16, 1, 1), "std": torch.ones(1, 16, 1, 1)}, "16 channels"),
        "pickle with code": (dict(good, extra=_WouldTouch(marker)), "weights-only load refuses"),
    }
    out = {}
    for name, (obj, reason) in cases.items():
        d = folder / name.replace(" ", "_")
        d.mkdir()
        torch.save(obj, d / "latents_stats.pt")
        out[name] = (d, reason)
    return out


def test_validate_stats_rejects_each_bad_file(tmp_path):
    marker = tmp_path / "code_ran"
    for name, (d, reason) in _bad_files(tmp_path, marker).items():
        verdict = validate_stats(d / "latents_stats.pt", C)
        assert not verdict.ok and reason in verdict.reason, (name, verdict.reason)
    assert not marker.exists()
    (tmp_path / "garbage.pt").write_bytes(b"\x00not a torch file")
    assert "not a readable torch file" in validate_stats(tmp_path / "garbage.pt", C).reason
    assert "does not exist" in validate_stats(tmp_path / "nope.pt", C).reason
    # the pickle is real: a full (unsafe) unpickle would run it
    probe = tmp_path / "probe"
    pickle.loads(pickle.dumps(_WouldTouch(probe)))
    assert probe.exists()


def test_step5_verdicts_and_recompute_with_backup(tmp_path, capsys):
    marker = tmp_path / "code_ran"
    for name, (d, reason) in _bad_files(tmp_path, marker).items():
        lat = _write_shards(d)
        cfg = _config(d, d)
        broken = (d / "latents_stats.pt").read_bytes()
        result = step5_fix_stats.main(str(cfg))
        assert not result["verdict"].ok and result["action"] == "none" and reason in capsys.readouterr().out
        result = step5_fix_stats.main(str(cfg), recompute=True)
        assert result["verdict"].ok and result["action"].startswith("recomputed"), name
        baks = list(d.glob("latents_stats.pt.bak-*"))
        assert len(baks) == 1 and baks[0].read_bytes() == broken
        stats = torch.load(d / "latents_stats.pt", weights_only=True)
        torch.testing.assert_close(stats["std"], lat.std(dim=[0, 2, 3], keepdim=True))
    assert not marker.exists()


def test_step5_cli_exit_code_and_ok_file(tmp_path, capsys):
    _write_shards(tmp_path)
    cfg = _config(tmp_path, tmp_path)
    with pytest.raises(SystemExit) as e:
        step5_fix_stats.cli(["--config", str(cfg)])
    assert e.value.code == 1 and "--recompute" in capsys.readouterr().out
    assert step5_fix_stats.cli(["--config", str(cfg), "--recompute"])["verdict"].ok
    assert step5_fix_stats.cli(["--config", str(cfg)])["action"] == "none"
    assert "channels" in step5_fix_stats.main(str(cfg), set=["model.in_chans=32"])["verdict"].reason


def test_step5_no_stats_no_shards_message(tmp_path, capsys):
    cfg = _config(tmp_path, tmp_path / "empty")
    result = step5_fix_stats.main(str(cfg))
    out = capsys.readouterr().out
    assert not result["verdict"].ok
    assert "torch.cat(): expected a non-empty list of Tensors" in out and "--refetch" in out and "step6_extract" in out
    with pytest.raises(ReproError, match=r"torch\.cat.*--refetch.*step6_extract"):
        step5_fix_stats.main(str(cfg), recompute=True)


def test_step5_unresolved_data_path_says_run_step3(tmp_path):
    cfg = _config(tmp_path, "asset:latents-stats")
    with pytest.raises(ConfigError, match="step 3"):
        step5_fix_stats.main(str(cfg))
    with pytest.raises(ConfigError, match="not both"):
        step5_fix_stats.main(str(cfg), recompute=True, refetch=True)


def test_write_stats_refuses_bad_statistics(tmp_path):
    with pytest.raises(ReproError, match="refusing"):
        write_stats(tmp_path / "latents_stats.pt", {"mean": torch.zeros(1, C, 1, 1), "std": torch.zeros(1, C, 1, 1)})
    assert not (tmp_path / "latents_stats.pt").exists()


def test_step5_refetch_from_a_local_hub_keeps_a_backup(tmp_path, monkeypatch):
    import io

    from tests.fakehub import FakeHub

    buf = io.BytesIO()
    torch.save({"mean": torch.randn(1, 32, 1, 1), "std": torch.rand(1, 32, 1, 1) + 0.5}, buf)
    official = buf.getvalue()
    data = tmp_path / "data"
    data.mkdir()
    torch.save({"mean": torch.zeros(1, 32, 1, 1), "std": torch.zeros(1, 32, 1, 1)}, data / "latents_stats.pt")
    broken = (data / "latents_stats.pt").read_bytes()
    with FakeHub.for_assets({"latents-stats": official}) as hub:
        monkeypatch.setenv("HF_ENDPOINT", hub.endpoint)
        result = step5_fix_stats.main(str(_config(tmp_path, data, in_chans=32)), refetch=True)
    assert result["verdict"].ok and result["action"].startswith("refetched")
    assert (data / "latents_stats.pt").read_bytes() == official
    assert [p.read_bytes() for p in data.glob("latents_stats.pt.bak-*")] == [broken]
