"""Step 8: metrics against closed forms, the pipeline end to end on tiny images, bad inputs, the notebook.

The Inception used here is torch-fidelity's network with random (He-initialised) weights that the test
writes in torch-fidelity's file format; the real 2015-12-05 weights cannot be fetched in CI.
"""

from __future__ import annotations

import io
import json
import math
import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from repro.errors import ReproError
from repro.evaluation import feature_statistics, frechet_distance, inception_score, precision_recall
from repro.evaluation.evaluate import check_reference, compare_to_paper, evaluate
from repro.evaluation.features import InceptionExtractor, sha256_file
from repro.evaluation.image_batches import ImageBatches
from tests.conftest import PROJECT_ROOT

N_IMAGES, SIZE = 8, 32


# ------------------------------------------------------------------------------------------------
# Fréchet distance


def _random_spd(rng, d, cond=100.0):
    q, _ = np.linalg.qr(rng.standard_normal((d, d)))
    return (q * np.geomspace(1.0, 1.0 / cond, d)) @ q.T


def test_frechet_equals_closed_form_for_diagonal_gaussians():
    rng = np.random.default_rng(0)
    mu1, mu2 = rng.standard_normal(50), rng.standard_normal(50)
    a, b = rng.uniform(0.1, 3, 50), rng.uniform(0.1, 3, 50)
    expected = np.sum((mu1 - mu2) ** 2) + np.sum((np.sqrt(a) - np.sqrt(b)) ** 2)
    assert frechet_distance(mu1, np.diag(a), mu2, np.diag(b)) == pytest.approx(expected, rel=1e-12)


def test_frechet_matches_high_precision_reference():
    """Reference: mpmath at 30 significant digits, through the *other* formula tr(sqrtm(S1 S2))
    (a Denman-Beavers square root of the non-symmetric product), so it shares no code path with ours."""
    mp = pytest.importorskip("mpmath")
    mp.mp.dps = 30
    rng = np.random.default_rng(1)
    for d in (3, 6, 10):
        s1, s2 = _random_spd(rng, d, 1e3), _random_spd(rng, d, 1e2)
        mu1, mu2 = rng.standard_normal(d), rng.standard_normal(d)
        prod = mp.matrix(s1.tolist()) * mp.matrix(s2.tolist())
        root = mp.sqrtm(prod)
        tr_sqrt = sum(root[i, i] for i in range(d))
        assert abs(mp.im(tr_sqrt)) < mp.mpf(10) ** -30  # real up to the working precision
        ref = (sum((mp.mpf(a) - mp.mpf(b)) ** 2 for a, b in zip(mu1, mu2)) + sum(mp.mpf(x) for x in np.diag(s1))
               + sum(mp.mpf(x) for x in np.diag(s2)) - 2 * mp.re(tr_sqrt))
        assert frechet_distance(mu1, s1, mu2, s2) == pytest.approx(float(ref), rel=1e-6)
    # and a 256-d well-conditioned case against scipy.linalg.sqrtm in float64 (accurate at cond 10)
    scipy_linalg = pytest.importorskip("scipy.linalg")
    s1, s2 = _random_spd(rng, 256, 10.0), _random_spd(rng, 256, 10.0)
    mu1, mu2 = rng.standard_normal(256), rng.standard_normal(256)
    ref = (mu1 - mu2) @ (mu1 - mu2) + np.trace(s1) + np.trace(s2) - 2 * np.trace(scipy_linalg.sqrtm(s1 @ s2).real)
    assert frechet_distance(mu1, s1, mu2, s2) == pytest.approx(ref, rel=1e-6)


def test_frechet_identical_statistics_give_zero():
    rng = np.random.default_rng(2)
    for sigma in (_random_spd(rng, 64, 1e4), np.cov(rng.standard_normal((10, 64)), rowvar=False)):
        mu = rng.standard_normal(64)
        assert abs(frechet_distance(mu, sigma, mu, sigma)) <= 1e-9 * np.trace(sigma)


