"""The kit's presets and asset manifest; `pip install` ships this folder as the package data `repro.configs`."""
