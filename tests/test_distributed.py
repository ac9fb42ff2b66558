"""repro.utils.distributed: a failure on rank 0 reaches every rank (real torchrun, two processes, gloo).

One torchrun runs every scenario of tests/distributed_failures.py, so the file pays one start-up.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from repro.errors import ConfigError
from repro.utils import distributed as dist

PROJECT_ROOT = Path(__file__).resolve().parents[1]
CONFIG_MESSAGE = "configs/x.yaml: sample.cfg_scale is 'high': set a number, e.g. --set sample.cfg_scale=4.0"
BUG_MESSAGE = "rank 0 failed in read_sampler_key: KeyError: 'no_such_sampler_key'"


@pytest.fixture(scope="module")
def torchrun_rows(tmp_path_factory) -> tuple[subprocess.CompletedProcess, dict[int, dict[str, dict]]]:
    out = tmp_path_factory.mktemp("distributed_failures")
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(PROJECT_ROOT))
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
           "-m", "tests.distributed_failures", str(out)]
    # A session of its own: if the workers hang, the whole group is killed, not only torchrun.
    proc = subprocess.Popen(cmd, cwd=PROJECT_ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, start_new_session=True)
    try:
        stdout, stderr = proc.communicate(timeout=240)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        stdout, stderr = proc.communicate()
        pytest.fail(f"torchrun hung (a rank waited for rank 0 forever): {stdout[-2000:]} {stderr[-4000:]}")
    rows = {rank: {row["scenario"]: row for row in map(json.loads, (out / f"rank{rank}.jsonl").read_text().splitlines())}
            for rank in (0, 1) if (out / f"rank{rank}.jsonl").is_file()}
    return subprocess.CompletedProcess(cmd, proc.returncode, stdout, stderr), rows


def test_a_bug_on_rank_0_ends_every_rank_with_its_message(torchrun_rows):
    proc, rows = torchrun_rows
    assert proc.returncode != 0, proc.stderr[-4000:]
    assert set(rows) == {0, 1}, proc.stderr[-4000:]
    # rank 0 re-raises its own exception; rank 1 a ReproError naming it, printed as one line by run_cli (exit 1)
    assert rows[0]["bug"] == {"scenario": "bug", "type": "KeyError", "message": "'no_such_sampler_key'"}
    assert rows[1]["bug"]["type"] == "ReproError" and rows[1]["bug"]["message"].startswith(BUG_MESSAGE)
    assert f"error: {BUG_MESSAGE}" in proc.stderr
    assert "KeyError: 'no_such_sampler_key'" in proc.stderr.replace(BUG_MESSAGE, "")  # rank 0's traceback
    assert "exit" in rows[0] and "exit" in rows[1]  # both processes reached interpreter exit: no one hung


def test_kit_errors_and_results_reach_every_rank(torchrun_rows):
    _, rows = torchrun_rows
    for rank in (0, 1):
        assert rows[rank]["result"]["value"] == {"answer": 42}
        assert rows[rank]["config"] == {"scenario": "config", "type": "ConfigError", "message": CONFIG_MESSAGE}
        assert rows[rank]["after"]["total"] == 3.0  # the group still works after the failures


def test_an_unpicklable_result_fails_on_every_rank(torchrun_rows):
    _, rows = torchrun_rows
    for rank in (0, 1):
        row = rows[rank]["unpicklable"]
        assert row["type"] == "ReproError", row
        assert row["message"].startswith("rank 0 could not send a tuple (AttributeError: "), row
        assert "broadcast_object takes picklable values only" in row["message"]


def test_one_process_runs_in_place_and_reraises_the_original():
    assert dist.run_on_main(lambda x: x + 1, 41) == 42
    marker = lambda: None  # noqa: E731 - with one process nothing is pickled
    assert dist.broadcast_object(marker) is marker
    error = ConfigError("configs/x.yaml: bad value")
    with pytest.raises(ConfigError) as got:
        dist.run_on_main(lambda: (_ for _ in ()).throw(error))
    assert got.value is error
    with pytest.raises(KeyError):
        dist.run_on_main(dict().__getitem__, "missing")