def test_frechet_near_singular_covariances_are_finite():
    rng = np.random.default_rng(3)
    x, y = rng.standard_normal((6, 128)), rng.standard_normal((9, 128)) + 0.5  # rank 5 and 8 in 128-d
    s1, s2 = np.cov(x, rowvar=False), np.cov(y, rowvar=False)
    d = frechet_distance(x.mean(0), s1.astype(np.float32), y.mean(0), s2.astype(np.float32))
    assert math.isfinite(d) and d > 0
    tiny = np.diag(np.geomspace(1.0, 1e-15, 32))  # condition number 1e15
    assert math.isfinite(frechet_distance(np.zeros(32), tiny, np.ones(32), np.eye(32)))


def test_frechet_rejects_bad_statistics():
    with pytest.raises(ReproError, match="differ in length"):
        frechet_distance(np.zeros(3), np.eye(3), np.zeros(4), np.eye(4))
    with pytest.raises(ReproError, match="sigma2 has 1 non-finite"):
        bad = np.eye(3)
        bad[0, 0] = np.nan
        frechet_distance(np.zeros(3), np.eye(3), np.zeros(3), bad)
    with pytest.raises(ReproError, match="not a covariance"):
        frechet_distance(np.zeros(2), np.eye(2), np.zeros(2), np.array([[1.0, 0.0], [0.0, -1.0]]))


# ------------------------------------------------------------------------------------------------
# Inception Score and precision/recall


def test_inception_score_equals_the_formula():
    # one-hot over 10 classes, every class once per split: KL = log 10 in every row, so IS = 10
    probs = np.tile(np.eye(10), (2, 1))
    assert inception_score(probs, splits=2) == pytest.approx(10.0, rel=1e-12)
    assert inception_score(np.zeros((7, 5)), splits=1) == pytest.approx(1.0, abs=1e-12)  # uniform
    logits = np.random.default_rng(4).standard_normal((30, 12)) * 3
    p = np.exp(logits) / np.exp(logits).sum(1, keepdims=True)
    expected = []
    for chunk in (p[0:10], p[10:20], p[20:30]):
        kl = (chunk * (np.log(chunk) - np.log(chunk.mean(0, keepdims=True)))).sum(1).mean()
        expected.append(np.exp(kl))
    assert inception_score(logits, splits=3) == pytest.approx(np.mean(expected), rel=1e-10)
    assert inception_score(logits, split_size=10) == pytest.approx(np.mean(expected), rel=1e-10)  # ADM style
    assert inception_score(p, splits=3) == pytest.approx(np.mean(expected), rel=1e-10)  # probabilities in
    assert math.isfinite(inception_score(np.array([[1.0, 0.0], [0.0, 1.0]]), splits=1))  # 0 log 0 = 0


def test_feature_statistics_match_numpy_cov():
    x = np.random.default_rng(6).standard_normal((50, 7)).astype(np.float32) + 3.0
    mu, sigma = feature_statistics(x, chunk=16)  # several chunks
    np.testing.assert_allclose(mu, x.astype(np.float64).mean(0), rtol=1e-12)
    np.testing.assert_allclose(sigma, np.cov(x.astype(np.float64), rowvar=False), rtol=1e-12)


def test_precision_recall_on_hand_computed_clouds():
    # points on a line (as 2-d vectors); squared 3rd-nearest-neighbour radii worked out by hand:
    #   real 0, 1, 2, 3, 10          -> 9, 4, 4, 9, 81
    #   fake .5, .6, .7, .8, 20, 30  -> .09, .04, .04, .09, 19.3^2 (372.49), 29.3^2 (858.49)
    real = np.array([[x, 0.0] for x in (0, 1, 2, 3, 10)])
    fake = np.array([[x, 0.0] for x in (0.5, 0.6, 0.7, 0.8, 20, 30)])
    # precision: 20 and 30 lie outside every real ball (to 10: 100 > 81, 400 > 81)        -> 4/6
    # recall: real 0 lies outside every fake ball (.25 > .09, 400 > 372.49, 900 > 858.49) -> 4/5
    assert precision_recall(real, fake, k=3) == pytest.approx((4 / 6, 4 / 5))
    # swapping the roles swaps the numbers
    assert precision_recall(fake, real, k=3) == pytest.approx((4 / 5, 4 / 6))


