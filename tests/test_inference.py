"""Step 4 end to end on the tiny profile: real downloads from a local fake hub, real subprocesses,
torchrun with gloo, SIGKILL and resume, papermill notebooks, and each bad input's message."""

from __future__ import annotations

import os
import re
import resource
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from tests.fakehub import FakeHub
from tests.tiny_assets import ASSET_NAMES, TINY_CHANNELS, TINY_CLASSES, hub_tiny_config, tiny_asset_files

ROOT = Path(__file__).resolve().parent.parent
NEEDED = sorted(ASSET_NAMES)
FAST = ["sample.num_sampling_steps=12"]  # the tiny preset's sampler (cfg 4, interval 0.125, shift 0.3), fewer steps


@pytest.fixture(scope="module")
def hub():
    with FakeHub(files=tiny_asset_files()) as h:
        yield h


@pytest.fixture(scope="module")
def prepared(tmp_path_factory, hub):
    """A runs folder where steps 2 and 3 ran for the tiny profile: (env for subprocesses, resolved config)."""
    base = tmp_path_factory.mktemp("prepared")
    # One intra-op thread in every process, as torchrun sets it: on CPU, oneDNN convolutions split their
    # reductions by thread count, so 1 vs 2 threads differ by ~1e-7 (a few pixels by one level).
    env = {"HF_ENDPOINT": hub.endpoint, "REPRO_RUNS_DIR": str(base / "runs"), "HF_HOME": str(base / "hf"),
           "HF_HUB_DISABLE_PROGRESS_BARS": "1", "OMP_NUM_THREADS": "1"}
    with pytest.MonkeyPatch.context() as mp:
        for k, v in env.items():
            mp.setenv(k, v)
        from steps import step2_download, step3_configs

        step2_download.main(only=NEEDED, dest=str(base / "weights"))
        resolved = step3_configs.main(base=str(hub_tiny_config(base)), set=["data.fid_reference_file=null"])["path"]
    return {**os.environ, **env}, str(resolved)


def step4(args, env, timeout=240, **kwargs):
    return subprocess.run([sys.executable, "-m", "steps.step4_inference", "--no-progress", *args], cwd=ROOT,
                          env=env, capture_output=True, text=True, timeout=timeout, **kwargs)


def pngs(out: Path) -> list[Path]:
    """Finished PNGs (temp files of the atomic writes start with '.')."""
    return [p for p in (out / "images").glob("*.png") if not p.name.startswith(".")]


def npz_bytes(out: Path) -> bytes:
    return (out / "samples.npz").read_bytes()


def assert_ok(proc):
    assert proc.returncode == 0, f"exit {proc.returncode}\nstdout:\n{proc.stdout}\nstderr:\n{proc.stderr}"


def fid_args(config, out, n=24, batch=4, extra=()):
    return ["--config", config, "--num-samples", str(n), "--batch-size", str(batch), "--out", str(out),
            "--set", *FAST, *extra]


# ---------------------------------------------------------------------------------------------
# The demo path, from the command line and from the notebook


def test_demo_from_command_line_runs_steps_2_and_3(tmp_path, hub):
    env = {**os.environ, "HF_ENDPOINT": hub.endpoint}
    proc = step4(["--config", str(hub_tiny_config(tmp_path)), "--demo"], env)  # tiny, with the official names
    assert_ok(proc)
    assert "running step 2" in proc.stdout and "running step 3" in proc.stdout
    out = Path(os.environ["REPRO_RUNS_DIR"]) / "demo"
    grid = Image.open(out / "demo_samples.png")
    assert grid.size == (4 * 64, 2 * 64) and grid.mode == "RGB"
    cells = np.asarray(grid).reshape(2, 64, 4, 64, 3).transpose(0, 2, 1, 3, 4).reshape(8, -1)
    assert len({c.tobytes() for c in cells}) == 8  # eight different images
    assert (out / "config.yaml").is_file() and "cfg_scale: 9.0" in (out / "config.yaml").read_text()
    assert "NFE per image" in proc.stdout and "images/s" in proc.stdout and "peak memory" in proc.stdout


