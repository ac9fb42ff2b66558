"""Rank 0 failing inside repro.utils.distributed's helpers, under one torchrun (for tests/test_distributed.py).

    torchrun --standalone --nproc_per_node=2 -m tests.distributed_failures OUT

Each rank appends what it saw, scenario by scenario, to OUT/rank{r}.jsonl. The last scenario is a bug on
rank 0 (a KeyError) that nobody catches: both processes end through the steps' CLI tail (run_step), rank 0
with its traceback, the others with a one-line error, and none of them waits in a collective. Rank 0
leaves only after rank 1 has (its `exit` row is written at interpreter exit, after run_cli's message), so
torchrun, which stops the other workers once one has failed, never cuts rank 1's message short.
"""

from __future__ import annotations

import atexit
import json
import os
import sys
import time
from pathlib import Path

from repro.errors import ConfigError
from repro.utils import distributed as dist
from repro.utils.cli import run_step

MISSING_KEY = "no_such_sampler_key"


def record(out: Path, **row) -> None:
    rank = int(os.environ.get("RANK", "0"))  # the launcher's rank: still known after the group is gone
    with open(out / f"rank{rank}.jsonl", "a") as f:
        f.write(json.dumps(row) + "\n")


def refuse_config() -> None:
    raise ConfigError("configs/x.yaml: sample.cfg_scale is 'high': set a number, e.g. --set sample.cfg_scale=4.0")


def unpicklable_result():
    return lambda: None  # a lambda cannot be pickled, so it cannot reach the other ranks


def read_sampler_key() -> str:
    return {}[MISSING_KEY]  # a bug: a KeyError, not a kit error


def wait_for(path: Path, text: str, seconds: float = 60.0) -> None:
    """Until `path` contains `text` (bounded: a rank that never gets there must not hang the test)."""
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline and not (path.is_file() and text in path.read_text()):
        time.sleep(0.05)


def main(out: Path) -> None:
    dist.init("cpu")
    # A result reaches every rank.
    record(out, scenario="result", value=dist.run_on_main(lambda: {"answer": 42}))
    # A kit error on rank 0: the same type and message on every rank.
    try:
        dist.run_on_main(refuse_config)
    except Exception as e:  # noqa: BLE001 - recorded for the test
        record(out, scenario="config", type=type(e).__name__, message=str(e))
    # A result that cannot be pickled: an error on every rank, not a wait on the others.
    try:
        dist.run_on_main(unpicklable_result)
    except Exception as e:  # noqa: BLE001
        record(out, scenario="unpicklable", type=type(e).__name__, message=str(e))
    # The group still works after those failures.
    record(out, scenario="after", total=dist.all_reduce_values([dist.get_rank() + 1])[0])
    # A bug on rank 0: every rank leaves with an error; rank 0 waits until rank 1 has recorded its own.
    try:
        dist.run_on_main(read_sampler_key)
    except BaseException as e:
        record(out, scenario="bug", type=type(e).__name__, message=str(e))
        if dist.is_main():
            wait_for(out / "rank1.jsonl", '"scenario": "exit"')
        raise


if __name__ == "__main__":
    atexit.register(lambda: record(Path(sys.argv[1]), scenario="exit"))
    run_step(lambda: main(Path(sys.argv[1])))