def test_precision_recall_is_blocking_invariant_and_matches_brute_force():
    rng = np.random.default_rng(5)
    real, fake = rng.standard_normal((41, 6)), rng.standard_normal((37, 6)) * 1.3 + 0.2
    d_rr = ((real[:, None] - real[None]) ** 2).sum(-1)
    d_ff = ((fake[:, None] - fake[None]) ** 2).sum(-1)
    d_rf = ((real[:, None] - fake[None]) ** 2).sum(-1)
    r_real, r_fake = np.sort(d_rr, 1)[:, 3], np.sort(d_ff, 1)[:, 3]
    expected = ((d_rf <= r_real[:, None]).any(0).mean(), (d_rf <= r_fake[None]).any(1).mean())
    assert precision_recall(real, fake, batch_size=7) == pytest.approx(expected)
    assert precision_recall(real, fake, batch_size=1000) == pytest.approx(expected)
    with pytest.raises(ReproError, match="needs more than 3"):
        precision_recall(real[:3], fake)


# ------------------------------------------------------------------------------------------------
# The pipeline on tiny images, with a random-weights Inception in torch-fidelity's file format


def write_random_inception(path, seed=0):
    """torch-fidelity's state-dict keys and shapes, He-initialised so activations keep their scale."""
    from torch_fidelity.feature_extractor_inceptionv3 import FeatureExtractorInceptionV3

    class Skeleton(FeatureExtractorInceptionV3):
        def load_state_dict(self, state_dict, strict=True):  # keep the fresh modules: we only want names/shapes
            return None

    empty = io.BytesIO()
    torch.save({}, empty)
    empty.seek(0)
    shapes = {k: v.shape for k, v in Skeleton("skeleton", ["2048"], feature_extractor_weights_path=empty)
              .state_dict().items() if not k.endswith("num_batches_tracked")}  # the official file has none
    g = torch.Generator().manual_seed(seed)
    state = {}
    for k, shape in shapes.items():
        if k.endswith("conv.weight"):
            state[k] = torch.randn(shape, generator=g) * math.sqrt(2.0 / math.prod(shape[1:]))
        elif k == "fc.weight":
            state[k] = torch.randn(shape, generator=g) / math.sqrt(shape[1])
        elif k.endswith(("bn.weight", "running_var")):
            state[k] = torch.ones(shape)
        else:  # bn.bias, running_mean, fc.bias
            state[k] = torch.zeros(shape)
    torch.save(state, path)
    return path


def _images(seed, n=N_IMAGES, size=SIZE):
    rng = np.random.default_rng(seed)
    base = rng.integers(0, 256, (n, 1, 1, 3))  # a colour per image plus noise: features differ per image
    return np.clip(base + rng.normal(0, 40, (n, size, size, 3)), 0, 255).astype(np.uint8)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """Weights, a reference batch (images + statistics of their own features) and samples in 3 forms."""
    root = tmp_path_factory.mktemp("eval")
    weights = write_random_inception(root / "weights-inception-random.pth")
    ref_images, samples = _images(1), _images(2)
    feats = InceptionExtractor(weights, device="cpu")(ref_images)
    stats = {}
    for key, feat in (("", "pool"), ("_s", "spatial")):
        stats["mu" + key], stats["sigma" + key] = feats[feat].mean(0), np.cov(feats[feat], rowvar=False)
    refdir = root / "ref"
    refdir.mkdir()
    np.savez(refdir / "ref.npz", arr_0=ref_images, **stats)
    np.savez(root / "samples.npz", arr_0=samples)
    np.savez_compressed(root / "samples_compressed.npz", arr_0=samples)
    np.savez(root / "ref_images_as_samples.npz", arr_0=ref_images)
    (root / "folder").mkdir()
    for i, img in enumerate(samples):
        Image.fromarray(img).save(root / "folder" / f"{i:06d}.png")
    return {"root": root, "weights": weights, "ref": refdir / "ref.npz", "samples": samples}


