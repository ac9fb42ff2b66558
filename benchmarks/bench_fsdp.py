"""Peak memory per GPU under train.strategy ddp vs fsdp (FSDP2) at the same micro-batch (issue 16).

    torchrun --standalone --nproc_per_node=8 benchmarks/bench_fsdp.py                      # XL/1 and 1p0B, bf16
    torchrun --standalone --nproc_per_node=2 benchmarks/bench_fsdp.py --micro-batch 16 --checkpointing on
    python benchmarks/bench_fsdp.py --strategies ddp fsdp fsdp-offload                     # one GPU: offload only
    torchrun --standalone --nproc_per_node=2 benchmarks/bench_fsdp.py --model LightningDiT-T/1 --latent 4 \\
        --micro-batch 2 --no-record                                                        # CPU smoke (gloo)

For each model and strategy, every process builds the model, shards it (fsdp), builds the EMA and
fused AdamW exactly as step 7 does (repro.training.strategy, repro.training.step), takes `--steps`
optimizer steps on random latents, and reports `torch.cuda.max_memory_allocated` (on CPU: peak RSS
growth) of every rank; the table shows the largest. The computed budget of repro.models.cost for the
same settings stands beside it. A configuration that runs out of memory is reported as OOM. Prints a
table and appends it to benchmarks/RESULTS.md with the device, process count, torch version and date.
"""

from __future__ import annotations

import argparse
import gc
import os
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from common import append_results  # noqa: E402
from repro.config import load_config  # noqa: E402
from repro.models.cost import GiB, training_memory_budget  # noqa: E402
from repro.utils import distributed as dist  # noqa: E402
from repro.utils.hardware import default_device, describe_device, is_oom  # noqa: E402


def rss() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def measure(name: str, strategy_name: str, a, device: torch.device) -> dict:
    """Peak bytes of this process for one configuration (None on OOM), and seconds per step."""
    from repro.models.lightningdit import build_model
    from repro.training.batches import BatchPlan
    from repro.training.data_order import MicroBatch
    from repro.training.step import StepRunner, make_optimizer, take_over_label_dropout
    from repro.training.strategy import make_strategy
    from repro.utils.hardware import make_scaler

    cfg = load_config(None, [f"model.model_type={name}", f"model.use_checkpoint={a.checkpointing == 'on'}",
                             f"train.strategy={strategy_name.split('-')[0]}",
                             f"train.fsdp_offload={strategy_name == 'fsdp-offload'}"])
    world = dist.get_world_size()
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
    base = torch.cuda.memory_allocated(device) if device.type == "cuda" else rss()
    result = {"peak": None, "seconds": None}
    try:
        torch.manual_seed(0)
        model = build_model(cfg.model, a.latent, 1000).to(device)
        strategy = make_strategy(cfg.train, device, world)
        strategy.shard(model, [*model.blocks, model])
        ema = strategy.make_ema(model, 0.9999, on_cpu=False)
        take_over_label_dropout(model)
        opt = make_optimizer(model, cfg.optimizer, strategy.param_device)
        m = a.micro_batch
        runner = StepRunner(model, strategy.wrap(model), opt, make_scaler(device, a.precision), ema,
                            BatchPlan(m * world, m, world, 1), cfg, precision=a.precision, device=device)
        g = torch.Generator().manual_seed(dist.get_rank())
        batch = MicroBatch(torch.randn(m, 32, a.latent, a.latent, generator=g),
                           torch.randint(0, 1000, (m,), generator=g), torch.rand(m, generator=g),
                           torch.randn(m, 32, a.latent, a.latent, generator=g))
        runner.step(1, [batch])  # AdamW's moments exist from here on
        t0 = time.perf_counter()
        for i in range(a.steps):
            runner.step(i + 2, [batch])
        float(runner.sums[0])  # a host synchronisation
        result["seconds"] = (time.perf_counter() - t0) / a.steps
        now = torch.cuda.max_memory_allocated(device) if device.type == "cuda" else rss()
        result["peak"] = now - base
        del runner, opt, ema, model
        strategy.close()
    except Exception as e:  # noqa: BLE001 -- an OOM is a result; anything else is re-raised
        if not is_oom(e):
            raise
    return result


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", nargs="+", default=["LightningDiT-XL/1", "LightningDiT-1p0B/1"])
    p.add_argument("--strategies", nargs="+", default=["ddp", "fsdp"], choices=["ddp", "fsdp", "fsdp-offload"])
    p.add_argument("--latent", type=int, default=16, help="latent side (16 = 256 px images)")
    p.add_argument("--micro-batch", type=int, default=8)
    p.add_argument("--precision", default="bf16", choices=["fp32", "bf16", "fp16"])
    p.add_argument("--checkpointing", default="on", choices=["on", "off"])
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--no-record", action="store_true", help="do not append to benchmarks/RESULTS.md")
    a = p.parse_args()
    dist.init()
    device = default_device()
    world = dist.get_world_size()
    kind = "GPU max allocated" if device.type == "cuda" else "peak RSS growth"
    rows = [f"| model | strategy | processes | micro-batch | peak per process ({kind}, largest rank) | "
            "computed budget | s/step |", "|---|---|---|---|---|---|---|"]
    for name in a.model:
        for strategy_name in a.strategies:
            r = measure(name, strategy_name, a, device)
            peaks = dist.all_reduce_values([-1.0 if r["peak"] is None else float(r["peak"])], "min")[0]
            top = dist.all_reduce_values([0.0 if r["peak"] is None else float(r["peak"])], "max")[0]
            mcfg = load_config(None, [f"model.model_type={name}"]).model
            budget = training_memory_budget(mcfg, a.latent, a.micro_batch, a.precision, a.checkpointing == "on",
                                            shards=world if strategy_name != "ddp" else 1,
                                            offload=strategy_name == "fsdp-offload").total
            peak = "OOM" if peaks < 0 else f"{top / GiB:.2f} GiB"
            secs = f"{r['seconds']:.3f}" if r["seconds"] is not None else "-"
            rows.append(f"| {name} | {strategy_name} | {world} | {a.micro_batch} | {peak} | "
                        f"{budget / GiB:.2f} GiB | {secs} |")
            dist.print0(rows[-1])
    head = (f"## bench_fsdp {time.strftime('%Y-%m-%d')}: {describe_device(device)} x {world} process(es), torch "
            f"{torch.__version__}, {a.precision}, checkpointing {a.checkpointing}, latent {a.latent}")
    if dist.is_main():
        print("\n".join([head, "", *rows]))
        if not a.no_record:
            append_results(["", head, "", *rows])
    dist.shutdown()


if __name__ == "__main__":
    main()