def nb_outputs(path: Path) -> list[dict]:
    import nbformat

    return [o for c in nbformat.read(path, as_version=4).cells if c.cell_type == "code" for o in c.get("outputs", [])]


def test_quickstart_notebook_offline_tiny(tmp_path, monkeypatch, python3_kernel):
    """`-p config tiny` runs steps 1-4 with no network at all (generated weights, nothing downloaded)."""
    import papermill

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_ENDPOINT", "http://127.0.0.1:9")  # nothing listens: any download attempt fails
    work = tmp_path / "work"
    params = dict(config="tiny", workdir=str(work), num_samples=8, steps=8, cfg=9.0, device="cpu", install=False)
    out_nb = tmp_path / "00.ipynb"
    papermill.execute_notebook(str(ROOT / "notebooks" / "00_quickstart.ipynb"), str(out_nb),
                               parameters=params, kernel_name=python3_kernel, cwd=str(ROOT), progress_bar=False)
    out = work / "runs" / "demo"
    assert Image.open(out / "demo_samples.png").size == (256, 128) and (out / "samples_figure.png").is_file()
    outputs = nb_outputs(out_nb)
    text = "".join(o.get("text", "") for o in outputs if o["output_type"] == "stream")
    assert "nothing to download" in text and "100%|" in text  # progress bars as text under papermill
    shown = [o["data"] for o in outputs if o["output_type"] == "display_data"]
    assert len(shown) == 2 and all("image/png" in d for d in shown)  # grid and figure inline, no text-only Figure
    assert not any("<Figure" in str(o.get("data", {}).get("text/plain", "")) or "widget" in str(o.get("data", {}))
                   for o in outputs)


def test_sample_fid_notebook(tmp_path, hub, monkeypatch, python3_kernel):
    import papermill

    monkeypatch.setenv("HF_ENDPOINT", hub.endpoint)
    work = tmp_path / "work"
    params = dict(config=str(hub_tiny_config(tmp_path)), workdir=str(work), num_samples=20, batch_size=4,
                  class_balanced=True, steps=6, device="cpu")  # tiny under the official names: step 2 downloads
    out_nb = tmp_path / "01.ipynb"
    papermill.execute_notebook(str(ROOT / "notebooks" / "01_sample_fid.ipynb"), str(out_nb),
                               parameters=params, kernel_name=python3_kernel, cwd=str(ROOT), progress_bar=False)
    with np.load(work / "runs" / "fid" / "samples.npz") as npz:  # where notebook 03 looks by default
        assert npz["arr_0"].shape == (20, 64, 64, 3)
        assert np.bincount(npz["arr_1"], minlength=TINY_CLASSES).tolist() == [2] * TINY_CLASSES
    # what the executed notebook shows: the run's summary (6 grid points = 5 Euler steps) and the samples inline
    outputs = nb_outputs(out_nb)
    text = "".join(o.get("text", "") for o in outputs if o["output_type"] == "stream")
    assert re.search(r"(^|\s)20 images \(20 new\) in .*: 5 NFE per image", text, re.M), text
    assert any("image/png" in o.get("data", {}) for o in outputs if o["output_type"] == "display_data")
    assert any("image/png" in o.get("data", {}) for o in nb_outputs(out_nb))


# ---------------------------------------------------------------------------------------------
# Deterministic per image: processes, interruptions, batch sizes


@pytest.fixture(scope="module")
def reference_run(prepared, tmp_path_factory):
    env, config = prepared
    out = tmp_path_factory.mktemp("ref") / "one_process"
    assert_ok(step4(fid_args(config, out), env))
    return out


def test_npz_format_and_resume_noop(prepared, reference_run):
    env, config = prepared
    with np.load(reference_run / "samples.npz") as npz:
        images, labels = npz["arr_0"], npz["arr_1"]
    assert images.shape == (24, 64, 64, 3) and images.dtype == np.uint8
    assert labels.shape == (24,) and labels.dtype == np.int64 and labels.max() < TINY_CLASSES
    pngs = sorted((reference_run / "images").glob("*.png"))
    assert [p.name for p in pngs] == [f"{i:06d}.png" for i in range(24)]
    assert np.array_equal(np.asarray(Image.open(pngs[5])), images[5])
    before = npz_bytes(reference_run)
    again = step4(fid_args(config, reference_run), env)
    assert_ok(again)
    assert "24 already there" in again.stdout and npz_bytes(reference_run) == before