@pytest.fixture
def no_network(monkeypatch, tmp_path):
    def refuse(*args, **kwargs):
        raise AssertionError(f"network access attempted: {args}")
    monkeypatch.setattr(socket, "create_connection", refuse)
    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "empty_torch_home"))  # no cached hub weights either


def test_sources_stream_the_same_pixels(tiny):
    """Stored npz (memory-mapped), compressed npz (zip stream) and PNG folder, any slice, any batch."""
    root, expected = tiny["root"], tiny["samples"]
    for name in ("samples.npz", "samples_compressed.npz", "folder"):
        src = ImageBatches.open(root / name)
        assert (src.num_images, src.height, src.width) == (N_IMAGES, SIZE, SIZE)
        if src.kind == "npz":  # stored members are memory-mapped, compressed ones streamed
            assert (src.member.data_offset is None) == (name == "samples_compressed.npz")
        got = np.concatenate(list(src.iter_batches(3, 8, batch_size=2)))
        np.testing.assert_array_equal(got, expected[3:8])


def test_pipeline_streams_npz_and_folder_to_the_same_result(tiny, no_network, capsys):
    root, ref, kw = tiny["root"], tiny["ref"], dict(weights_path=tiny["weights"], batch_size=3, device="cpu")
    by_npz = evaluate(root / "samples.npz", ref, out=root / "m_npz.json", **kw)
    cache = list(ref.parent.glob("ref.pool3-*.npz"))
    assert len(cache) == 1, "reference features are cached next to the reference file"
    stamp = cache[0].stat().st_mtime_ns
    capsys.readouterr()
    by_folder = evaluate(root / "folder", ref, out=root / "m_folder.json", **kw)
    assert "reference features: cached" in capsys.readouterr().out and cache[0].stat().st_mtime_ns == stamp
    for name in ("fid", "sfid", "is", "prec", "recall"):
        assert math.isfinite(by_npz[name])
        assert by_folder[name] == pytest.approx(by_npz[name], rel=1e-6, abs=1e-9)
    assert by_npz["fid"] > 1e-3 and by_npz["sfid"] > 1e-3  # different images, a non-trivial network
    record = json.loads((root / "m_npz.json").read_text())
    assert record["num_samples"] == N_IMAGES and record["fid"] == by_npz["fid"]
    assert record["feature_extractor"]["weights_sha256"] == sha256_file(tiny["weights"])
    assert record["reference_sha256"] == sha256_file(ref) and record["sampler"] is None


def test_reference_images_scored_against_themselves(tiny, no_network):
    root = tiny["root"]
    r = evaluate(root / "ref_images_as_samples.npz", tiny["ref"], "fid,prec,recall", weights_path=tiny["weights"],
                 batch_size=4, device="cpu", out=root / "self.json")
    assert abs(r["fid"]) < 1e-6 and r["prec"] == 1.0 and r["recall"] == 1.0


def test_step_reads_assets_json_and_records_the_sampler_config(tiny, tmp_path):
    from repro.config import Config, save_config
    from repro.paths import assets_json
    from steps.step8_evaluate import cli

    run = tmp_path / "run"
    shutil.copytree(tiny["root"] / "folder", run / "images")
    save_config(Config(), run / "config.yaml")
    with pytest.raises(SystemExit):
        cli(["--samples", str(run / "images"), "--metrics", "fid"])  # no assets.json yet
    assets_json().parent.mkdir(parents=True, exist_ok=True)
    assets_json().write_text(json.dumps({"assets": {
        "adm-ref-imagenet256": {"path": str(tiny["ref"])},
        "fid-inception": {"path": str(tiny["weights"]), "sha256": sha256_file(tiny["weights"])}}}))
    result = cli(["--samples", str(run), "--metrics", "is,prec", "--batch-size", "4", "--device", "cpu"])
    assert set(result) >= {"is", "prec"} and not {"fid", "sfid", "recall"} & set(result)
    record = json.loads((run / "metrics.json").read_text())
    assert record["sampler"]["sample"]["num_sampling_steps"] == Config().sample.num_sampling_steps
    table = compare_to_paper(result)
    assert "LightningDiT-XL/1 800ep" in table and "1.350" in table and "295.3" in table


