"""VA-VAE tokenizer: exact layout, exact function (upstream fixture), safe loading, image conversions."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file, save_file

from repro.errors import CheckpointError, ReproError
from repro.tokenizer.images import center_crop_arr, ensure_rgb, pil_to_tensor, to_uint8
from repro.tokenizer.vavae import (AttnBlock, AutoencoderKL, DiagonalGaussian, extract_inference_state_dict,
                                   load_vavae)
from tests.conftest import REFERENCE

MANIFEST = REFERENCE / "vavae_f16d32_state_dict.json"
FIXTURE = REFERENCE / "vae_ch32_f16d32.safetensors"


def rel_err(ours: torch.Tensor, ref: torch.Tensor) -> float:
    return ((ours - ref).norm() / ref.norm()).item()


@pytest.fixture(scope="module")
def fixture():
    tensors = load_file(str(FIXTURE))
    cfg = dict(json.loads(FIXTURE.with_suffix(".json").read_text())["model"])
    assert cfg.pop("double_z") is True  # the VA-VAE is always variational
    weights = {k[len("w."):]: v for k, v in tensors.items() if k.startswith("w.")}
    return cfg, weights, tensors


def small_state_dict(fixture) -> dict[str, torch.Tensor]:
    return dict(fixture[1])


# ---------------------------------------------------------------------------------------------
# layout and function


def test_official_layout_matches_manifest_key_for_key():
    manifest = json.loads(MANIFEST.read_text())
    with torch.device("meta"):
        model = AutoencoderKL()  # official defaults: ch 128, f16, 32 channels
    ours = {k: list(v.shape) for k, v in model.state_dict().items()}
    assert sorted(ours) == sorted(manifest["shapes"])
    assert ours == manifest["shapes"]
    assert len(ours) == 342
    assert sum(v.numel() for v in model.state_dict().values()) == manifest["num_params"] == 69_836_067


def _fixture_posterior(fixture):
    """The fixture's VA-VAE (strict load) and its posterior of `in.image`."""
    cfg, weights, tensors = fixture
    model = AutoencoderKL(**cfg).eval()
    model.load_state_dict(weights, strict=True)
    with torch.no_grad():
        return model, model.encode(tensors["in.image"])


def test_matches_upstream_encode_and_decode(fixture):
    tensors = fixture[2]
    model, posterior = _fixture_posterior(fixture)
    with torch.no_grad():
        decoded = model.decode(tensors["out.mean"])
    assert rel_err(posterior.mean, tensors["out.mean"]) < 1e-5
    assert rel_err(posterior.logvar, tensors["out.logvar"]) < 1e-5
    assert rel_err(decoded, tensors["out.decoded"]) < 1e-5
    assert torch.equal(posterior.mode(), posterior.mean)
    assert torch.allclose(posterior.std, torch.exp(0.5 * posterior.logvar))


def test_attention_matches_plain_computation():
    torch.manual_seed(0)
    block = AttnBlock(64).eval()
    x = torch.randn(2, 64, 16, 16)
    with torch.no_grad():
        h = block.norm(x)
        q, k, v = (p(h).flatten(2) for p in (block.q, block.k, block.v))  # (b, c, hw)
        weights = torch.softmax(torch.bmm(q.transpose(1, 2), k) * 64 ** -0.5, dim=2)  # (b, hw_q, hw_k)
        plain = x + block.proj_out(torch.bmm(v, weights.transpose(1, 2)).reshape(x.shape))
        assert rel_err(block(x), plain) < 1e-5


