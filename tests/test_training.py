"""Step 7 training: learning, exact resume after SIGKILL, torchrun (gloo) vs accumulation, time budget,
stage 0 -> stage 1, checkpoints readable the upstream way, bad inputs, FLOP/memory accounting, and
notebooks/02_train.ipynb under papermill.

Bitwise resume runs in subprocesses with OMP_NUM_THREADS=1 and `train.deterministic` (the tiny
configs set it): a CPU kernel's reduction order depends on how many threads split it, so both runs
must use the same count, and deterministic algorithms rule out the few kernels that are not
run-to-run repeatable. Everything random in a step comes from (seed, step, sample) generators.
"""

from __future__ import annotations

import json
import os
import random
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from repro.config import load_config
from repro.data.latents import shard_name, write_shard
from repro.data.stats import write_stats
from repro.data.stats_recompute import compute_stats
from repro.errors import ConfigError, ReproError
from repro.models.checkpoint import load_checkpoint
from repro.models.lightningdit import build_model
from repro.paths import runs_dir
from repro.training import DataOrder, build_micro_batch, list_checkpoints, plan_batches
from repro.models.cost import forward_flops, training_memory_budget
from repro.training.ema import EMA
from steps.step7_train import main
from tests.conftest import PROJECT_ROOT

STAGE0 = "configs/train/tiny_stage_0.yaml"
STAGE1 = "configs/train/tiny_stage_1.yaml"


def make_latents(folder: Path, channels: int = 32, size: int = 4, per_shard: int = 32, shards: int = 2,
                 classes: int = 4, seed: int = 0, stats: bool = True) -> Path:
    """Learnable latents: one prototype per class plus a little noise, in upstream shards + stats."""
    g = torch.Generator().manual_seed(seed)
    protos = torch.randn(classes, channels, size, size, generator=g) * 2 + 1
    for k in range(shards):
        labels = torch.arange(per_shard) % classes
        lat = protos[labels] + 0.1 * torch.randn(per_shard, channels, size, size, generator=g)
        write_shard(folder / shard_name(0, k), lat, lat.flip(-1), labels)
    if stats:
        write_stats(folder / "latents_stats.pt", compute_stats(folder, subset=64), backup=False)
    return folder


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def latents(tmp_path_factory) -> Path:
    return make_latents(tmp_path_factory.mktemp("latents"))


def overrides(data: Path, out: Path, *extra: str) -> list[str]:
    return [f"data.data_path={data}", f"train.output_dir={out}", *extra]


def ckpts(out: Path, exp: str = "tiny_two_stage") -> list[Path]:
    return [p for _, p in list_checkpoints(out / exp / "checkpoints")]  # numbered files, not temp files


def load(path: Path) -> dict:
    return torch.load(path, map_location="cpu", weights_only=True)


def assert_same_tensors(a: dict, b: dict, exact: bool = True, atol: float = 0.0) -> None:
    assert a.keys() == b.keys()
    for k in a:
        if exact:
            assert torch.equal(a[k], b[k]), f"{k} differs (max {(a[k] - b[k]).abs().max()})"
        else:
            torch.testing.assert_close(a[k], b[k], rtol=0, atol=atol, msg=f"{k} differs")


def step7(args: list[str], **kw) -> subprocess.Popen:
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(PROJECT_ROOT))
    return subprocess.Popen([sys.executable, "-m", "steps.step7_train", *args], cwd=PROJECT_ROOT, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, **kw)


# ---------------------------------------------------------------------------------------------
# the pieces


def test_batch_plan_is_exact_or_refused():
    cfg = load_config(STAGE0).train
    plan = plan_batches(cfg, world_size=1)
    assert (plan.micro_batch, plan.accum_steps) == (8, 2)
    assert plan.describe() == "global batch 16 = micro-batch 8 x 1 process(es) x 2 accumulation step(s)"
    two = plan_batches(load_config(STAGE0, ["train.micro_batch_size=4"]).train, world_size=2)
    assert two.micro_slices(1) == [(8, 12), (12, 16)]  # rank 1 owns the second half, 2 micro-batches
    auto = plan_batches(load_config(STAGE0, ["train.micro_batch_size=null"]).train, 1, fits=lambda m: m <= 5)
    assert (auto.micro_batch, auto.accum_steps) == (4, 4)
    with pytest.raises(ConfigError, match=r"train.micro_batch_size=6 .* 16 / \(6 x 1\)"):
        plan_batches(load_config(STAGE0, ["train.micro_batch_size=6"]).train, 1)
    with pytest.raises(ConfigError, match=r"train.global_batch_size=16 cannot be split over 3 processes"):
        plan_batches(cfg, 3)