# ------------------------------------------------------------------------------------------------
# Step 4's run folder as is, and the user's own images as the reference (issue 12)


def test_step4_run_folder_is_taken_as_is(tiny, no_network, tmp_path):
    """images/, samples.npz, an RGBA preview.png, demo_samples.png, config.yaml, run.json: as step 4 leaves it."""
    from repro.config import Config, save_config

    run = tmp_path / "run"
    shutil.copytree(tiny["root"] / "folder", run / "images")
    shutil.copy(tiny["root"] / "samples.npz", run / "samples.npz")
    Image.fromarray(np.zeros((20, 30, 4), np.uint8), "RGBA").save(run / "preview.png")
    Image.fromarray(np.zeros((SIZE, 4 * SIZE, 3), np.uint8)).save(run / "demo_samples.png")
    save_config(Config(), run / "config.yaml")
    (run / "run.json").write_text(json.dumps({"num_samples": N_IMAGES}))
    kw = dict(metrics="is", weights_path=tiny["weights"], batch_size=4, device="cpu")  # IS: no 2048-d matrix roots
    by_npz = evaluate(run, tiny["ref"], **kw)
    assert by_npz["samples"] == str(run / "samples.npz") and by_npz["metrics_json"] == str(run / "metrics.json")
    (run / "samples.npz").unlink()  # a demo run has no npz: its complete images/ folder is used
    by_folder = evaluate(run, tiny["ref"], **kw)
    assert by_folder["samples"] == str(run / "images") and by_folder["is"] == pytest.approx(by_npz["is"], rel=1e-6)
    (run / "run.json").write_text(json.dumps({"num_samples": N_IMAGES + 2}))  # an interrupted run
    with pytest.raises(ReproError, match=rf"{run} holds {N_IMAGES} of {N_IMAGES + 2} images .* run the same step 4 "
                                         rf"command again .* or pass --samples {run / 'images'}"):
        evaluate(run, tiny["ref"], **kw)


def test_own_images_as_reference_computed_once_and_cached(tiny, no_network, tmp_path):
    root, kw = tiny["root"], dict(weights_path=tiny["weights"], batch_size=3, device="cpu")
    with np.load(tiny["ref"]) as z:
        ref_images, adm_stats = z["arr_0"], {k: z[k] for k in ("mu", "sigma", "mu_s", "sigma_s")}
    # an npz holding only images = the ADM batch, whose statistics the fixture computed from those images
    np.savez(tmp_path / "my_images.npz", arr_0=ref_images)
    adm = evaluate(root / "samples.npz", tiny["ref"], "fid,prec,recall", out=tmp_path / "adm.json", **kw)
    mine = evaluate(root / "samples.npz", tmp_path / "my_images.npz", "fid,prec,recall", out=tmp_path / "m.json", **kw)
    for name in ("fid", "prec", "recall"):
        assert mine[name] == pytest.approx(adm[name], rel=1e-5, abs=1e-6), name
    assert mine["reference_kind"] == "images" and mine["reference_images_extracted"] == N_IMAGES
    with np.load(mine["reference_cache"]) as cache:  # sFID's statistics too, as ADM's batch holds them
        for key, value in adm_stats.items():
            np.testing.assert_allclose(cache[key], value, rtol=1e-4, atol=1e-5 * np.abs(value).max(), err_msg=key)
    again = evaluate(root / "samples.npz", tmp_path / "my_images.npz", "prec,recall", out=tmp_path / "m.json", **kw)
    assert again["reference_images_extracted"] == 0 and again["prec"] == mine["prec"]  # no feature extraction

    # a folder of JPEGs of another size (e.g. read-only, so the cache goes to --cache-dir): ADM's centre crop
    photos = tmp_path / "photos"
    folder = photos / "class_a"
    folder.mkdir(parents=True)
    for i, img in enumerate(_images(3, n=6, size=48)):
        Image.fromarray(img).save(folder / f"{i}.jpg", quality=95)
    (folder / "notes.txt").write_text("not an image")
    args = dict(cache_dir=tmp_path / "cache", out=tmp_path / "p.json", **kw)
    first = evaluate(root / "folder", photos, "prec,recall", **args)
    assert first["reference_images_extracted"] == 6 and "ADM centre crop to 32x32" in first["reference_preprocessing"]
    assert Path(first["reference_cache"]).parent == tmp_path / "cache" and not list(tmp_path.glob("photos.*"))
    second = evaluate(root / "folder", photos, "prec,recall", **args)
    assert second["reference_images_extracted"] == 0 and second["recall"] == first["recall"]
    Image.fromarray(_images(4, n=1, size=40)[0]).save(folder / "new.png")  # the folder changed: computed again
    assert evaluate(root / "folder", photos, "prec,recall", **args)["reference_images_extracted"] == 7
    (folder / "broken.jpg").write_bytes(b"\xff\xd8 not a jpeg")
    with pytest.raises(ReproError, match=r"broken.jpg: unreadable reference image"):
        evaluate(root / "folder", photos, "prec", **args)


