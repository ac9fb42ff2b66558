"""repro: a reproduction kit for LightningDiT (VA-VAE f16d32 + LightningDiT-XL/1, flow matching)."""

__version__ = "0.1.0"

# Where a notebook opened on its own (Colab, Kaggle, an uploaded .ipynb) installs the kit from: the
# default of every notebook's `kit_source` parameter (any `pip install` argument works there: a git URL,
# a local checkout, a wheel). PLACEHOLDER until the project's public repository is fixed: the team lead
# sets the real URL here and rebuilds the notebooks (python notebooks/build_all.py). Its presence also marks
# this kit: the notebooks' set-up cell refuses a `repro` package without it (another project's).
KIT_SOURCE = "git+https://github.com/hustvl-repro/repro-kit.git"

# The distribution pip knows the kit by (pyproject.toml's `name`; the import names are `repro` and `steps`).
DISTRIBUTION = "repro-latent-kit"


def __getattr__(name: str):
    """`from repro import Pipeline` loads repro.api on first use, so `import repro` stays light (no torch)."""
    if name == "Pipeline":
        from repro.api import Pipeline

        return Pipeline
    raise AttributeError(f"module 'repro' has no attribute {name!r}")
