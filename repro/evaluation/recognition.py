"""Do the samples look like your images? Notebook 04's check, offline on a CPU, in three parts.

1. Classification accuracy score (Ravuri & Vinyals 2019, read the other way round): a small convolutional
   classifier (`repro.evaluation.feature_classifier`) is trained on 80% of the real images (stratified,
   seeded); the share of samples it recognises as the class they were asked for is printed per class beside
   its accuracy on the other 20% of real images. The ratio sample share / real share is what to read:
   1.0 means the samples are as recognisable as real images of that class.
2. A distance on that network's features: Fréchet distance and KID between m samples and the classifier's
   real training images, beside the same distances for m held-out real images (the floor: what two real
   sets of that size differ by). An unconditional model (one class) gets the distances alone, with the
   network trained on the rotation pretext task.
3. Borders: per class, the mean and the spread of the outer pixel ring and the step from it to the next
   ring inward, averaged over the samples, must lie within the 5-95% range of the real images' values of
   that class, widened by 3 grey levels (a frame drawn at the image border puts the ring mean or the step
   tens of levels outside it; a tokenizer that blurs lowers the spread).

Inception FID (step 8) stays what it is, run when its weights are on disk.

    check = recognition_check("my_images", "runs/own/samples/samples.npz", image_size=32)
    check["recognised"], check["heldout_accuracy"], check["per_class"], check["distance"], check["border"]
"""

from __future__ import annotations

import os
from typing import Callable, Optional

import numpy as np

from repro.errors import ReproError

BORDER_RANGE = (5, 95)  # percentiles of the real images' per-image ring statistics
BORDER_MARGIN = 3.0  # grey levels (of 255) the range is widened by: near-constant borders (digits) give a range
# a grey level wide, which rounding alone leaves; a frame is tens of levels off


def folder_images(folder: str | os.PathLike, image_size: int) -> tuple[np.ndarray, np.ndarray, list[str]]:
    """(uint8 (N, S, S, 3), labels (N,), class names) of a class folder, centre-cropped as step 6 does;
    unreadable images are left out, named in one printed line."""
    from repro.data.image_loader import read_squares
    from repro.data.image_sources import list_images

    src = list_images(folder)
    if not src.class_names:
        raise ReproError(f"{folder} has no class sub-folders: the check needs one folder per class")
    images, labels, _ = read_squares(src, image_size, what="recognition check")
    if not images:
        raise ReproError(f"no image of {folder} can be read: the check needs readable real images")
    return np.stack(images), np.asarray(labels, dtype=np.int64), list(src.class_names)


def split(labels: np.ndarray, seed: int = 0, test_fraction: float = 0.2) -> tuple[np.ndarray, np.ndarray]:
    """(fit indices, held-out indices): stratified, at least one image of each class on each side."""
    rng = np.random.default_rng(seed)
    fit, held = [], []
    for c in np.unique(labels):
        idx = rng.permutation(np.flatnonzero(labels == c))
        if len(idx) < 2:
            raise ReproError(f"class {c} has {len(idx)} readable image(s): the check needs at least 2 per class "
                             "(one to train the classifier on, one to hold out)")
        k = min(max(1, int(round(test_fraction * len(idx)))), len(idx) - 1)
        held.append(idx[:k])
        fit.append(idx[k:])
    return np.sort(np.concatenate(fit)), np.sort(np.concatenate(held))


def per_class_share(hit: np.ndarray, labels: np.ndarray, num_classes: int) -> list[Optional[float]]:
    return [float(hit[labels == c].mean()) if (labels == c).any() else None for c in range(num_classes)]


def ring_statistics(images: np.ndarray) -> np.ndarray:
    """Per image (N, 3): the outer pixel ring's mean and spread (std) over its pixels and channels, and
    the mean absolute step from that ring to the next ring inward; uint8 images, values in 0..255."""
    x = images.astype(np.float64)

    def ring(a: np.ndarray) -> np.ndarray:  # (N, 4S - 4, 3): top, bottom, left and right edges
        return np.concatenate([a[:, 0], a[:, -1], a[:, 1:-1, 0], a[:, 1:-1, -1]], axis=1)

    outer, inner = ring(x), ring(x[:, 1:-1, 1:-1])
    outer_mean = outer.reshape(len(x), -1).mean(1)
    inner_mean = inner.reshape(len(x), -1).mean(1)
    return np.stack([outer_mean, outer.reshape(len(x), -1).std(1), np.abs(outer_mean - inner_mean)], axis=1)


def border_check(real: np.ndarray, real_labels: np.ndarray, fake: np.ndarray, fake_labels: np.ndarray,
                 num_classes: int) -> dict:
    """Per class: the samples' mean ring statistics against the real images' 5-95% range; 'ok' overall."""
    names = ("ring mean", "ring spread", "ring step")
    rs, fs = ring_statistics(real), ring_statistics(fake)
    rows, bad = [], []
    for c in range(num_classes):
        if not (fake_labels == c).any() or not (real_labels == c).any():
            rows.append(None)
            continue
        lo, hi = np.percentile(rs[real_labels == c], BORDER_RANGE, axis=0)
        lo, hi = lo - BORDER_MARGIN, hi + BORDER_MARGIN
        got = fs[fake_labels == c].mean(0)
        inside = [bool(lo[k] <= got[k] <= hi[k]) for k in range(3)]
        rows.append({n: {"samples": float(got[k]), "real_range": [float(lo[k]), float(hi[k])], "ok": inside[k]}
                     for k, n in enumerate(names)})
        bad += [f"class {c} {n} {got[k]:.0f} outside [{lo[k]:.0f}, {hi[k]:.0f}]" for k, n in enumerate(names)
                if not inside[k]]
    return {"per_class": rows, "ok": not bad, "problems": bad}