def test_step8_takes_runs_paths_and_an_image_folder_reference(tiny, tmp_path, monkeypatch):
    from repro.paths import runs_dir
    from steps.step8_evaluate import main

    monkeypatch.chdir(tmp_path)
    shutil.copytree(tiny["root"] / "folder", runs_dir() / "samples" / "mine")
    refs = runs_dir() / "my_ref"
    refs.mkdir(parents=True)
    with np.load(tiny["ref"]) as z:  # the ADM batch's images as PNG files: the same precision and recall
        for i, img in enumerate(z["arr_0"]):
            Image.fromarray(img).save(refs / f"{i:03d}.png")
    result = main(samples="runs:samples/mine", ref="runs:my_ref", metrics="prec,recall", weights=str(tiny["weights"]),
                  batch_size=4, device="cpu", out="runs:m.json")
    assert (runs_dir() / "m.json").is_file() and result["reference_kind"] == "images"
    assert result["reference_preprocessing"].startswith("none") or "crop" in result["reference_preprocessing"]
    adm = evaluate(tiny["root"] / "folder", tiny["ref"], "prec,recall", weights_path=tiny["weights"], batch_size=4,
                   device="cpu", out=tmp_path / "adm.json")
    assert (result["prec"], result["recall"]) == (adm["prec"], adm["recall"])
    assert not any(p.name.startswith("runs:") for p in tmp_path.iterdir())


# ------------------------------------------------------------------------------------------------
# Wrong inputs


class NotATensor:
    """Pickled by reference: a weights_only load must refuse it."""