def test_posterior_clamps_logvar_and_samples_with_generator(fixture):
    _, posterior = _fixture_posterior(fixture)
    extreme = DiagonalGaussian(torch.cat([torch.zeros(1, 2, 1, 1), torch.tensor([-100.0, 100.0]).view(1, 2, 1, 1)], 1))
    assert extreme.logvar.flatten().tolist() == [-30.0, 20.0]
    a = posterior.sample(generator=torch.Generator().manual_seed(3))
    b = posterior.sample(generator=torch.Generator().manual_seed(3))
    c = posterior.sample(generator=torch.Generator().manual_seed(4))
    assert a.shape == posterior.mean.shape and torch.equal(a, b) and not torch.equal(a, c)
    eps = torch.randn(posterior.mean.shape, generator=torch.Generator().manual_seed(3))
    assert torch.allclose(a, posterior.mean + posterior.std * eps)


def test_bad_shapes_are_named():
    model = AutoencoderKL(ch=32).eval()
    with pytest.raises(ReproError, match=r"\(1, 3, 40, 40\)"):
        model.encode(torch.zeros(1, 3, 40, 40))
    with pytest.raises(ReproError, match=r"\(1, 16, 4, 4\)"):
        model.decode(torch.zeros(1, 16, 4, 4))
    with pytest.raises(ReproError, match="vae.ch=48"):
        AutoencoderKL(ch=48)


# ---------------------------------------------------------------------------------------------
# loading files in the official format


def official_style(weights: dict) -> dict:
    """What the official VA-VAE .pt holds: a Lightning `state_dict` wrapper with training-only extras."""
    extras = {
        "foundation_model.model.blocks.0.attn.qkv.weight": torch.randn(12, 4),
        "foundation_model.model.cls_token": torch.randn(1, 1, 4),
        "loss.discriminator.main.0.weight": torch.randn(8, 3, 4, 4),
        "loss.logvar": torch.zeros(()),
        "linear_proj.weight": torch.randn(4, 32, 1, 1),
    }
    return {"state_dict": {**weights, **extras}, "epoch": 49, "global_step": 123456}


def test_extract_keeps_inference_and_counts_dropped(fixture):
    kept, dropped = extract_inference_state_dict(official_style(small_state_dict(fixture)))
    assert dropped == 5
    assert sorted(kept) == sorted(fixture[1])


def test_load_official_style_pt(fixture, tmp_path, capsys):
    cfg, weights, tensors = fixture
    path = tmp_path / "vavae-imagenet256-f16d32-dinov2.pt"
    torch.save(official_style(small_state_dict(fixture)), path)
    model = load_vavae(path, ch=32)
    assert "dropped 5 training-only" in capsys.readouterr().out
    assert not model.training and not any(p.requires_grad for p in model.parameters())
    with torch.no_grad():
        decoded = model.decode(tensors["out.mean"])
    assert rel_err(decoded, tensors["out.decoded"]) < 1e-5


def test_load_safetensors_and_dtype(fixture, tmp_path):
    path = tmp_path / "vavae.safetensors"
    save_file(small_state_dict(fixture), str(path))
    model = load_vavae(path, ch=32, dtype=torch.float64)
    assert all(p.dtype == torch.float64 for p in model.parameters())


def test_missing_inference_key_is_named(fixture, tmp_path):
    sd = small_state_dict(fixture)
    del sd["decoder.up.2.block.1.conv2.weight"]
    path = tmp_path / "missing.pt"
    torch.save({"state_dict": sd}, path)
    with pytest.raises(CheckpointError, match=r"missing\.pt.*decoder\.up\.2\.block\.1\.conv2\.weight"):
        load_vavae(path, ch=32)


def test_wrong_width_names_the_shape(fixture, tmp_path):
    path = tmp_path / "small.pt"
    torch.save({"state_dict": small_state_dict(fixture)}, path)
    with pytest.raises(CheckpointError) as info:
        load_vavae(path, ch=64)  # the file is ch=32
    message = str(info.value)
    assert "small.pt" in message and "(32, 3, 3, 3)" in message and "(64, 3, 3, 3)" in message
    assert "ch=32" in message and "128 for the official VA-VAE" in message


