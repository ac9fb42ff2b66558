"""Sampling (step 4): the per-image plan, the engine, the background PNG writer, the npz packer and grids.

    from repro.sampling import build_sampler, run_sampling, pack_npz, save_grid, show_samples

Modules: `plan` (what image i is), `engine` (model + VA-VAE + statistics, one batch of latents,
decoding), `run` (a whole resumable run), `writer` (PNGs and samples.npz), `grid` (figures).
"""

from repro.sampling.engine import (SamplerSetup, auto_batch_size, build_sampler, decode_to_uint8, sample_latents,
                                   sampler_from_parts)
from repro.sampling.grid import load_images, make_grid, save_grid, show_samples
from repro.sampling.plan import (DEMO_LABELS, batch_indices, batch_noise, demo_labels, image_noise, my_batches,
                                 plan_labels)
from repro.sampling.run import default_out_dir, run_sampling
from repro.sampling.writer import ImageWriter, pack_npz, read_png, write_png

__all__ = [
    "SamplerSetup", "auto_batch_size", "build_sampler", "decode_to_uint8", "sample_latents", "sampler_from_parts",
    "load_images", "make_grid", "save_grid", "show_samples", "DEMO_LABELS", "batch_indices", "batch_noise",
    "demo_labels", "image_noise", "my_batches", "plan_labels", "default_out_dir", "run_sampling", "ImageWriter",
    "pack_npz", "read_png", "write_png",
]
