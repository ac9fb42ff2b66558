"""train.strategy=fsdp (FSDP2) with 2 gloo processes on the CPU: the single-file checkpoint format, the
DDP run's weights and EMA within 1e-4 relative, resume DDP -> FSDP and FSDP -> DDP (also onto another
world size), the EMA sharded, one-process FSDP with host-memory offload, and step 3's memory plan.

One torchrun runs three trainings (tests/fsdp_runs.py) so the suite pays one start-up for them.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from repro.config import load_config
from repro.errors import ConfigError
from repro.models.checkpoint import load_checkpoint
from repro.models.lightningdit import build_model
from repro.training import list_checkpoints
from repro.training.strategy import make_strategy
from steps.step7_train import main
from tests.conftest import PROJECT_ROOT
from tests.test_training import STAGE0, make_latents

EXP = "tiny_two_stage"


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> tuple[Path, Path]:
    data = make_latents(tmp_path_factory.mktemp("latents"))
    out = tmp_path_factory.mktemp("runs")
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(PROJECT_ROOT))
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
           "-m", "tests.fsdp_runs", str(out), str(data)]
    proc = subprocess.run(cmd, cwd=PROJECT_ROOT, env=env, capture_output=True, text=True, timeout=420)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    (out / "stdout.txt").write_text(proc.stdout)
    return out, data


def newest(run: Path) -> dict:
    path = list_checkpoints(run / EXP / "checkpoints")[-1][1]
    return torch.load(path, map_location="cpu", weights_only=True)


def assert_close_rel(a: dict, b: dict, rel: float = 1e-4, what: str = "") -> None:
    """Same keys in the same order; every tensor within `rel` of b (relative to its norm)."""
    assert list(a) == list(b), what
    for k in a:
        x, y = a[k].double(), b[k].double()
        assert x.shape == y.shape, f"{what} {k}"
        scale = y.norm().item()
        err = (x - y).norm().item()
        assert err <= rel * scale or err == 0.0, f"{what} {k}: relative difference {err / max(scale, 1e-30):.2e}"


def assert_same_optimizer_layout_and_close(a: dict, b: dict) -> None:
    assert a["param_groups"] == b["param_groups"]  # same hyper-parameters and parameter indices
    assert sorted(a["state"]) == sorted(b["state"])
    for i in a["state"]:
        assert_close_rel(a["state"][i], b["state"][i], what=f"opt state {i}")


def test_fsdp_writes_the_ddp_format_and_ends_within_1e4_of_ddp(runs):
    out, _ = runs
    ddp, fsdp = newest(out / "A"), newest(out / "B")
    assert ddp["step"] == fsdp["step"] == 6
    assert ddp.keys() == fsdp.keys()
    assert (ddp["kit"]["strategy"], fsdp["kit"]["strategy"]) == ("ddp", "fsdp")
    assert_close_rel(fsdp["model"], ddp["model"], what="model")
    assert_close_rel(fsdp["ema"], ddp["ema"], what="ema")
    assert_same_optimizer_layout_and_close(fsdp["opt"], ddp["opt"])
    # step 4's strict loader takes the FSDP checkpoint as it takes any other
    model = build_model(load_config(STAGE0).model, 4, 4)
    assert load_checkpoint(model, list_checkpoints(out / "B" / EXP / "checkpoints")[-1][1])["source"] == "ema"
    log = (out / "stdout.txt").read_text()
    assert "strategy fsdp (FSDP2, each of 2 process(es) holds 1/2" in log
    assert (out / "B" / EXP / "samples" / "0000006.png").stat().st_size > 100  # the EMA gathered for a grid
    assert "written in the background; the step loop waited" in log


def test_a_ddp_run_resumes_under_fsdp(runs):
    out, _ = runs
    log = (out / "stdout.txt").read_text()
    assert f"resumed from {out / 'C' / EXP / 'checkpoints' / '0000003.pt'} at step 3" in log
    resumed, ddp = newest(out / "C"), newest(out / "A")
    assert resumed["kit"]["strategy"] == "fsdp" and resumed["step"] == 6
    assert_close_rel(resumed["model"], ddp["model"], what="model")
    assert_close_rel(resumed["ema"], ddp["ema"], what="ema")
    assert_same_optimizer_layout_and_close(resumed["opt"], ddp["opt"])


def test_an_fsdp_run_resumes_under_ddp_on_one_process(runs, tmp_path):
    out, data = runs
    shutil.copytree(out / "B", tmp_path / "D")
    (tmp_path / "D" / EXP / "checkpoints" / "0000006.pt").unlink()  # killed after its step-3 checkpoint
    result = main(STAGE0, set=[f"data.data_path={data}", f"train.output_dir={tmp_path / 'D'}", "train.max_steps=6",
                               "train.micro_batch_size=4", "train.ckpt_every=3", "train.log_every=3"])
    assert "x 1 process(es) x 4 accumulation" in result["batch_plan"]
    resumed, ddp = newest(tmp_path / "D"), newest(out / "A")
    assert resumed["kit"]["world_size"] == 1 and resumed["kit"]["strategy"] == "ddp"
    assert_close_rel(resumed["model"], ddp["model"], what="model")
    assert_close_rel(resumed["ema"], ddp["ema"], what="ema")


def test_the_ema_is_sharded_and_gathers_whole(runs):
    ranks = json.loads((runs[0] / "report.json").read_text())["ranks"]
    total = ranks[0]["params"]
    assert sum(r["ema_local"] for r in ranks) == total  # each process holds its share, not a replica
    assert all(r["ema_local"] < 0.6 * total for r in ranks)
    assert ranks[0]["ema_equals_model"] and ranks[0]["ema_keys"]  # gathered on rank 0, model key order
    assert ranks[1]["ema_equals_model"] is None  # nothing gathered on the other ranks


def test_one_process_fsdp_with_host_offload_matches_ddp(runs, tmp_path):
    out, data = runs
    result = main(STAGE0, set=[f"data.data_path={data}", f"train.output_dir={tmp_path}", "train.max_steps=3",
                               "train.micro_batch_size=4", "train.ckpt_every=3", "train.log_every=3",
                               "train.strategy=fsdp", "train.fsdp_offload=true", "train.async_save=false"])
    assert result["step"] == 3 and not torch.distributed.is_initialized()  # its own group, ended again
    ddp3 = torch.load(out / "A" / EXP / "checkpoints" / "0000003.pt", map_location="cpu", weights_only=True)
    one = torch.load(result["checkpoint"], map_location="cpu", weights_only=True)
    assert_close_rel(one["model"], ddp3["model"], what="model")
    assert_close_rel(one["ema"], ddp3["ema"], what="ema")


def test_bad_strategy_settings_are_named():
    cfg = load_config(STAGE0, ["train.fsdp_offload=true"])
    with pytest.raises(ConfigError, match="train.fsdp_offload=true needs train.strategy=fsdp"):
        make_strategy(cfg.train, torch.device("cpu"), 1)
    with pytest.raises(ConfigError, match="train.strategy"):
        load_config(STAGE0, ["train.strategy=zero3"])


def test_the_memory_plan_knows_the_strategy():
    from repro.config import ModelConfig
    from repro.models.cost import training_memory_budget
    from repro.setup.envinfo import fsdp_recommendation

    big = ModelConfig(model_type="LightningDiT-1p0B/1", use_checkpoint=True)
    kw = dict(block_saved=2**20)  # the activations are the same under both; only the state differs
    ddp = training_memory_budget(big, 16, 8, "bf16", True, **kw)
    two = training_memory_budget(big, 16, 8, "bf16", True, shards=2, **kw)
    eight = training_memory_budget(big, 16, 8, "bf16", True, shards=8, **kw)
    offload = training_memory_budget(big, 16, 8, "bf16", True, offload=True, **kw)
    assert offload.total < eight.total < two.total < ddp.total
    assert any("FSDP gathered" in name for name, _ in two.items)
    with torch.device("meta"):
        static = 20 * sum(p.numel() for p in build_model(big, 16, 1000).parameters())  # weights, grads, AdamW, EMA
    assert 0.4 * static < ddp.total - two.total < 0.5 * static  # half the state, less the gathered blocks
    old = {"train_micro_batch_size": 32, "train_batch_reason": "16 GiB"}
    assert fsdp_recommendation(old)["train_micro_batch_size"] == 32  # an older env.json: the DDP plan, said so
    assert "no FSDP plan" in fsdp_recommendation(old)["train_batch_reason"]
    new = dict(old, train_fsdp={"train_micro_batch_size": 64, "train_batch_reason": "FSDP"})
    assert fsdp_recommendation(new)["train_micro_batch_size"] == 64