def test_wrong_inputs_give_clear_errors(tiny, tmp_path):
    ref, kw = tiny["ref"], dict(weights_path=tiny["weights"], device="cpu")
    cases = {
        "no_arr0.npz": ({"images": tiny["samples"]}, r"no_arr0.npz: no 'arr_0'"),
        "float.npz": ({"arr_0": tiny["samples"].astype(np.float32)}, r"dtype float32.*uint8"),
        "rgba.npz": ({"arr_0": np.zeros((4, SIZE, SIZE, 4), np.uint8)}, r"expected N x H x W x 3"),
        "nchw.npz": ({"arr_0": np.zeros((4, 3, SIZE, SIZE), np.uint8)}, r"channels-first"),
        "small.npz": ({"arr_0": np.zeros((4, 16, 16, 3), np.uint8)}, r"samples are 16x16 .* 32x32"),
    }
    for name, (arrays, message) in cases.items():
        np.savez(tmp_path / name, **arrays)
        with pytest.raises(ReproError, match=message):
            evaluate(tmp_path / name, ref, **kw)
    good = tiny["root"] / "samples.npz"
    np.savez(tmp_path / "labels_only.npz", arr_1=np.arange(4))  # neither statistics nor images (an npz of
    with pytest.raises(ReproError, match=r"labels_only.npz: no 'arr_0'"):  # images only is a reference: see above)
        evaluate(good, tmp_path / "labels_only.npz", **kw)
    with np.load(ref) as z:
        np.savez(tmp_path / "fid_only.npz", arr_0=z["arr_0"], mu=z["mu"], sigma=z["sigma"])
    check_reference(tmp_path / "fid_only.npz", ("fid", "prec"), ImageBatches.open(good))  # no sFID: mu_s not needed
    with pytest.raises(ReproError, match=r"no 'mu_s' \(needed for sfid"):
        evaluate(good, tmp_path / "fid_only.npz", metrics="fid,sfid", **kw)
    with pytest.raises(ReproError, match=r"weights-inception-random.pth: sha256 [0-9a-f]{64} does not match the expected 0{64}"):
        evaluate(good, ref, weights_sha256="0" * 64, **kw)
    torch.save({"fc.weight": torch.zeros(3)}, tmp_path / "other.pth")
    with pytest.raises(ReproError, match=r"other.pth: not torch-fidelity's InceptionV3 weights"):
        InceptionExtractor(tmp_path / "other.pth", device="cpu")
    torch.save({"payload": NotATensor()}, tmp_path / "code.pth")
    with pytest.raises(ReproError, match=r"code.pth: not a loadable weights file"):
        InceptionExtractor(tmp_path / "code.pth", device="cpu")
    with pytest.raises(ReproError, match="unknown metric"):
        evaluate(good, ref, metrics="fid,kid", **kw)
    folder = tmp_path / "pngs"
    folder.mkdir()
    Image.fromarray(tiny["samples"][0]).save(folder / "000000.png")
    Image.fromarray(tiny["samples"][1][:16, :16]).save(folder / "000001.png")
    with pytest.raises(ReproError, match=r"000001.png: image is 16x16"):
        evaluate(folder, ref, metrics="fid", batch_size=4, **kw)
    Image.fromarray(np.zeros((SIZE, SIZE, 4), np.uint8), "RGBA").save(folder / "000000.png")
    with pytest.raises(ReproError, match=r"000000.png: image mode RGBA"):
        evaluate(folder, ref, **kw)


# ------------------------------------------------------------------------------------------------
# Notebook and torchrun


def test_notebook_runs_under_papermill(tiny, tmp_path, python3_kernel):
    import nbformat
    import papermill

    source = PROJECT_ROOT / "notebooks" / "03_evaluate.ipynb"
    nb = nbformat.read(source, as_version=4)
    assert all(not c.get("outputs") for c in nb.cells if c.cell_type == "code"), "commit the notebook without outputs"
    assert any("parameters" in c.metadata.get("tags", []) for c in nb.cells)
    out_json = tmp_path / "nb_metrics.json"
    papermill.execute_notebook(
        str(source), str(tmp_path / "out.ipynb"), kernel_name=python3_kernel, cwd=str(PROJECT_ROOT),
        parameters={"samples": str(tiny["root"] / "samples.npz"), "ref": str(tiny["ref"]),
                    "weights": str(tiny["weights"]), "metrics": "fid,is,prec,recall", "batch_size": 3,
                    "out": str(out_json), "device": "cpu", "workdir": str(tmp_path / "work")}, progress_bar=False)
    record = json.loads(out_json.read_text())
    # same images, same network: the same numbers as an in-process run made here (not another test's file)
    direct = evaluate(tiny["root"] / "samples.npz", tiny["ref"], "fid,is,prec,recall", weights_path=tiny["weights"],
                      batch_size=3, device="cpu", out=tmp_path / "direct.json")
    assert record["num_samples"] == N_IMAGES and math.isfinite(record["fid"])
    for name in ("fid", "is", "prec", "recall"):
        assert record[name] == pytest.approx(direct[name], rel=1e-4, abs=1e-9), name
    # the notebook printed this run's row of the comparison table
    printed = "".join(o.get("text", "") for c in nbformat.read(tmp_path / "out.ipynb", as_version=4).cells
                      if c.cell_type == "code" for o in c.get("outputs", []) if o.get("output_type") == "stream")
    assert compare_to_paper(record).splitlines()[1] in printed