def test_torchrun_two_processes_is_byte_identical(prepared, reference_run, tmp_path):
    env, config = prepared
    out = tmp_path / "two"
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                           "-m", "steps.step4_inference", "--no-progress",
                           *fid_args(config, out)], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert_ok(proc)
    assert "x 2 process(es)" in proc.stdout
    assert npz_bytes(out) == npz_bytes(reference_run)


def test_sigkill_midway_then_resume_is_byte_identical(prepared, reference_run, tmp_path):
    env, config = prepared
    out = tmp_path / "killed"
    args = [sys.executable, "-m", "steps.step4_inference", "--no-progress", *fid_args(config, out)]
    proc = subprocess.Popen(args, cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    try:
        while time.time() < deadline and proc.poll() is None:
            if pngs(out):
                break
            time.sleep(0.005)
        os.kill(proc.pid, signal.SIGKILL)
    finally:
        proc.wait()
    done = len(pngs(out))
    assert proc.returncode == -signal.SIGKILL and 0 < done < 24, f"not killed midway ({done} PNGs)"
    assert not (out / "samples.npz").exists()
    again = step4(fid_args(config, out), env)
    assert_ok(again)
    assert f"{done} already there" in again.stdout
    assert npz_bytes(out) == npz_bytes(reference_run)
    assert not [p for p in out.rglob(".*") if ".tmp" in p.name]  # no half-written file survives


def test_sigterm_drops_the_batch_in_flight_writes_the_rest_and_resumes(prepared, reference_run, tmp_path):
    """Issue 12: SIGTERM (Kaggle's stop, SLURM's preemption) midway: the finished images are written, the
    process exits 143 saying how to resume, and the same command finishes the same pixels."""
    env, config = prepared
    out = tmp_path / "terminated"
    args = [sys.executable, "-m", "steps.step4_inference", "--no-progress", *fid_args(config, out, n=48)]
    proc = subprocess.Popen(args, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 120
    while time.time() < deadline and proc.poll() is None and not pngs(out):
        time.sleep(0.005)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
    done = len(pngs(out))
    assert proc.returncode == 143, err
    last = err.strip().splitlines()[-1]
    assert last == (f"stopped by SIGTERM: {done} of 48 images are written in {out / 'images'} (a batch in flight, "
                    "if any, was dropped); resume with the same command"), err
    assert 0 < done < 48 and not (out / "samples.npz").exists()
    assert not [p for p in out.rglob(".*") if ".tmp" in p.name]  # no half-written file
    again = step4(fid_args(config, out, n=48), env)
    assert_ok(again)
    assert f"{done} already there" in again.stdout
    with np.load(out / "samples.npz") as a, np.load(reference_run / "samples.npz") as b:
        assert np.array_equal(a["arr_0"][:24], b["arr_0"])  # image i depends only on (seed, i)


def test_other_batch_size_agrees_to_rounding(prepared, reference_run, tmp_path):
    env, config = prepared
    out = tmp_path / "batch3"
    assert_ok(step4(fid_args(config, out, batch=3), env))
    with np.load(out / "samples.npz") as a, np.load(reference_run / "samples.npz") as b:
        x, y = a["arr_0"].astype(np.int16), b["arr_0"].astype(np.int16)
        assert np.array_equal(a["arr_1"], b["arr_1"])
    assert np.abs(x - y).max() <= 1
    assert (x != y).mean() < 0.01


def test_class_balanced_in_process(prepared, tmp_path, monkeypatch):
    env, config = prepared
    for k in ("HF_ENDPOINT", "HF_HOME", "REPRO_RUNS_DIR"):
        monkeypatch.setenv(k, env[k])
    from steps.step4_inference import main

    res = main(config=config, num_samples=30, batch_size=8, class_balanced=True, out=str(tmp_path / "bal"),
               set=["sample.num_sampling_steps=3"], progress=False)
    with np.load(res["npz"]) as npz:
        labels = npz["arr_1"]
    assert np.bincount(labels, minlength=TINY_CLASSES).tolist() == [3] * TINY_CLASSES
    assert labels.tolist() != sorted(labels.tolist())  # shuffled, not in class order
    assert res["new_images"] == 30 and res["nfe_per_image"] == 2 and res["images_per_s"] > 0


# ---------------------------------------------------------------------------------------------
# Bad input: one clear line, non-zero exit, nothing partial


def _bad_stats(folder: Path) -> str:
    folder.mkdir()
    torch.save({"mean": torch.zeros(1, 16, 1, 1), "std": torch.ones(1, 16, 1, 1)}, folder / "latents_stats.pt")
    return str(folder)


BAD = {
    "config": (lambda t: ["--config", str(t / "nope.yaml")], "config not found"),
    "checkpoint": (lambda t: ["--set", f"ckpt_path={t / 'missing.pt'}"], "ckpt_path not found"),
    "vae": (lambda t: ["--set", f"vae.ckpt_path={t / 'vae.pt'}"], "vae.ckpt_path not found"),
    "stats_missing": (lambda t: ["--set", f"data.data_path={t}"], "latent statistics not found"),
    "stats_channels": (lambda t: ["--set", f"data.data_path={_bad_stats(t / 's')}"], "has 16 channels"),
    "label": (lambda t: ["--labels", "3", str(TINY_CLASSES)], f"label {TINY_CLASSES} is outside [0, {TINY_CLASSES})"),
    "balanced": (lambda t: ["--class-balanced", "--num-samples", "15"], "multiple of data.num_classes"),
}


@pytest.mark.parametrize("case", sorted(BAD))
def test_bad_input_is_one_line_and_exit_1(case, prepared, tmp_path, capsys, monkeypatch):
    env, config = prepared
    for k in ("HF_ENDPOINT", "HF_HOME", "REPRO_RUNS_DIR"):
        monkeypatch.setenv(k, env[k])
    from steps.step4_inference import cli

    make, message = BAD[case]
    args = make(tmp_path)
    if "--config" not in args:
        args = ["--config", config, *args]
    if "--num-samples" not in args:
        args += ["--num-samples", "4"]
    out = tmp_path / "out"
    with pytest.raises(SystemExit) as exc:
        cli([*args, "--out", str(out), "--no-progress"])
    assert exc.value.code == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("error: ") and message in err[-1], err
    assert not out.exists()  # refused before anything was written


def test_non_finite_latents_are_named_and_never_written(prepared, tmp_path, capsys, monkeypatch):
    """NaN/inf latents (fp16 overflow on a T4, a broken checkpoint) stop the run instead of writing black PNGs."""
    from tests.tiny_assets import tiny_model

    env, config = prepared
    for k in ("HF_ENDPOINT", "HF_HOME", "REPRO_RUNS_DIR"):
        monkeypatch.setenv(k, env[k])
    state = tiny_model().state_dict()
    state["final_layer.linear.bias"][0] = float("nan")  # channel 0 of every token: every image
    torch.save({"ema": state}, tmp_path / "nan.pt")
    from steps.step4_inference import cli

    out = tmp_path / "out"
    with pytest.raises(SystemExit) as exc:
        cli(["--config", config, "--num-samples", "6", "--batch-size", "3", "--out", str(out), "--no-progress",
             "--set", f"ckpt_path={tmp_path / 'nan.pt'}", *FAST])
    assert exc.value.code == 1
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert "NaN/inf latents for image(s) 0, 1, 2 (fp32 transformer)" in err and "ckpt_path" in err, err
    assert pngs(out) == []


def test_batch_too_big_for_memory_says_what_to_lower(prepared, tmp_path):
    env, config = prepared
    # A real allocation failure: cap the address space at what importing the stack maps plus 1.5 GiB;
    # a batch of 60,000 tiny images needs several GiB of activations.
    probe = subprocess.run([sys.executable, "-c", "import torch, steps.step4_inference, repro.sampling.run; "
                            "print([l for l in open('/proc/self/status') if l.startswith('VmPeak')][0].split()[1])"],
                           cwd=ROOT, env=env, capture_output=True, text=True, check=True)
    limit = int(probe.stdout.strip()) * 1024 + 3 * 2**29

    def limit_memory():
        resource.setrlimit(resource.RLIMIT_AS, (limit, limit))

    out = tmp_path / "oom"
    proc = step4(["--config", config, "--num-samples", "60000", "--batch-size", "60000", "--out", str(out),
                  "--set", "sample.num_sampling_steps=2"], {**env, "OMP_NUM_THREADS": "1"},
                 preexec_fn=limit_memory)
    assert proc.returncode == 1, proc.stderr
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith("error: a batch of 60000 images") and "lower --batch-size" in last, proc.stderr
    assert not pngs(out)
    assert not [p for p in out.rglob(".*") if ".tmp" in p.name]


# ---------------------------------------------------------------------------------------------
# Library pieces: the plan, the writer, the npz packer, the fp32 path against the plain one


def test_plan_depends_only_on_seed_and_index():
    from repro.sampling import plan

    shape = (TINY_CHANNELS, 4, 4)
    assert torch.equal(plan.batch_noise(7, range(3, 7), shape)[1], plan.image_noise(7, 4, shape))
    assert not torch.equal(plan.image_noise(7, 4, shape), plan.image_noise(8, 4, shape))
    assert plan.plan_labels(12, 10, seed=1)[:5].tolist() == plan.plan_labels(5, 10, seed=1).tolist()
    assert plan.my_batches(7, 1, 3) == [1, 4] and list(plan.batch_indices(2, 4, 10)) == [8, 9]
    assert plan.plan_labels(5, 1000, labels=[975, 3]).tolist() == [975, 3, 975, 3, 975]
    assert plan.demo_labels(1000)[0] == list(plan.DEMO_LABELS)


def test_pack_npz_streams_chunks_in_adm_format(tmp_path):
    import zipfile

    from repro.sampling.writer import pack_npz, write_png

    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (7, 8, 8, 3), dtype=np.uint8)
    for i, im in enumerate(images):
        write_png(tmp_path / "png" / f"{i:06d}.png", im)
    labels = np.arange(7) % 3
    a = pack_npz(tmp_path / "png", 7, tmp_path / "a.npz", labels=labels, chunk=3)
    b = pack_npz(tmp_path / "png", 7, tmp_path / "b.npz", labels=labels, chunk=5)
    assert a.read_bytes() == b.read_bytes()  # fixed zip timestamps: a pure function of the images
    with np.load(a) as npz:
        assert np.array_equal(npz["arr_0"], images) and npz["arr_1"].tolist() == labels.tolist()
    with zipfile.ZipFile(a) as zf, zf.open("arr_0.npy") as f:  # how ADM's evaluator streams it
        assert np.lib.format.read_magic(f) == (1, 0)
        shape, fortran, dtype = np.lib.format.read_array_header_1_0(f)
        assert shape == (7, 8, 8, 3) and not fortran and dtype == np.uint8
    (tmp_path / "png" / "000004.png").unlink()
    with pytest.raises(Exception, match="1 of 7 PNGs are missing"):
        pack_npz(tmp_path / "png", 7, tmp_path / "c.npz")
    assert not (tmp_path / "c.npz").exists()


def test_writer_thread_equals_inline_and_reports_errors(tmp_path):
    from repro.sampling.writer import ImageWriter

    batch = np.random.default_rng(1).integers(0, 256, (3, 8, 8, 3), dtype=np.uint8)
    for name, threaded in (("t", True), ("i", False)):
        with ImageWriter(threaded=threaded, max_pending=1) as w:
            for k in range(3):
                w.submit(batch, [tmp_path / name / f"{k}_{j}.png" for j in range(3)])
    assert sorted(p.name for p in (tmp_path / "t").iterdir()) == sorted(p.name for p in (tmp_path / "i").iterdir())
    assert all((tmp_path / "t" / p.name).read_bytes() == p.read_bytes() for p in (tmp_path / "i").iterdir())

    def broken(x):
        raise RuntimeError("CUDA out of memory. Tried to allocate 2.00 GiB")
    with pytest.raises(RuntimeError, match="out of memory"):
        with ImageWriter(broken) as w:
            w.submit(batch, [tmp_path / "x" / f"{j}.png" for j in range(3)])
    assert not (tmp_path / "x").exists()


def test_fp32_path_matches_plain_doubled_cfg():
    """The kit's path (unconditional half only where guided) equals upstream's always-doubled one."""
    from repro.config import Config
    from repro.sampling import engine as gen
    from repro.transport import combine_cfg, sample_ode
    from tests.tiny_assets import tiny_model

    model = tiny_model()
    cfg = Config()
    cfg.sample.num_sampling_steps, cfg.sample.cfg_scale = 10, 4.0
    cfg.sample.cfg_interval_start, cfg.sample.timestep_shift = 0.3, 0.3
    setup = gen.SamplerSetup(cfg=cfg, model=model, eager_model=model, vae=None, mean=None, std=None,
                             device=torch.device("cpu"), precision="fp32", vae_precision="fp32",
                             latent_shape=(TINY_CHANNELS, 4, 4), num_classes=TINY_CLASSES)
    z, y = torch.randn(3, TINY_CHANNELS, 4, 4), torch.tensor([1, 5, 9])

    def plain(x, t, labels):  # upstream forward_with_cfg: always 2B rows
        out = model(torch.cat([x, x]), torch.cat([t, t]), torch.cat([labels, torch.full_like(labels, 10)]))
        cond, uncond = out.chunk(2)
        return cond if float(t[0]) < 0.3 else combine_cfg(cond, uncond, 4.0, 3)

    ours = gen.sample_latents(setup, z, y)
    with torch.no_grad():
        ref = sample_ode(plain, z, y, num_steps=10, timestep_shift=0.3, cfg_scale=1.0)
    assert (ours - ref).abs().max() < 1e-5


@pytest.mark.slow
def test_compiled_model_agrees_with_eager(prepared, reference_run, tmp_path):
    env, config = prepared
    out = tmp_path / "compiled"
    assert_ok(step4([*fid_args(config, out), "--compile"], env, timeout=900))
    with np.load(out / "samples.npz") as a, np.load(reference_run / "samples.npz") as b:
        x, y = a["arr_0"].astype(np.int16), b["arr_0"].astype(np.int16)
    assert np.abs(x - y).max() <= 1 and (x != y).mean() < 0.01


@pytest.mark.gpu
def test_gpu_half_precision_and_batch_from_free_memory(prepared, reference_run, tmp_path):
    env, config = prepared
    out = tmp_path / "gpu"
    proc = step4([*fid_args(config, out, batch="auto"), "--precision", "auto", "--device", "cuda"], env)
    assert_ok(proc)
    assert "batch size" in proc.stdout and "free" in proc.stdout  # chosen from free GPU memory
    assert ("bf16" if torch.cuda.is_bf16_supported() else "fp16") in proc.stdout
    with np.load(out / "samples.npz") as a, np.load(reference_run / "samples.npz") as b:
        x, y = a["arr_0"].astype(np.int16), b["arr_0"].astype(np.int16)
        assert np.array_equal(a["arr_1"], b["arr_1"])
    assert np.abs(x - y).mean() < 8  # half-precision transformer, fp32 decode: close to the CPU fp32 images


def test_vae_decode_precision_check_runs(prepared):
    """benchmarks/check_vae_decode.py (the +-1 level check for a half-precision decode) on the tiny files."""
    env, config = prepared
    proc = subprocess.run([sys.executable, "benchmarks/check_vae_decode.py", "--config", config, "--num", "3",
                           "--batch", "2", "--precision", "bf16", "--no-record"], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stderr
    assert "| bf16 |" in proc.stdout and "max level diff" in proc.stdout and "-> " in proc.stdout