def test_truncated_and_unsafe_files_fail_cleanly(fixture, tmp_path):
    good = tmp_path / "good.pt"
    torch.save({"state_dict": small_state_dict(fixture)}, good)
    truncated = tmp_path / "truncated.pt"
    truncated.write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    with pytest.raises(CheckpointError, match="truncated.pt"):
        load_vavae(truncated, ch=32)

    safe = tmp_path / "cut.safetensors"
    save_file(small_state_dict(fixture), str(safe))
    safe.write_bytes(safe.read_bytes()[:1000])
    with pytest.raises(CheckpointError, match="cut.safetensors"):
        load_vavae(safe, ch=32)

    unsafe = tmp_path / "code.pt"
    torch.save({"state_dict": small_state_dict(fixture), "hook": print}, unsafe)  # pickles a callable
    with pytest.raises(CheckpointError, match="code.pt"):
        load_vavae(unsafe, ch=32)

    with pytest.raises(CheckpointError, match="not found"):
        load_vavae(tmp_path / "absent.pt", ch=32)


# ---------------------------------------------------------------------------------------------
# images


def test_to_uint8_exact_values():
    # 127.5 * x + 128, clamped, truncated (upstream's +128, not +127.5)
    cases = {-1.5: 0, -1.0: 0, -1.0039: 0, 0.0: 128, 0.0078: 128, 0.0079: 129, -0.0078: 127,
             0.5: 191, -0.5: 64, 0.996: 254, 0.9961: 255, 1.0: 255, 1.7: 255}
    x = torch.tensor(list(cases), dtype=torch.float32).view(1, 1, 1, -1).expand(2, 3, 1, -1)
    out = to_uint8(x)
    assert out.dtype == torch.uint8 and out.device.type == "cpu" and out.shape == (2, 1, len(cases), 3)
    assert out[1, 0, :, 2].tolist() == list(cases.values())
    # half precision inputs are upcast: same pixels as float32 for values exact in half
    assert torch.equal(to_uint8(torch.tensor([0.5, -0.5]).half().view(1, 1, 1, 2)), to_uint8(x[:1, :1, :, 7:9]))
    with pytest.raises(ReproError):
        to_uint8(torch.zeros(3, 4, 4))


@pytest.mark.parametrize("size,target", [((256, 256), 256), ((300, 200), 256), ((1000, 600), 256),
                                         ((513, 2000), 256), ((64, 97), 32), ((10, 7), 16)])
def test_center_crop_arr_sizes(size, target):
    rng = np.random.default_rng(sum(size))
    image = Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8))
    out = center_crop_arr(image, target)
    assert out.size == (target, target) and out.mode == "RGB"


def test_center_crop_arr_is_identity_at_target_size_and_crops_centre():
    arr = np.random.default_rng(0).integers(0, 256, (32, 32, 3), dtype=np.uint8)
    assert np.array_equal(np.array(center_crop_arr(Image.fromarray(arr), 32)), arr)
    wide = np.zeros((32, 64, 3), dtype=np.uint8)
    wide[:, 16:48] = 200  # the central square
    assert (np.array(center_crop_arr(Image.fromarray(wide), 32)) == 200).all()


def test_pil_to_tensor_matches_totensor_normalize():
    arr = np.random.default_rng(1).integers(0, 256, (5, 7, 3), dtype=np.uint8)
    x = pil_to_tensor(Image.fromarray(arr))
    assert x.shape == (3, 5, 7) and x.dtype == torch.float32
    assert x.min() >= -1 and x.max() <= 1
    transforms = pytest.importorskip("torchvision.transforms")
    ref = transforms.Normalize([0.5] * 3, [0.5] * 3)(transforms.ToTensor()(Image.fromarray(arr)))
    assert torch.equal(x, ref)