@pytest.mark.slow
def test_torchrun_two_processes_match_one(tiny, tmp_path):
    out1, out2 = tmp_path / "one.json", tmp_path / "two.json"
    base = ["--samples", str(tiny["root"] / "samples.npz"), "--ref", str(tiny["ref"]), "--weights",
            str(tiny["weights"]), "--batch-size", "3", "--device", "cpu"]
    env = {**os.environ, "PYTHONPATH": str(PROJECT_ROOT), "OMP_NUM_THREADS": "1"}
    subprocess.run([sys.executable, "-m", "steps.step8_evaluate", *base, "--out", str(out1)],
                   cwd=PROJECT_ROOT, env=env, check=True)
    subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                    "-m", "steps.step8_evaluate", *base, "--out", str(out2)], cwd=PROJECT_ROOT, env=env, check=True)
    one, two = json.loads(out1.read_text()), json.loads(out2.read_text())
    assert two["world_size"] == 2
    for name in ("fid", "sfid", "is", "prec", "recall"):
        assert two[name] == pytest.approx(one[name], rel=1e-5, abs=1e-9)


# ------------------------------------------------------------------------------------------------
# sFID's spatial features in ADM's layout (issue 17)


def test_spatial_features_are_mixed_6_conv_first_7_channels_flattened_nhwc(tiny):
    """ADM's evaluator takes TF's `mixed_6/conv` (NHWC), keeps [..., :7] and reshapes each image to one row.
    Computed here independently: torch-fidelity's Mixed_6d output (its first 192 channels are the
    branch1x1 conv that TF names mixed_6/conv), channels 0-6, transposed to NHWC in numpy, flattened."""
    from torch_fidelity.feature_extractor_inceptionv3 import FeatureExtractorInceptionV3

    images = tiny["samples"][:4]
    net = FeatureExtractorInceptionV3("inception-v3-compat", ["2048"],
                                      feature_extractor_weights_path=str(tiny["weights"])).eval()
    block: list[torch.Tensor] = []
    net.Mixed_6d.register_forward_hook(lambda m, i, o: block.append(o.detach()))
    with torch.no_grad():
        net(torch.from_numpy(images).permute(0, 3, 1, 2))
    mixed_6 = block[0].numpy()  # (N, 768, 17, 17): [branch1x1 | branch7x7 | branch7x7dbl | branch_pool]
    assert mixed_6.shape == (4, 768, 17, 17)
    expected = np.transpose(mixed_6[:, :7], (0, 2, 3, 1)).reshape(4, -1)  # (N, 17 * 17 * 7), H, W, C order
    got = InceptionExtractor(tiny["weights"], device="cpu")(images)["spatial"]
    assert got.shape == (4, 2023)
    np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-6)
    assert not np.allclose(got, mixed_6[:, :7].reshape(4, -1), rtol=1e-3)  # the NCHW order is another vector


def test_a_reference_folder_with_a_directory_loop_counts_each_image_once(tmp_path, capsys):
    """A link back into the reference folder (photos/a/loop -> ..) is not followed: 3 images stay 3."""
    folder = tmp_path / "photos" / "a"
    (tmp_path / "photos" / ".hidden").mkdir(parents=True)
    folder.mkdir()
    for i, img in enumerate(_images(5, n=3, size=SIZE)):
        Image.fromarray(img).save(folder / f"{i}.png")
    Image.fromarray(_images(6, n=1, size=SIZE)[0]).save(tmp_path / "photos" / ".hidden" / "x.png")
    (folder / "loop").symlink_to("..")
    src = ImageBatches.open_reference(tmp_path / "photos", SIZE, SIZE)
    assert src.num_images == 3 and "loop" in capsys.readouterr().out