def test_data_order_and_randomness_do_not_depend_on_the_split(latents):
    from repro.data.latents import LatentShardDataset

    ds = LatentShardDataset(latents)
    order = DataOrder(len(ds), 16, seed=0)
    first, pos = order.peek(order.position)
    seen = [first]
    for _ in range(3):
        idx, pos = order.peek(pos)
        seen.append(idx)
    assert sorted(torch.cat(seen).tolist()) == list(range(64))  # one epoch = a permutation
    nxt, pos5 = order.peek(pos)
    assert pos5.epoch == 1 and not torch.equal(nxt, seen[0])
    kw = dict(seed=0, lognorm=True, dropout_prob=0.5, null_class=4)
    whole = build_micro_batch(ds, first, 7, 0, **kw)
    halves = [build_micro_batch(ds, first[lo:lo + 8], 7, lo, **kw) for lo in (0, 8)]
    for key in ("x1", "y", "t", "x0"):
        assert torch.equal(getattr(whole, key), torch.cat([getattr(h, key) for h in halves]))
    assert (whole.y == 4).any() and (whole.y < 4).any()  # some labels dropped to the null class
    with pytest.raises(ReproError, match="fewer than train.global_batch_size=128"):
        DataOrder(len(ds), 128, seed=0, data_dir=str(latents))


def test_ema_update_is_upstreams_arithmetic():
    model = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.Linear(4, 2))
    ema = EMA(model, decay=0.9)
    ref = {k: v.clone() for k, v in model.state_dict().items()}
    with torch.no_grad():
        for p in model.parameters():
            p.add_(1.0)
    ema.update()
    for k, v in model.state_dict().items():  # upstream update_ema: ema.mul_(d).add_(p, alpha=1 - d)
        assert torch.equal(ema.state_dict()[k], ref[k].mul_(0.9).add_(v, alpha=1 - 0.9))


def test_host_memory_ema_is_the_same_arithmetic_off_the_training_thread():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(64, 64), torch.nn.Linear(64, 8))
    direct, staged = EMA(model, decay=0.9), EMA(model, decay=0.9, on_cpu=True)
    for _ in range(5):
        with torch.no_grad():
            for p in model.parameters():
                p.add_(torch.randn_like(p))  # the model moves on while the worker applies the last update
        direct.update()
        staged.update()
    assert staged._future is not None  # still pending: state_dict() waits for it
    assert all(torch.equal(staged.state_dict()[k], v) for k, v in direct.state_dict().items())
    staged.load_state_dict(direct.state_dict())  # waits for nothing pending, then loads strictly


def test_a_checkpoint_the_disk_cannot_hold_is_refused_before_writing(tmp_path):
    """A full disk is a clear error naming the folder, the fix and the last good checkpoint; nothing is written."""
    import shutil

    from repro.errors import CheckpointError
    from repro.training.checkpoints import ensure_room, save_training_checkpoint, tensor_bytes

    state = {"w": torch.zeros(10, 10), "nested": [{"m": torch.zeros(5, dtype=torch.float16)}], "n": 3}
    assert tensor_bytes(state) == 400 + 10
    too_big = shutil.disk_usage(tmp_path).free + 10**12  # larger than this disk's free space, measured now
    good = tmp_path / "ckpts" / "0000010.pt"
    with pytest.raises(CheckpointError, match=r"checkpoint of ~\d+\.\d GB does not fit in .*ckpts \(.* free\).*"
                                              r"train\.keep_last \(now 3.*0000010\.pt"):
        ensure_room(tmp_path / "ckpts", too_big, 3, good)
    ensure_room(tmp_path / "ckpts", 10**6, 3, good)  # a megabyte fits
    path = save_training_checkpoint(tmp_path / "ckpts" / "0000020.pt",
                                    {"model": {"w": torch.ones(3)}, "ema": {"w": torch.ones(3)}, "opt": {},
                                     "config": {}, "scaler": {}, "step": 20, "data_order": {}, "rng": [], "kit": {}})
    assert [p.name for p in (tmp_path / "ckpts").iterdir()] == [path.name]


