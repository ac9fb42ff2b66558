"""Several nodes: two torchrun agents on loopback (`--nnodes 2`, c10d rendezvous, one process each) train
bitwise the same checkpoints as one node with two processes; a run folder a node cannot see is refused
by name; resume reads checkpoints memory-mapped; the background checkpoint write.

(`torchrun --master_port=0` hangs with this torch: the tests pick a free port themselves.)
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from repro.training import checkpoints as ckpt
from repro.training.saver import CheckpointWriter
from tests.conftest import PROJECT_ROOT
from tests.test_training import make_latents

EXP = "tiny_two_stage"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def torchrun(*args: str) -> subprocess.Popen:
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(PROJECT_ROOT))
    return subprocess.Popen([sys.executable, "-m", "torch.distributed.run", *args], cwd=PROJECT_ROOT, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


@pytest.fixture(scope="module")
def two_ways(tmp_path_factory) -> tuple[Path, Path]:
    """(run of two one-process agents, run of one two-process agent), trained at the same time."""
    data = make_latents(tmp_path_factory.mktemp("latents"))
    out = tmp_path_factory.mktemp("runs")
    port = free_port()
    job = ["-m", "tests.multinode_runs"]
    # the documented multi-node form (docs/multinode.md): c10d rendezvous, the same --rdzv_id on every node
    nodes = [torchrun("--nnodes=2", "--nproc_per_node=1", f"--node_rank={r}", "--rdzv_backend=c10d",
                      f"--rdzv_endpoint=127.0.0.1:{port}", "--rdzv_id=test-job", *job, str(out / "nodes"), str(data))
             for r in range(2)]
    one = torchrun("--standalone", "--nproc_per_node=2", *job, str(out / "one"), str(data))
    for p in (*nodes, one):
        text, _ = p.communicate(timeout=420)
        assert p.returncode == 0, text[-4000:]
    return out / "nodes", out / "one"


def tensors(state: dict) -> dict:
    # numpy's and Python's global generators are seeded from OS entropy in every process and the kit
    # draws nothing from them; torch's is seeded by train.global_seed
    return {"model": state["model"], "ema": state["ema"], "opt": state["opt"]["state"],
            "torch_rng": [r["torch_cpu"] for r in state["rng"]]}


def assert_bitwise(a, b, where: str = "") -> None:
    if torch.is_tensor(a):
        assert torch.equal(a, b), where
    elif isinstance(a, dict):
        assert a.keys() == b.keys(), where
        for k in a:
            assert_bitwise(a[k], b[k], f"{where}/{k}")
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b)):
            assert_bitwise(x, y, f"{where}[{i}]")
    else:
        assert a == b, where


def test_two_agents_on_loopback_match_one_node_bitwise(two_ways):
    nodes, one = two_ways
    for step in (3, 6):
        a = torch.load(ckpt.checkpoint_path(nodes / EXP, step), map_location="cpu", weights_only=True)
        b = torch.load(ckpt.checkpoint_path(one / EXP, step), map_location="cpu", weights_only=True)
        assert a["kit"]["world_size"] == b["kit"]["world_size"] == 2
        assert a["data_order"] == b["data_order"]
        assert_bitwise(tensors(a), tensors(b), f"step {step}")


def test_a_run_folder_a_node_cannot_see_is_refused_by_name(two_ways):
    nodes, _ = two_ways
    errors = json.loads((nodes / "shared_check.json").read_text())
    assert len(errors) == 2 and errors[0] == errors[1]  # every process stops, none waits forever
    assert f"rank 1 (1 of 2) cannot see {nodes / 'node-local-0'} (train.output_dir)" in errors[0]
    assert "filesystem every node mounts" in errors[0]
    assert not list((nodes / "node-local-0").iterdir())  # the probe file is removed again


def test_resume_reads_checkpoints_memory_mapped(two_ways):
    path = ckpt.checkpoint_path(two_ways[1] / EXP, 6)
    state = ckpt.read_training_checkpoint(path)
    maps = Path("/proc/self/maps").read_text()
    assert str(path) in maps  # the tensors are pages of the file, not a copy per process
    assert state["model"]["pos_embed"].shape[0] == 1
    del state


def test_background_write_waits_for_the_copy_only_and_reports_errors(tmp_path):
    writer = CheckpointWriter(background=True)
    live = {"w": torch.ones(1000)}
    snap = writer.snapshot(live)
    live["w"].add_(1)  # the loop moves on and changes the weights: the copy keeps the saved values
    started = time.perf_counter()
    writer.submit(lambda: (time.sleep(0.5), torch.save(snap, tmp_path / "a.pt")))
    assert time.perf_counter() - started < 0.4 and writer.busy()
    writer.wait()
    assert torch.equal(torch.load(tmp_path / "a.pt", weights_only=True)["w"], torch.ones(1000))
    again = writer.snapshot(live)
    assert again["w"].data_ptr() == snap["w"].data_ptr()  # the host buffers are reused, not reallocated

    def fail():
        raise OSError("disk went away")

    writer.submit(fail)
    with pytest.raises(OSError, match="disk went away"):
        writer.close()  # the next wait (a save, or the end of the run) raises the write's error
