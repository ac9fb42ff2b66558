"""Compilation by default on CUDA (issue 14): the mode decision, and the fall-back to eager with one
clear line when torch.compile fails (a real failing backend, no mocks); CPU runs stay eager."""

from __future__ import annotations

import pytest
import torch

from repro.errors import ReproError
from repro.utils.hardware import CompiledOrEager, compile_mode
from tests.tiny_assets import tiny_model

CPU, CUDA = torch.device("cpu"), torch.device("cuda")  # a device object needs no GPU


def test_compile_mode_defaults_to_cuda_graphs_on_gpu_and_eager_on_cpu():
    assert compile_mode(None, CPU, auto="reduce-overhead") is None
    assert compile_mode("auto", CPU, auto="default") is None
    assert compile_mode(None, CUDA, auto="reduce-overhead") == "reduce-overhead"
    assert compile_mode("auto", CUDA, auto="default") == "default"
    for off in (False, "none", "eager"):
        assert compile_mode(off, CUDA, auto="default") is None
    assert compile_mode(True, CPU, auto=None) == "default"
    assert compile_mode("max-autotune", CPU, auto=None) == "max-autotune"
    with pytest.raises(ReproError, match="compile mode 'fast' is not one of auto, none, default"):
        compile_mode("fast", CUDA, auto="default")


def _failing_backend(message: str):
    def backend(gm, example_inputs):
        raise RuntimeError(message)
    return backend


def _inputs(n: int = 3):
    g = torch.Generator().manual_seed(0)
    return (torch.randn(n, 32, 4, 4, generator=g), torch.rand(n, generator=g), torch.randint(0, 10, (n,), generator=g))


def test_a_failing_compiler_falls_back_to_eager_with_one_line():
    model = tiny_model()
    notes: list[str] = []
    wrapped = CompiledOrEager(model, "default", "sampling", backend=_failing_backend("no C++ compiler found"),
                              note=notes.append)
    x, t, y = _inputs()
    with torch.no_grad():
        out = wrapped(x, t, y)
        again = wrapped(x, t, y)
        ref = model(x, t, y)
    assert torch.equal(out, ref) and torch.equal(again, ref)  # the eager model's results, bit for bit
    assert len(notes) == 1 and "torch.compile failed for sampling" in notes[0]
    assert "no C++ compiler found" in notes[0] and "--no-compile" in notes[0]
    assert wrapped.failed and wrapped.num_classes == model.num_classes


def test_out_of_memory_inside_compile_is_raised_not_hidden():
    wrapped = CompiledOrEager(tiny_model(), "default", "training",
                              backend=_failing_backend("CUDA out of memory. Tried to allocate 2.00 GiB"),
                              note=lambda m: pytest.fail(f"OOM must not fall back: {m}"))
    with pytest.raises(Exception, match="out of memory"), torch.no_grad():
        wrapped(*_inputs())
    assert wrapped.failed is None


def test_a_working_compiler_gives_the_eager_result():
    model = tiny_model()
    wrapped = CompiledOrEager(model, "default", "sampling", backend="eager", note=pytest.fail)
    x, t, y = _inputs()
    with torch.no_grad():
        assert torch.allclose(wrapped(x, t, y), model(x, t, y), rtol=0, atol=1e-6)
    assert wrapped.failed is None