def test_a_disk_that_fills_during_the_write_is_the_same_clear_error(small_disk):
    from repro.errors import CheckpointError
    from repro.training.checkpoints import save_training_checkpoint

    good = small_disk / "ckpts" / "0000010.pt"
    big_config = {"notes": "x" * (90 * 2**20)}  # not a tensor: the pre-write estimate misses it, the disk does not
    with pytest.raises(CheckpointError, match=r"does not fit in .*ckpts .*train\.keep_last \(now 2.*0000010\.pt"):
        save_training_checkpoint(small_disk / "ckpts" / "0000020.pt",
                                 {"model": {}, "ema": {}, "opt": {}, "config": big_config, "scaler": {}, "step": 20,
                                  "data_order": {}, "rng": [], "kit": {}}, keep_last=2, last_good=good)
    assert list((small_disk / "ckpts").iterdir()) == []  # the temp file is gone, nothing half-written


def test_flops_match_the_flop_counter_and_xl_fits_16gb():
    from torch.utils.flop_counter import FlopCounterMode

    cfg = load_config(STAGE0)
    with torch.device("meta"):
        model = build_model(cfg.model, 4, 4)
        with FlopCounterMode(display=False) as counter:
            model(torch.randn(1, 32, 4, 4), torch.rand(1), torch.zeros(1, dtype=torch.long))
    assert forward_flops(cfg.model, 4, 4) == counter.get_total_flops()
    xl = load_config("configs/train/lightningdit_xl_800ep_stage_0.yaml").model
    assert 230e9 < forward_flops(xl, 16) < 245e9  # 675M params, of which 223M adaLN act once per image
    budget = training_memory_budget(xl, 16, 8, "fp16", checkpointing=True)
    assert budget.total / 2**30 < 15.0, budget.table()
    no_ckpt = training_memory_budget(xl, 16, 8, "fp16", checkpointing=False)
    assert no_ckpt.total > budget.total + 4 * 2**30


# ---------------------------------------------------------------------------------------------
# training runs


