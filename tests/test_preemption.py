"""Issue 12: SIGTERM / SIGINT during training finish the optimizer step, write a checkpoint and exit
143 / 130 with the resume advice; the resumed run ends bitwise equal to an uninterrupted one.

Real subprocesses (OMP_NUM_THREADS=1, `train.deterministic` from the tiny configs: see
tests/test_training.py), real signals. Sampling's counterpart is in tests/test_inference.py (it shares
that file's reference run); the handlers' own rules are tested in-process here.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import torch

from repro.errors import Preempted
from repro.training import list_checkpoints
from repro.utils.preemption import BatchDropped, StopSignals
from tests.conftest import PROJECT_ROOT
from tests.test_training import make_latents

STAGE0 = "configs/train/tiny_stage_0.yaml"
STEPS = 40


@pytest.fixture(scope="module")
def latents(tmp_path_factory) -> Path:
    return make_latents(tmp_path_factory.mktemp("latents"))


def _command(latents: Path, out: Path) -> list[str]:
    return [sys.executable, "-m", "steps.step7_train", "--config", STAGE0, "--set", f"data.data_path={latents}",
            f"train.output_dir={out}", f"train.max_steps={STEPS}", "train.ckpt_every=1000", "train.log_every=1"]


def _start(latents: Path, out: Path) -> subprocess.Popen:
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(PROJECT_ROOT))
    return subprocess.Popen(_command(latents, out), cwd=PROJECT_ROOT, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)


def _logged_steps(out: Path) -> int:
    log = out / "tiny_two_stage" / "log.jsonl"
    return len(log.read_text().splitlines()) if log.is_file() else 0


def _interrupt(latents: Path, out: Path, sig: int, after: int) -> tuple[int, str, int]:
    """Run the command, send `sig` once `after` steps are logged; (exit code, output, step it stopped at)."""
    proc = _start(latents, out)
    deadline = time.time() + 240
    while time.time() < deadline and proc.poll() is None and _logged_steps(out) < after:
        time.sleep(0.005)
    assert proc.poll() is None, f"the run ended before the signal:\n{proc.communicate()[0]}"
    proc.send_signal(sig)
    output, _ = proc.communicate(timeout=240)
    found = re.search(rf"stopped by {signal.Signals(sig).name} at step (\d+) of run .*; checkpoint written: (\S+); "
                      r"resume with the same command", output)
    assert found, output
    return proc.returncode, output, int(found.group(1))


def _load(path) -> dict:
    return torch.load(path, map_location="cpu", weights_only=True)


def test_sigterm_saves_the_step_it_reached_and_the_resumed_run_is_bitwise_the_uninterrupted_one(latents, tmp_path):
    ref = _start(latents, tmp_path / "ref")
    output, _ = ref.communicate(timeout=300)
    assert ref.returncode == 0, output

    out = tmp_path / "cut"
    code, output, at = _interrupt(latents, out, signal.SIGTERM, after=5)
    assert code == 143, output
    saved = [s for s, _ in list_checkpoints(out / "tiny_two_stage" / "checkpoints")]
    assert saved == [at] and 5 <= at < STEPS  # the step it reached, not a multiple of ckpt_every
    assert _logged_steps(out) == at  # the step that was running finished (and was logged)

    last = _start(latents, out)
    output, _ = last.communicate(timeout=300)
    assert last.returncode == 0 and f"resumed from {out / 'tiny_two_stage' / 'checkpoints' / f'{at:07d}.pt'}" in output
    a = _load(list_checkpoints(tmp_path / "ref" / "tiny_two_stage" / "checkpoints")[-1][1])
    b = _load(list_checkpoints(out / "tiny_two_stage" / "checkpoints")[-1][1])
    assert a["step"] == b["step"] == STEPS
    for key in ("model", "ema"):
        for name in a[key]:
            assert torch.equal(a[key][name], b[key][name]), f"{key}.{name} differs"
    for pid, st in a["opt"]["state"].items():
        for name in st:
            assert torch.equal(st[name], b["opt"]["state"][pid][name]), f"opt {pid}.{name} differs"
    rows = [json.loads(x)["step"] for x in (out / "tiny_two_stage" / "log.jsonl").read_text().splitlines()]
    assert rows == list(range(1, STEPS + 1))  # every step logged once


def test_sigint_in_a_notebook_kernel_saves_then_stops_the_cell(latents, tmp_path, capsys):
    """In-process, as in a notebook: the kernel's interrupt (SIGINT) finishes the step, saves, and the
    command line exits 130 (a cell gets Preempted); the handler that was there before is back afterwards."""
    from steps.step7_train import cli, main

    out, before = tmp_path / "nb", signal.getsignal(signal.SIGINT)
    args = ["--config", STAGE0, "--set", f"data.data_path={latents}", f"train.output_dir={out}",
            "train.max_steps=100000", "train.ckpt_every=100000", "train.log_every=1"]

    def interrupt():  # the kernel's interrupt, sent once training (and its handler) is running
        deadline = time.time() + 120
        while time.time() < deadline and (_logged_steps(out) < 3 or signal.getsignal(signal.SIGINT) is before):
            time.sleep(0.005)
        os.kill(os.getpid(), signal.SIGINT)

    thread = threading.Thread(target=interrupt, daemon=True)
    thread.start()
    with pytest.raises(SystemExit) as exc:
        cli(args)
    thread.join()
    assert exc.value.code == 130 and signal.getsignal(signal.SIGINT) is before
    last = capsys.readouterr().err.strip().splitlines()[-1]
    found = re.search(r"stopped by SIGINT at step (\d+) .*checkpoint written: (\S+); resume with the same command", last)
    assert found, last
    at = int(found.group(1))
    assert [s for s, _ in list_checkpoints(out / "tiny_two_stage" / "checkpoints")] == [at] and at >= 3
    resumed = main(STAGE0, set=[f"data.data_path={latents}", f"train.output_dir={out}", f"train.max_steps={at + 2}",
                                "train.ckpt_every=100000"])
    assert resumed["step"] == at + 2


@pytest.mark.slow
def test_torchrun_processes_agree_on_the_step_when_one_is_signalled(latents, tmp_path):
    """SIGTERM to rank 1 only: both ranks stop after the same step and rank 0 writes the checkpoint."""
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(PROJECT_ROOT))
    out = tmp_path / "two"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
           *_command(latents, out)[1:], "train.micro_batch_size=4"]
    proc = subprocess.Popen(cmd, cwd=PROJECT_ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    deadline = time.time() + 240
    while time.time() < deadline and proc.poll() is None and _logged_steps(out) < 5:
        time.sleep(0.01)
    workers = [int(p) for p in Path(f"/proc/{proc.pid}/task/{proc.pid}/children").read_text().split()]
    ranks = {int(dict(line.split("=", 1) for line in Path(f"/proc/{w}/environ").read_bytes().decode()
                      .split("\0") if "=" in line).get("RANK", -1)): w for w in workers}
    os.kill(ranks[1], signal.SIGTERM)
    output, _ = proc.communicate(timeout=240)
    assert proc.returncode != 0, output
    steps = {int(s) for s in re.findall(r"stopped by SIGTERM at step (\d+)", output)}
    assert len(steps) == 1 and len(re.findall(r"stopped by SIGTERM at step", output)) == 2, output
    saved = list_checkpoints(out / "tiny_two_stage" / "checkpoints")
    assert [s for s, _ in saved] == list(steps) and _load(saved[0][1])["kit"]["world_size"] == 2


def test_handlers_are_restored_and_a_second_signal_stops_at_once():
    before = signal.getsignal(signal.SIGTERM)
    with StopSignals("testing") as stops:
        assert signal.getsignal(signal.SIGTERM) != before
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(0.01)  # the handler runs in the main thread at the next bytecode
        assert stops.signum == signal.SIGTERM and stops.agreed() == signal.SIGTERM
        with pytest.raises(KeyboardInterrupt):
            os.kill(os.getpid(), signal.SIGTERM)
            time.sleep(0.01)
    assert signal.getsignal(signal.SIGTERM) == before
    with StopSignals("testing") as stops, pytest.raises(BatchDropped):
        with stops.droppable():
            os.kill(os.getpid(), signal.SIGINT)
            time.sleep(0.01)
    assert Preempted("x", signal.SIGTERM).exit_code == 143 and Preempted("x", signal.SIGINT).exit_code == 130


def test_an_interrupted_notebook_cell_passes_ctrl_c_on_to_its_workers(tmp_path, capsys):
    """A notebook's `launch` streams torchrun's output; the kernel's interrupt (SIGINT to the kernel only,
    not its children) must reach the workers, so they stop at a safe point, and the cell then raises."""
    from repro.setup.notebook import _stream

    ready, got = tmp_path / "ready", tmp_path / "got"
    child = ("import pathlib, signal, sys, time\n"
             "def stop(signum, frame):\n"
             "    pathlib.Path(sys.argv[2]).write_text(signal.Signals(signum).name)\n"
             "    sys.exit(130)\n"
             "signal.signal(signal.SIGINT, stop)\n"
             "print('worker started', flush=True)\n"
             "pathlib.Path(sys.argv[1]).touch()\n"
             "time.sleep(20)\n")

    def interrupt():  # once the worker is running, the kernel (this process) gets SIGINT
        deadline = time.time() + 30
        while not ready.exists() and time.time() < deadline:
            time.sleep(0.01)
        os.kill(os.getpid(), signal.SIGINT)

    # a kernel turns SIGINT into KeyboardInterrupt; a suite started in the background (`pytest &`) ignores it
    before = signal.signal(signal.SIGINT, signal.default_int_handler)
    thread = threading.Thread(target=interrupt)
    thread.start()
    try:
        with pytest.raises(KeyboardInterrupt):
            _stream([sys.executable, "-c", child, str(ready), str(got)], dict(os.environ), "worker")
    finally:
        thread.join()
        signal.signal(signal.SIGINT, before)
    assert got.read_text() == "SIGINT"  # forwarded, and the worker has exited (the cell waited for it)
    assert "worker started" in capsys.readouterr().out
