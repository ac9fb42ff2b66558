"""Checkpoint loader: official layouts, prefixes, safetensors, and every kind of bad file."""

from __future__ import annotations

import pickle

import pytest
import torch
from safetensors.torch import save_file

from repro.errors import CheckpointError
from repro.models.checkpoint import load_checkpoint, read_state_dict
from repro.models.lightningdit import create_model

KW = dict(input_size=4, in_channels=4, num_classes=10, use_swiglu=True, use_rope=True, use_rmsnorm=True)


def tiny(seed=0):
    torch.manual_seed(seed)
    m = create_model("LightningDiT-T/1", **KW)
    for p in m.parameters():
        if p.requires_grad:
            torch.nn.init.normal_(p, std=0.05)
    return m


def same(a, b):
    return all(torch.equal(a.state_dict()[k], b.state_dict()[k]) for k in a.state_dict())


def test_module_prefixes_are_stripped(tmp_path):
    src = tiny(1)
    sd = {f"module._orig_mod.{k}": v for k, v in src.state_dict().items()}
    torch.save({"model": sd}, tmp_path / "ddp.pt")
    dst = tiny(2)
    info = load_checkpoint(dst, tmp_path / "ddp.pt")
    assert info["source"] == "model" and same(src, dst)


def test_ema_preferred_over_model(tmp_path):
    ema, raw = tiny(1), tiny(2)
    torch.save({"model": raw.state_dict(), "ema": ema.state_dict(), "opt": {"step": 3}, "steps": 5},
               tmp_path / "train.pt")
    dst = tiny(3)
    assert load_checkpoint(dst, tmp_path / "train.pt")["source"] == "ema"
    assert same(ema, dst)
    load_checkpoint(dst, tmp_path / "train.pt", prefer="model")
    assert same(raw, dst)


def test_bare_state_dict_and_safetensors(tmp_path):
    src = tiny(1)
    torch.save(src.state_dict(), tmp_path / "bare.pt")
    save_file({k: v.contiguous() for k, v in src.state_dict().items()}, str(tmp_path / "w.safetensors"))
    for name in ("bare.pt", "w.safetensors"):
        dst = tiny(2)
        load_checkpoint(dst, tmp_path / name)
        assert same(src, dst)


def test_truncated_file(tmp_path):
    torch.save({"ema": tiny(1).state_dict()}, tmp_path / "full.pt")
    data = (tmp_path / "full.pt").read_bytes()
    (tmp_path / "cut.pt").write_bytes(data[: len(data) // 2])
    (tmp_path / "cut.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{\"a\":")
    for name in ("cut.pt", "cut.safetensors"):
        with pytest.raises(CheckpointError, match=name):
            load_checkpoint(tiny(), tmp_path / name)


def test_wrong_shape_names_the_key(tmp_path):
    other = create_model("LightningDiT-T/1", **{**KW, "in_channels": 8})
    torch.save({"ema": other.state_dict()}, tmp_path / "wrong.pt")
    with pytest.raises(CheckpointError, match=r"x_embedder\.proj\.weight.*\(64, 8, 1, 1\).*\(64, 4, 1, 1\)"):
        load_checkpoint(tiny(), tmp_path / "wrong.pt")


def test_missing_and_unexpected_keys_named(tmp_path):
    sd = tiny(1).state_dict()
    sd.pop("final_layer.linear.bias")
    sd["extra.weight"] = torch.zeros(1)
    torch.save(sd, tmp_path / "keys.pt")
    with pytest.raises(CheckpointError, match=r"missing key\(s\): final_layer\.linear\.bias.*unexpected key\(s\): extra\.weight"):
        load_checkpoint(tiny(), tmp_path / "keys.pt")


class _Evil:
    def __reduce__(self):
        import pathlib

        return (pathlib.Path.touch, (pathlib.Path(_Evil.marker),))


def test_pickle_that_runs_code_is_refused(tmp_path):
    _Evil.marker = str(tmp_path / "pwned")
    torch.save({"ema": tiny().state_dict(), "payload": _Evil()}, tmp_path / "evil.pt")
    assert not (tmp_path / "pwned").exists()
    with pytest.raises(CheckpointError, match="evil.pt.*not executed"):
        read_state_dict(tmp_path / "evil.pt")
    with open(tmp_path / "raw.pkl", "wb") as f:
        pickle.dump(_Evil(), f)
    with pytest.raises(CheckpointError):
        read_state_dict(tmp_path / "raw.pkl")
    assert not (tmp_path / "pwned").exists()


def test_missing_file_says_what_to_do(tmp_path):
    with pytest.raises(CheckpointError, match="step2_download"):
        load_checkpoint(tiny(), tmp_path / "nope.pt")


def _fake_lightning_metadata(monkeypatch):
    """A class pickled as omegaconf.dictconfig.DictConfig, as a Lightning checkpoint's hyper-parameters are."""
    import sys
    import types

    module = types.ModuleType("omegaconf.dictconfig")

    class DictConfig:
        def __init__(self, content):
            self.content = content

    DictConfig.__module__ = "omegaconf.dictconfig"
    DictConfig.__qualname__ = "DictConfig"
    module.DictConfig = DictConfig
    monkeypatch.setitem(sys.modules, "omegaconf", types.ModuleType("omegaconf"))
    monkeypatch.setitem(sys.modules, "omegaconf.dictconfig", module)
    return DictConfig


def test_framework_metadata_read_as_placeholders_only_when_asked(tmp_path, monkeypatch):
    import pathlib
    import sys

    DictConfig = _fake_lightning_metadata(monkeypatch)
    src = tiny(1)
    ckpt = {"state_dict": src.state_dict(), "hyper_parameters": DictConfig({"lr": 1e-4}),
            "callbacks": {"ModelCheckpoint": {"dirpath": pathlib.PurePosixPath("/ckpt")}}}
    torch.save(ckpt, tmp_path / "lightning.ckpt")
    monkeypatch.delitem(sys.modules, "omegaconf.dictconfig")  # the loader must not need the real package
    with pytest.raises(CheckpointError, match="lightning.ckpt.*refuses"):
        read_state_dict(tmp_path / "lightning.ckpt")
    sd = read_state_dict(tmp_path / "lightning.ckpt", metadata_placeholders=True)
    dst = tiny(2)
    dst.load_state_dict(sd, strict=True)
    assert same(src, dst)


def test_placeholders_never_admit_callables(tmp_path):
    _Evil.marker = str(tmp_path / "pwned")
    torch.save({"state_dict": tiny().state_dict(), "payload": _Evil()}, tmp_path / "evil.ckpt")
    with pytest.raises(CheckpointError, match="evil.ckpt.*refuses.*not executed"):
        read_state_dict(tmp_path / "evil.ckpt", metadata_placeholders=True)
    assert not (tmp_path / "pwned").exists()
