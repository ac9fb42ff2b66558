"""What the kit asks of its users' environments: the distribution name, third-party imports against the
declared dependencies (core and per-feature extras), version floors of the torch features the kit uses,
and the LPIPS weights from a pinned, hashed source built on torchvision's own VGG16."""

from __future__ import annotations

import re

import torch
import yaml

from repro.tokenizer.lpips import LPIPS_HEADS_SHA256, VGG16Features
from tests.conftest import PROJECT_ROOT


def test_lpips_heads_are_pinned_to_a_commit_with_their_sha256():
    assets = yaml.safe_load((PROJECT_ROOT / "configs" / "assets.yaml").read_text())["assets"]
    heads = assets["lpips-vgg-heads"]
    assert re.fullmatch(r"https://raw\.githubusercontent\.com/richzhang/PerceptualSimilarity/[0-9a-f]{40}/"
                        r"lpips/weights/v0\.1/vgg\.pth", heads["url"]), heads["url"]
    assert heads["sha256"] == LPIPS_HEADS_SHA256 and heads["size"] == 7289


def test_lpips_trunk_is_torchvisions_vgg16_features_with_the_same_keys():
    from torchvision.models import vgg16

    with torch.device("meta"):
        ours, theirs = VGG16Features(), vgg16(weights=None)
    wanted = {k: tuple(v.shape) for k, v in theirs.state_dict().items() if k.startswith("features.")}
    assert {k: tuple(v.shape) for k, v in ours.state_dict().items()} == wanted  # 13 convolutions, 26 tensors
    assert len(wanted) == 26 and not any(getattr(m, "inplace", False) for m in ours.features)
