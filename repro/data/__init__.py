"""Latent data: safetensors shards in the upstream layout, latent statistics, image sources, extraction."""