def distances(net, real_ref: np.ndarray, real_held: np.ndarray, fake: np.ndarray, seed: int = 0) -> dict:
    """Fréchet distance and KID on the classifier's features: m samples vs the reference, and the floor
    (m held-out real images vs the same reference), m = the smaller of the two sets."""
    from repro.evaluation.feature_classifier import features
    from repro.evaluation.metrics import feature_statistics, frechet_distance, kernel_distance

    rng = np.random.default_rng(seed)
    m = min(len(fake), len(real_held))
    if m < 2:
        return {"m": m, "fd": None, "fd_floor": None, "kid": None, "kid_floor": None}
    ref = features(net, real_ref)
    held = features(net, real_held[rng.choice(len(real_held), m, replace=False)])
    gen = features(net, fake[rng.choice(len(fake), m, replace=False)])
    mu_r, s_r = feature_statistics(ref)
    out = {"m": m}
    for key, f in (("fd", gen), ("fd_floor", held)):
        out[key] = float(frechet_distance(*feature_statistics(f), mu_r, s_r))
    out["kid"], out["kid_floor"] = kernel_distance(ref, gen, seed=seed), kernel_distance(ref, held, seed=seed)
    return out


def _load_samples(samples) -> tuple[np.ndarray, Optional[np.ndarray]]:
    if isinstance(samples, (str, os.PathLike)):
        with np.load(samples) as f:
            return f["arr_0"], (f["arr_1"].astype(np.int64) if "arr_1" in f else None)
    fake, labels = samples
    return np.asarray(fake), (None if labels is None else np.asarray(labels, dtype=np.int64))


def recognition_check(real_folder: str | os.PathLike, samples, image_size: int, seed: int = 0,
                      steps: int = 400, note: Optional[Callable[[str], None]] = print) -> dict:
    """Train the classifier on the real folder, score the samples (an npz with arr_0 images and arr_1 labels,
    or an (images, labels) pair; labels may be None for one class); returns the numbers and `summary`."""
    from repro.evaluation.feature_classifier import predict, rotations, train_classifier

    real, real_labels, names = folder_images(real_folder, image_size)
    fake, fake_labels = _load_samples(samples)
    k = len(names)
    if fake_labels is None:
        if k > 1:
            raise ReproError(f"{samples} has no arr_1 (the labels the samples were asked for)")
        fake_labels = np.zeros(len(fake), dtype=np.int64)
    if fake.shape[1:3] != real.shape[1:3]:
        raise ReproError(f"samples are {fake.shape[1]}x{fake.shape[2]} px but the real images are cropped to "
                         f"{real.shape[1]}x{real.shape[2]}: pass the image size the model was trained at")
    fit, held = split(real_labels, seed)
    out = {"class_names": names, "num_samples": int(len(fake)), "num_real": int(len(real)),
           "num_heldout": int(len(held))}
    lines = []
    # 1. the classifier on the real images (the rotation pretext task for one class) and what it says
    if k > 1:
        net = train_classifier(real[fit], real_labels[fit], steps=steps, seed=seed, note=note)
        held_hit = predict(net, real[held]) == real_labels[held]
        fake_hit = predict(net, fake) == fake_labels
        per_real = per_class_share(held_hit, real_labels[held], k)
        per_fake = per_class_share(fake_hit, fake_labels, k)
        ratios = [f / r if f is not None and r else None for f, r in zip(per_fake, per_real)]
        out.update(recognised=float(fake_hit.mean()), heldout_accuracy=float(held_hit.mean()), per_class=per_fake,
                   heldout_per_class=per_real, ratio=float(fake_hit.mean()) / max(float(held_hit.mean()), 1e-9),
                   worst_ratio=min((r for r in ratios if r is not None), default=None))
        lines.append(f"{out['recognised']:.1%} of {len(fake)} samples recognised as the class asked for; real held-out "
                     f"images: {out['heldout_accuracy']:.1%} (ratio {out['ratio']:.2f}, worst class "
                     f"{out['worst_ratio']:.2f})")
        width = max(len(n) for n in names)
        for c, name in enumerate(names):
            f, r = per_fake[c], per_real[c]
            lines.append(f"  {name:<{width}}  samples {'-' if f is None else f'{f:6.1%}'}   real held-out "
                         f"{'-' if r is None else f'{r:6.1%}'}")
    else:
        rx, ry = rotations(real[fit])
        net = train_classifier(rx, ry, steps=steps, seed=seed, note=note)
        hx, hy = rotations(real[held])
        out["rotation_accuracy"] = float((predict(net, hx) == hy).mean())
        lines.append(f"one class: the feature network learnt the rotation task ({out['rotation_accuracy']:.1%} on "
                     "held-out real images); the distance below is the check")
    # 2. the distance on the network's features, against the real-vs-real floor
    d = distances(net, real[fit], real[held], fake, seed)
    out["distance"] = d
    if d["fd"] is not None:
        lines.append(f"feature distance ({d['m']} images each): FD {d['fd']:.2f} (real vs real {d['fd_floor']:.2f}), "
                     f"KID {d['kid']:.4f} (real vs real {d['kid_floor']:.4f})")
    # 3. the borders
    border = border_check(real, real_labels, fake, fake_labels, k)
    out["border"] = border
    lines.append("borders: ring mean, spread and step of every class within the real images' 5-95% range" if border["ok"]
                 else "borders OFF: " + "; ".join(border["problems"][:6]))
    out["summary"] = "\n".join(lines)
    return out