def test_ensure_rgb_every_mode():
    def pixel(image):
        out = ensure_rgb(image)
        assert out.mode == "RGB" and out.size == image.size
        return tuple(int(v) for v in np.array(out)[0, 0])

    rgb = Image.new("RGB", (3, 2), (1, 2, 3))
    assert ensure_rgb(rgb) is rgb
    assert pixel(Image.new("L", (3, 2), 77)) == (77, 77, 77)
    assert pixel(Image.new("1", (3, 2), 1)) == (255, 255, 255)
    assert pixel(Image.new("LA", (3, 2), (77, 0))) == (77, 77, 77)  # alpha dropped
    assert pixel(Image.new("RGBA", (3, 2), (10, 20, 30, 0))) == (10, 20, 30)  # alpha dropped, not composited
    assert pixel(Image.new("CMYK", (3, 2), (0, 0, 0, 0))) == (255, 255, 255)
    assert pixel(Image.new("CMYK", (3, 2), (0, 255, 255, 0))) == (255, 0, 0)
    assert pixel(Image.new("I;16", (3, 2), 77)) == (77, 77, 77)
    palette = Image.new("P", (3, 2), 1)
    palette.putpalette([0, 0, 0, 10, 20, 30] + [0] * 762)
    assert pixel(palette) == (10, 20, 30)
    palette.info["transparency"] = 1  # palette with a transparent index
    assert pixel(palette) == (10, 20, 30)
    palette.info["transparency"] = bytes([255, 0] + [255] * 254)  # transparency as a bytes table
    assert pixel(palette) == (10, 20, 30)


def adm_center_crop_reference(image: Image.Image, size: int, resample=Image.BICUBIC, halve: bool = True,
                              rounding=round) -> Image.Image:
    """ADM's center crop (guided-diffusion image_datasets.py center_crop_arr) written from its definition
    with PIL only: halve with a box filter while the short side is >= 2 * size, resize the short side to
    `size` with bicubic (both sides scaled and rounded), cut the central square. The keyword arguments
    make the wrong variants the tests must tell apart."""
    while halve and min(image.size) >= 2 * size:
        image = image.resize((image.width // 2, image.height // 2), resample=Image.BOX)
    scale = size / min(image.size)
    image = image.resize((rounding(image.width * scale), rounding(image.height * scale)), resample=resample)
    left, top = (image.width - size) // 2, (image.height - size) // 2
    return image.crop((left, top, left + size, top + size))


def _photo_crop(box) -> Image.Image:
    from matplotlib import cbook

    with cbook.get_sample_data("grace_hopper.jpg") as f:
        return Image.open(f).convert("RGB").crop(box)


# (width, height) -> target: halving once and twice, upscaling, rounding that differs from truncation
# (333 x 250 -> 340.99 -> 341), odd sizes, portrait and landscape
ADM_CASES = [((512, 600), 256), ((1000, 600), 256), ((333, 250), 256), ((97, 64), 32), ((131, 517), 64),
             ((45, 30), 64), ((260, 256), 256)]


@pytest.mark.parametrize("size,target", ADM_CASES)
def test_center_crop_is_adms_definition_pixel_for_pixel(size, target):
    rng = np.random.default_rng(size[0] * 7 + size[1])
    noise = Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8))
    photo = _photo_crop((0, 0, min(size[0], 512), min(size[1], 600))).resize(size)
    for image in (noise, photo):
        ours = np.asarray(center_crop_arr(image, target))
        assert np.array_equal(ours, np.asarray(adm_center_crop_reference(image, target)))


def test_center_crop_reference_tells_the_wrong_variants_apart():
    """The reference check above fails for each plausible mistake (bilinear, no box halving, truncated sizes)."""
    rng = np.random.default_rng(5)
    found = {"bilinear": False, "no halving": False, "truncated sizes": False}
    for size, target in ADM_CASES:
        image = Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8))
        ours = np.asarray(center_crop_arr(image, target))
        wrong = {"bilinear": dict(resample=Image.BILINEAR), "no halving": dict(halve=False),
                 "truncated sizes": dict(rounding=int)}
        for name, kw in wrong.items():
            found[name] |= not np.array_equal(ours, np.asarray(adm_center_crop_reference(image, target, **kw)))
    assert all(found.values()), found
