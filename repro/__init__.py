"""repro: a reproduction kit for LightningDiT (VA-VAE f16d32 + LightningDiT-XL/1, flow matching)."""

__version__ = "0.1.0"