def test_training_lowers_the_loss(latents, tmp_path):
    result = main(STAGE0, set=overrides(latents, tmp_path, "train.max_steps=300", "train.log_every=25",
                                        "train.ckpt_every=1000", "optimizer.lr=0.002"))
    rows = [json.loads(line) for line in (Path(result["run_dir"]) / "log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == list(range(25, 301, 25))
    assert rows[-1]["loss"] < 0.4 * rows[0]["loss"], [r["loss"] for r in rows]
    assert result["step"] == 300 and result["stopped"] == "max_steps" and result["loss"] < 1.5
    assert (Path(result["run_dir"]) / "loss.png").stat().st_size > 1000
    state = load(Path(result["checkpoint"]))  # upstream layout and keys, weights_only
    assert Path(result["checkpoint"]) == tmp_path / "tiny_two_stage" / "checkpoints" / "0000300.pt"
    assert {"model", "ema", "opt", "config", "scaler", "step", "data_order", "rng"} <= state.keys()
    assert state["config"]["train"]["max_steps"] == 300 and state["step"] == 300
    cfg = load_config(STAGE0)
    model = build_model(cfg.model, 4, 4)
    assert load_checkpoint(model, result["checkpoint"])["source"] == "ema"
    model.load_state_dict(state["model"], strict=True)  # what upstream's resume does with 'model'


def test_exact_resume_after_sigkill(latents, tmp_path):
    seed = int(os.environ.get("REPRO_TEST_SEED", random.randrange(10_000)))
    kill_after = random.Random(seed).randrange(10, 60)
    steps = 150
    args = ["--config", STAGE0, "--set", *overrides(latents, tmp_path / "ref", f"train.max_steps={steps}",
                                                   "train.ckpt_every=5", "train.log_every=5")]
    ref = step7(args)
    out, _ = ref.communicate(timeout=300)
    assert ref.returncode == 0, out

    args[args.index(f"train.output_dir={tmp_path / 'ref'}")] = f"train.output_dir={tmp_path / 'cut'}"
    run = step7(args)
    deadline = time.time() + 300
    while time.time() < deadline:
        done = [p for p in ckpts(tmp_path / "cut") if int(p.stem) >= kill_after]
        if done or run.poll() is not None:
            break
        time.sleep(0.005)
    assert run.poll() is None, f"run ended before the kill (seed {seed}); output:\n{run.communicate()[0]}"
    run.send_signal(signal.SIGKILL)
    run.communicate()
    left = ckpts(tmp_path / "cut")
    assert left and int(left[-1].stem) < steps, f"seed {seed}"
    # a newest checkpoint that was only half written (e.g. copied by hand) is skipped with a note
    newest = left[-1]
    newest.write_bytes(newest.read_bytes()[:200])
    again = step7(args)
    out, _ = again.communicate(timeout=300)
    assert again.returncode == 0, out
    assert f"note: skipping checkpoint {newest}" in out, out
    assert f"resumed from {left[-2]}" in out, out

    a, b = load(ckpts(tmp_path / "ref")[-1]), load(ckpts(tmp_path / "cut")[-1])
    assert a["step"] == b["step"] == steps
    assert_same_tensors(a["model"], b["model"])  # bitwise
    assert_same_tensors(a["ema"], b["ema"])
    for pid, st in a["opt"]["state"].items():
        assert_same_tensors(st, b["opt"]["state"][pid])
    rows = [json.loads(x)["step"] for x in (tmp_path / "cut" / "tiny_two_stage" / "log.jsonl").read_text().splitlines()]
    assert rows == list(range(5, steps + 1, 5))  # each step logged once, torn lines dropped


def test_two_processes_match_one_with_twice_the_accumulation(latents, tmp_path):
    common = ["train.micro_batch_size=4", "train.max_steps=6", "train.ckpt_every=6", "train.log_every=3"]
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(PROJECT_ROOT))
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
           "-m", "steps.step7_train", "--config", STAGE0, "--set", *overrides(latents, tmp_path / "two", *common)]
    proc = subprocess.run(cmd, cwd=PROJECT_ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "micro-batch 4 x 2 process(es) x 2 accumulation step(s)" in proc.stdout
    # the EMA kept in host memory and updated on a worker thread: the same values as on the device
    one = main(STAGE0, set=overrides(latents, tmp_path / "one", *common, "train.ema_on_cpu=true"))
    assert "x 1 process(es) x 4 accumulation" in one["batch_plan"]
    a, b = load(ckpts(tmp_path / "two")[-1]), load(Path(one["checkpoint"]))
    assert a["kit"]["world_size"] == 2 and len(a["rng"]) == 2
    assert_same_tensors(a["model"], b["model"], exact=False, atol=1e-6)
    assert_same_tensors(a["ema"], b["ema"], exact=False, atol=1e-6)


def test_time_budget_saves_and_exits_cleanly(latents, tmp_path):
    args = ["--config", STAGE0, "--time-budget", "15", "--set",
            *overrides(latents, tmp_path, "train.max_steps=1000000", "train.ckpt_every=1000000", "train.log_every=50")]
    proc = step7(args)
    out, _ = proc.communicate(timeout=300)
    assert proc.returncode == 0, out
    assert "time budget of 15s nearly used" in out and "(time_budget)" in out, out
    saved = ckpts(tmp_path)
    assert len(saved) == 1 and load(saved[0])["step"] == int(saved[0].stem) > 0
    again = main(STAGE0, set=overrides(latents, tmp_path, "train.max_steps=1000000", "train.ckpt_every=1000000"),
                 time_budget=2.0)
    assert again["stopped"] == "time_budget" and again["step"] >= int(saved[0].stem)


def test_stage_1_continues_stage_0(latents, tmp_path, capsys):
    s0 = main(STAGE0, set=overrides(latents, tmp_path, "train.max_steps=20"))
    assert s0["step"] == 20
    s1 = main(STAGE1, set=overrides(latents, tmp_path, "train.max_steps=30"))
    out = capsys.readouterr().out
    assert f"resumed from {s0['checkpoint']} at step 20" in out
    assert "transport.use_lognorm: True -> False" in out
    assert s1["step"] == 30 and s1["run_dir"] == s0["run_dir"]
    state = load(Path(s1["checkpoint"]))
    assert state["config"]["transport"]["use_lognorm"] is False and state["step"] == 30
    # stage 1 in a fresh folder, started from stage 0's checkpoint with train.ckpt: the same run
    other = main(STAGE1, set=overrides(latents, tmp_path, "train.max_steps=30", "train.exp_name=elsewhere",
                                       f"train.ckpt={s0['checkpoint']}"))
    assert other["step"] == 30 and "initialised from train.ckpt" in capsys.readouterr().out
    twin = load(Path(other["checkpoint"]))
    assert_same_tensors(state["model"], twin["model"])
    assert_same_tensors(state["ema"], twin["ema"])


def test_ema_sample_grid_without_a_vae_says_so_once(latents, tmp_path, capsys):
    main(STAGE0, set=overrides(latents, tmp_path, "train.max_steps=4", "train.sample_every=2",
                               "sample.num_sampling_steps=4", "train.sample_num=4"))
    out = capsys.readouterr().out
    assert out.count("vae.ckpt_path is not set, so sample grids show latent channels") == 1
    grids = sorted((tmp_path / "tiny_two_stage" / "samples").glob("*.png"))
    assert [p.name for p in grids] == ["0000002.png", "0000004.png"]
    # an EMA held in host memory is swapped into the model for the grid: the same pixels
    main(STAGE0, set=overrides(latents, tmp_path / "host", "train.max_steps=4", "train.sample_every=2",
                               "sample.num_sampling_steps=4", "train.sample_num=4", "train.ema_on_cpu=true"))
    host = sorted((tmp_path / "host" / "tiny_two_stage" / "samples").glob("*.png"))
    assert [p.read_bytes() for p in host] == [p.read_bytes() for p in grids]


# ---------------------------------------------------------------------------------------------
# bad input: one clear message each, nothing lost


def test_bad_inputs_are_named(tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(ReproError, match=f"latent folder {empty} holds no \\*.safetensors latent shards"):
        main(STAGE0, set=overrides(empty, tmp_path / "r"))
    narrow = make_latents(tmp_path / "c16", channels=16)
    with pytest.raises(ReproError, match=f"latent shards in {narrow} have 16 channels but model.in_chans is 32"):
        main(STAGE0, set=overrides(narrow, tmp_path / "r"))
    nostats = make_latents(tmp_path / "nostats", stats=False)
    with pytest.raises(ReproError, match=f"latent statistics {nostats / 'latents_stats.pt'} not found"):
        main(STAGE0, set=overrides(nostats, tmp_path / "r"))
    # runs:REL is a folder under the runs folder, as in every step (issue 12), not a marker to refuse
    with pytest.raises(ReproError, match=f"latent folder {runs_dir().resolve() / 'tiny' / 'latents'} does not exist"):
        main(STAGE0)
    assert not (tmp_path / "r").exists()


def test_non_finite_loss_stops_with_the_step_and_keeps_the_last_good_checkpoint(latents, tmp_path):
    main(STAGE0, set=overrides(latents, tmp_path, "train.max_steps=10"))
    args = ["--config", STAGE0, "--set",
            *overrides(latents, tmp_path, "train.max_steps=30", "optimizer.lr=1e30", "train.log_every=100")]
    proc = step7(args)
    out, _ = proc.communicate(timeout=300)
    assert proc.returncode == 1, out
    found = re.search(r"error: non-finite loss \(NaN/inf\) at step (\d+)", out)
    assert found and 10 < int(found.group(1)) <= 20, out  # a step after the resume, before the next save
    assert f"the last good checkpoint is {tmp_path / 'tiny_two_stage' / 'checkpoints' / '0000010.pt'}" in out
    assert [p.name for p in ckpts(tmp_path)] == ["0000010.pt"]


# ---------------------------------------------------------------------------------------------
# GPU: fp16 with a scaler, fused AdamW, EMA kept on the CPU


@pytest.mark.gpu
def test_fp16_fused_adamw_cpu_ema_on_gpu(latents, tmp_path):
    result = main(STAGE0, set=overrides(latents, tmp_path, "train.max_steps=20", "train.precision=fp16",
                                        "train.ema_on_cpu=true", "model.use_checkpoint=true",
                                        "train.sample_every=10", "sample.num_sampling_steps=4",
                                        "train.deterministic=false"))
    state = load(Path(result["checkpoint"]))
    assert result["precision"] == "fp16" and state["scaler"]["scale"] > 0
    assert all(torch.isfinite(v).all() for v in state["ema"].values())


# ---------------------------------------------------------------------------------------------
# the notebook


def test_notebook_runs_under_papermill(tmp_path, python3_kernel):
    import papermill

    out = tmp_path / "02_train.out.ipynb"
    papermill.execute_notebook(str(PROJECT_ROOT / "notebooks" / "02_train.ipynb"), str(out),
                               parameters={"workdir": str(tmp_path / "work"), "stage0_steps": 20,
                                           "stage1_steps": 30, "grid_steps": 4},
                               cwd=str(PROJECT_ROOT), kernel_name=python3_kernel, progress_bar=False)
    run_dir = tmp_path / "work" / "runs" / "tiny_two_stage"  # the work folder's runs/
    assert (run_dir / "ema_grid.png").is_file()
    assert sorted(p.name for p in (run_dir / "checkpoints").glob("*.pt"))[-1] == "0000030.pt"
    # the executed notebook shows the loss plot and the EMA grid inline (the grid file's own bytes)
    import base64

    import nbformat

    shown = [base64.b64decode(o["data"]["image/png"]) for c in nbformat.read(out, as_version=4).cells
             if c.cell_type == "code" for o in c.get("outputs", []) if "image/png" in o.get("data", {})]
    assert (run_dir / "ema_grid.png").read_bytes() in shown and (run_dir / "loss.png").read_bytes() in shown


# ---------------------------------------------------------------------------------------------
# What the trainer does with label dropout, train.ema_decay and the VA-VAE (issue 17)


def _embedding_inputs():
    """Record every label batch that reaches an embedding table (LightningDiT has one: the labels')."""
    seen: list[torch.Tensor] = []

    def hook(module, args, output):
        if isinstance(module, torch.nn.Embedding):
            seen.append(args[0].detach().clone())
    return seen, torch.nn.modules.module.register_module_forward_hook(hook)


def test_the_trainer_trains_the_null_label_at_the_configured_rate(latents, tmp_path):
    for p in (0.3, 0.0):
        seen, handle = _embedding_inputs()
        try:
            main(STAGE0, set=overrides(latents, tmp_path / str(p), "train.max_steps=20", "train.ckpt_every=1000",
                                       f"model.class_dropout_prob={p}"))
        finally:
            handle.remove()
        labels = torch.cat(seen)
        assert len(labels) == 20 * 16  # every sample of every step went through the label table once
        dropped = int((labels == 4).sum())
        if p == 0.0:
            assert dropped == 0 and set(labels.tolist()) == {0, 1, 2, 3}
        else:  # Binomial(320, 0.3): mean 96, sd 8.2; seeded, and well inside 4 sd
            assert abs(dropped - 96) < 4 * 8.2, dropped


def test_the_trainer_updates_the_ema_with_train_ema_decay(latents, tmp_path):
    result = main(STAGE0, set=overrides(latents, tmp_path, "train.max_steps=2", "train.ckpt_every=1",
                                        "train.ema_decay=0.75"))
    first, second = (load(p) for p in ckpts(tmp_path))
    assert (first["step"], second["step"]) == (1, 2) and result["step"] == 2
    for key, ema in second["ema"].items():  # ema_2 = d * ema_1 + (1 - d) * model_2, upstream's update_ema
        expected = first["ema"][key] * 0.75 + second["model"][key] * 0.25
        torch.testing.assert_close(ema, expected, rtol=1e-6, atol=1e-7, msg=key)
    moved = [k for k in second["model"] if not torch.equal(first["model"][k], second["model"][k])]
    assert len(moved) > 10  # the check above is not vacuous: the step changed the weights


def test_ema_grids_decode_with_the_vae_like_the_final_grid(latents, tmp_path, capsys):
    from safetensors.torch import save_file

    from repro.tokenizer.vavae import AutoencoderKL
    from repro.training.grids import grid_from_checkpoint, write_square_grid

    torch.manual_seed(0)
    save_file(AutoencoderKL(ch=32).state_dict(), str(tmp_path / "vae.safetensors"))
    sets = overrides(latents, tmp_path, "train.max_steps=2", "train.sample_every=2", "train.ckpt_every=2",
                     "sample.num_sampling_steps=4", "train.sample_num=4", f"vae.ckpt_path={tmp_path / 'vae.safetensors'}")
    result = main(STAGE0, set=sets)
    assert "latent channels" not in capsys.readouterr().out
    grid = tmp_path / "tiny_two_stage" / "samples" / "0000002.png"
    # the same EMA weights from the checkpoint file through the final-grid path (which always decodes)
    final = grid_from_checkpoint(load_config(STAGE0, sets), result["checkpoint"], tmp_path / "final.png", n=4)
    assert final["images"].shape == (4, 64, 64, 3)
    write_square_grid(final["images"], tmp_path / "again.png")
    assert grid.read_bytes() == (tmp_path / "again.png").read_bytes()
