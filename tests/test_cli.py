"""The steps' command lines: one `--config` / `--set` shape, `--help` ending with the example commands,
step 3's old `--base` spelling, and the tail every step shares (repro.utils.cli.run_step)."""

from __future__ import annotations

import importlib
import os
import subprocess
import sys

import pytest

from repro.errors import ConfigError, ReproError
from repro.utils.cli import example_commands, run_step
from steps import step3_configs, step5_fix_stats
from tests.conftest import PROJECT_ROOT

STEPS = ["step1_install", "step2_download", "step3_configs", "step4_inference", "step5_fix_stats", "step6_extract",
         "step7_train", "step8_evaluate", "step9_train_tokenizer", "step10_evaluate_tokenizer", "step11_export"]
WITH_CONFIG = ["step3_configs", "step4_inference", "step5_fix_stats", "step6_extract", "step7_train",
               "step9_train_tokenizer", "step10_evaluate_tokenizer"]  # the steps that take --config and --set


def step(name: str):
    return importlib.import_module(f"steps.{name}")


@pytest.mark.parametrize("name", WITH_CONFIG)
def test_set_accumulates_in_every_step(name):
    """`--set a=1 --set b=2 c=3` keeps all three (steps 5 and 6 used to keep only the last --set)."""
    args = step(name).build_parser().parse_args(["--config", "C", "--set", "a=1", "--set", "b=2", "c=3"])
    assert args.config == "C" and args.set == ["a=1", "b=2", "c=3"]
    assert step(name).build_parser().parse_args(["--config", "C"]).set == []


def test_steps_5_and_6_pass_every_set_to_the_config(tmp_path, capsys):
    """Step 5 end to end: both overrides reach the config and its repair advice repeats the command line."""
    empty = tmp_path / "latents"
    empty.mkdir()
    argv = ["--config", str(PROJECT_ROOT / "configs" / "tiny.yaml"), "--set", f"data.data_path={empty}",
            "--set", "data.stats_subset=8"]
    with pytest.raises(SystemExit) as stop:
        step5_fix_stats.cli(argv)
    assert stop.value.code == 1
    err = capsys.readouterr().err
    assert f"error: {empty / 'latents_stats.pt'} is not usable" in err
    assert f"--set data.data_path={empty} --set data.stats_subset=8 --refetch" in err
    args = step("step6_extract").build_parser().parse_args(["--config", "C", "--set", "vae.ch=64",
                                                            "--set", "data.image_size=32", "--source", "imgs"])
    assert args.set == ["vae.ch=64", "data.image_size=32"] and args.source == ["imgs"]


def test_step3_takes_config_and_its_old_name_base(tmp_path):
    parser = step3_configs.build_parser()
    assert parser.parse_args(["--config", "tiny"]).config == parser.parse_args(["--base", "tiny"]).config == "tiny"
    written = {}
    for flag in ("--config", "--base"):
        out = tmp_path / f"{flag.strip('-')}.yaml"
        step3_configs.cli([flag, "tiny", "--profile", "cpu", "--out", str(out), "--set", "sample.cfg_scale=2.5",
                           "--set", "sample.num_sampling_steps=7"])
        written[flag] = out.read_text().replace(str(out), "OUT")
    assert written["--config"] == written["--base"] and "cfg_scale: 2.5" in written["--base"]
    # main(): the new keyword, the old one (notebooks and tests call main(base=...)), and positionally
    by_config = step3_configs.main(config="tiny", profile="cpu", dry_run=True)["config"]
    assert step3_configs.main(base="tiny", profile="cpu", dry_run=True)["config"] == by_config
    assert step3_configs.main("tiny", profile="cpu", dry_run=True)["config"] == by_config
    for both_or_neither in ({"config": "tiny", "base": "tiny"}, {}):
        with pytest.raises(ConfigError, match="step 3 takes one preset"):
            step3_configs.main(dry_run=True, **both_or_neither)


@pytest.mark.parametrize("name", STEPS)
def test_every_steps_help_ends_with_its_example_commands(name):
    module = step(name)
    examples = example_commands(module.__doc__).splitlines()
    commands = [line for line in examples if line.strip().startswith(("python -m", "torchrun"))]
    assert commands and all(f"-m steps.{name}" in line for line in commands), examples
    help_lines = module.build_parser().format_help().rstrip("\n").splitlines()
    assert help_lines[-len(examples) - 1:] == ["examples:", *examples]


def test_help_on_the_command_line_ends_with_the_examples():
    env = dict(os.environ, PYTHONPATH=str(PROJECT_ROOT))
    proc = subprocess.run([sys.executable, "-m", "steps.step6_extract", "--help"], cwd=PROJECT_ROOT, env=env,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.rstrip("\n").endswith(example_commands(step("step6_extract").__doc__))


def test_example_commands_are_the_indented_paragraphs():
    doc = """Step N: one line.

Prose that explains,
  --flag  an indented option line inside prose stays prose

    python -m steps.stepN --config C \\\\
        --set a=1
    # notebook:  main("C")

More prose.
"""
    assert example_commands(doc) == '    python -m steps.stepN --config C \\\\\n        --set a=1\n    # notebook:  main("C")'


def test_run_step_prints_the_closing_line_and_turns_a_kit_error_into_exit_1(capsys):
    assert run_step(lambda: {"step": 3}, finish=lambda r: f"done: step {r['step']}") == {"step": 3}
    assert capsys.readouterr().out == "done: step 3\n"

    def refuse(result: dict) -> None:
        raise ReproError(f"step {result['step']} is not usable: run it again with --fix")

    with pytest.raises(SystemExit) as stop:
        run_step(lambda: {"step": 3}, finish=refuse)
    assert stop.value.code == 1
    assert capsys.readouterr().err == "error: step 3 is not usable: run it again with --fix\n"
    with pytest.raises(SystemExit) as stop:
        run_step(lambda: (_ for _ in ()).throw(ConfigError("configs/x.yaml: bad")), finish=refuse)
    assert stop.value.code == 1 and capsys.readouterr().err == "error: configs/x.yaml: bad\n"
