"""One config builder for every typed config (repro.config_builder): the LightningDiT `Config` and the
tokenizer's `TokenizerConfig` build, coerce, override and save the same way, lists included, and step 3
parses a file once."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal, Optional

import pytest
import yaml

import repro.config
from repro.config import Config, apply_overrides, config_to_yaml, load_config, save_config
from repro.config_builder import ConfigBuilder
from repro.errors import ConfigError
from repro.setup.resolve import resolve_file
from repro.tokenizer_training.config import TokenizerConfig, load_tokenizer_config, save_tokenizer_config
from tests.conftest import PROJECT_ROOT


@dataclass
class _Shape:
    sizes: list[int] = field(default_factory=lambda: [1, 2])
    names: list[str] = field(default_factory=list)
    scales: Optional[list[float]] = None
    mode: Literal["fast", "slow"] = "fast"
    steps: Optional[int] = None


@dataclass
class _Run:
    lr: float = 1e-3
    resume: bool = True


@dataclass
class _Schema:
    name: str = "x"
    shape: _Shape = field(default_factory=_Shape)
    run: _Run = field(default_factory=_Run)


def _check(cfg: _Schema) -> _Schema:
    if cfg.run.lr < 0:
        raise ConfigError(f"test config key 'run.lr' must be >= 0, got {cfg.run.lr}")
    return cfg


BUILDER = ConfigBuilder(_Schema, "test config", check=_check, example="run.lr=0.1")


def test_values_are_coerced_to_the_declared_types_lists_included():
    cfg = BUILDER.from_dict({"shape": {"sizes": (4, 8), "names": ["a", "b"], "scales": [1, "1e-6", 0.5],
                                       "mode": "slow", "steps": None}, "run": {"lr": 2, "resume": False}})
    assert cfg.shape.sizes == [4, 8] and cfg.shape.names == ["a", "b"] and cfg.shape.mode == "slow"
    assert cfg.shape.scales == [1.0, 1e-6, 0.5] and all(type(s) is float for s in cfg.shape.scales)
    assert type(cfg.run.lr) is float and cfg.run.resume is False and cfg.shape.steps is None
    assert BUILDER.from_dict({}) == _Schema() and BUILDER.from_dict({"shape": None}) == _Schema()


@pytest.mark.parametrize("raw,message", [
    ({"shape": {"sizes": [1, "two"]}}, r"^test config key 'shape.sizes\[1\]': expected int, got 'two' \(str\)$"),
    ({"shape": {"sizes": [1, True]}}, r"'shape.sizes\[1\]': expected int, got True \(bool\)"),
    ({"shape": {"sizes": 3}}, r"'shape.sizes': expected a list of int, got 3 \(int\)"),
    ({"shape": {"names": ["a", 2]}}, r"'shape.names\[1\]': expected str, got 2 \(int\)"),
    ({"shape": {"scales": "many"}}, r"'shape.scales': expected a list of float or null, got 'many' \(str\)"),
    ({"shape": {"mode": "slwo"}}, r"'shape.mode': expected 'fast' or 'slow', got 'slwo'; did you mean 'slow'\?"),
    ({"run": {"resume": "yes"}}, r"'run.resume': expected bool, got 'yes' \(str\)"),
    ({"shape": {"sizez": [1]}}, r"^unknown test config key 'shape.sizez'; did you mean 'shape.sizes'\?$"),
    ({"shape": {"zzz": 1}}, r"unknown test config key 'shape.zzz'; valid keys: shape.mode, shape.names, "),
    ({"lr": 0.1}, r"^unknown test config key 'lr'; did you mean 'run.lr'\?$"),  # a section key at the top level
    ({"run": [1]}, r"^test config section 'run' must be a mapping, got \[1\]$"),
])
def test_wrong_types_and_unknown_keys_name_the_key_the_value_and_the_expected_type(raw, message):
    with pytest.raises(ConfigError, match=message):
        BUILDER.from_dict(raw)


def test_overrides_are_typed_yaml_values_and_all_or_nothing():
    cfg = BUILDER.from_dict({})
    assert BUILDER.apply_overrides(cfg, ["shape.sizes=[3, 5]", "shape.names=[a, 'b c']", "run.lr=1e-4",
                                         "shape.steps=7", "name="]) is cfg
    assert (cfg.shape.sizes, cfg.shape.names, cfg.run.lr, cfg.shape.steps, cfg.name) == ([3, 5], ["a", "b c"], 1e-4, 7, "")
    before = BUILDER.from_dict({})
    for overrides, message in ((["shape.sizes=[1]", "shape.sizes=[x]"], r"'shape.sizes\[0\]': expected int, got 'x'"),
                               (["shape.steps=3", "run.lr=-1"], r"'run.lr' must be >= 0"),  # checked after all
                               (["shape.sizs=[1]"], r"'shape.sizs'; did you mean 'shape.sizes'\? \(override "),
                               (["shape=1"], r"'shape' is a section; set one of its keys"),
                               (["name.x=1"], r"'name' is a value, not a section"),
                               (["run.lr"], r"must look like section.key=value \(e.g. run.lr=0.1\)")):
        cfg = BUILDER.from_dict({})
        with pytest.raises(ConfigError, match=message):
            BUILDER.apply_overrides(cfg, overrides)
        assert cfg == before  # nothing applied
    fresh = BUILDER.from_dict({})
    assert BUILDER.with_overrides(fresh, ["run.lr=0.5"]).run.lr == 0.5 and fresh.run.lr == 1e-3


def test_save_writes_a_header_atomically_and_loads_back(tmp_path):
    cfg = BUILDER.from_dict({"shape": {"sizes": [2, 4], "names": ["a"]}})
    path = BUILDER.save(cfg, tmp_path / "sub" / "c.yaml", header=["made here", "", "second"])
    text = path.read_text()
    assert text.startswith("# made here\n#\n# second\nname: x\nshape:\n  sizes:\n  - 2\n  - 4\n")
    assert [p.name for p in path.parent.iterdir()] == ["c.yaml"]  # no temp file left behind
    assert BUILDER.from_dict(yaml.safe_load(text)) == cfg and BUILDER.to_dict(cfg)["shape"]["names"] == ["a"]


def test_both_configs_use_the_one_builder_with_lists_and_the_same_messages(tmp_path):
    # LightningDiT config: the builder coerces lists for its fields as for the tokenizer's
    assert repro.config.BUILDER.coerce(["a", "b"], list[str], "x.names") == ["a", "b"]
    with pytest.raises(ConfigError, match=r"^config key 'x.sizes\[0\]': expected int, got 'a' \(str\)$"):
        repro.config.BUILDER.coerce(["a"], list[int], "x.sizes")
    tok = load_tokenizer_config("tokenizer/digits_f4", ["model.attn_resolutions=[4, 8]", "model.ch_mult=[1, 2, 2]"])
    assert tok.model.attn_resolutions == [4, 8] and tok.model.ch_mult == [1, 2, 2]
    with pytest.raises(ConfigError, match=r"digits_f4.yaml: tokenizer config key 'model.attn_resolutions\[1\]': "
                                          r"expected int, got 'x' \(str\)$"):
        load_tokenizer_config("tokenizer/digits_f4", ["model.attn_resolutions=[4, x]"])
    # the same override errors, label apart
    for load, override, label in ((load_config, "sample.cfg_scal=4", "config"),
                                  (load_tokenizer_config, "train.max_step=4", "tokenizer config")):
        with pytest.raises(ConfigError, match=rf"^unknown {label} key '\w+\.\w+'; did you mean '\w+\.\w+'\? "
                                              rf"\(override '{override}'\)$"):
            load(None, [override])
        with pytest.raises(ConfigError, match=rf"^{label} key 'train.resume': expected bool, got 'maybe' \(str\)$"):
            load(None, ["train.resume=maybe"])
    # overrides go to the typed config in both: all or nothing, checked after every override
    cfg = Config()
    with pytest.raises(ConfigError, match="sample.num_sampling_steps"):
        apply_overrides(cfg, ["sample.cfg_scale=4", "sample.num_sampling_steps=0"])
    assert cfg.sample.cfg_scale == 1.0
    # to_dict and the YAML both write through the builder, as before
    assert Config().to_dict() == repro.config.BUILDER.to_dict(Config())
    assert config_to_yaml(Config(), "h") == "# h\n" + yaml.safe_dump(Config().to_dict(), sort_keys=False)
    out = save_tokenizer_config(tok, tmp_path / "tok.yaml", header="h")
    assert load_tokenizer_config(out) == tok and isinstance(tok, TokenizerConfig)
    assert load_config(save_config(load_config("tiny"), tmp_path / "dit.yaml", header="h")) == load_config("tiny")


def test_step3_parses_a_file_once_and_builds_one_config(monkeypatch):
    reads: list[str] = []
    read = repro.config.read_config_file

    def counting(path):
        reads.append(str(path))
        return read(path)

    monkeypatch.setattr(repro.config, "read_config_file", counting)
    built: list[type] = []
    build = ConfigBuilder.build

    def counting_build(self, cls, raw, prefix=""):
        built.append(cls)
        return build(self, cls, raw, prefix)

    monkeypatch.setattr(ConfigBuilder, "build", counting_build)
    preset = PROJECT_ROOT / "configs/tiny.yaml"
    cfg, changes, path = resolve_file(preset, ["sample.cfg_scale=2.5", "sample.num_sampling_steps=10"], profile="cpu")
    assert reads == [str(preset)] and built.count(Config) == 1
    assert cfg.sample.cfg_scale == 2.5 and path == preset
    assert "sample.cfg_scale: 4.0 -> 2.5 (--set)" in changes and "sample.num_sampling_steps: 8 -> 10 (--set)" in changes
