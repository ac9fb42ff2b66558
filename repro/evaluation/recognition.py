"""Are class-conditional samples recognisable? A plain classifier fitted on the real images says.

Notebook 04's honest check of the own-data path: a logistic regression on grey pixels (scikit-learn)
is fitted on 80% of the real images of the class folder (stratified split, fixed seed); its accuracy on
the other 20% is reported next to the share of generated samples it assigns to the class they were
asked for. A share close to the held-out accuracy means the samples look like their class as much as
real images do; a classifier that cannot tell the real classes apart makes the share meaningless,
which the held-out accuracy beside it shows.

numpy's BLAS threads spin badly when the machine's other core is busy (a 3.7 s fit took 22-70 s on a
shared 2-core machine), so the fit runs with one BLAS thread (threadpoolctl, installed with scikit-learn).

    check = recognition_check("my_images", "runs/own/samples/samples.npz", image_size=32)
    check["recognised"], check["heldout_accuracy"], check["per_class"]
"""

from __future__ import annotations

import os
from typing import Optional

import numpy as np

from repro.errors import ReproError


def folder_images(folder: str | os.PathLike, image_size: int) -> tuple[np.ndarray, np.ndarray, list[str]]:
    """(uint8 (N, S, S, 3), labels (N,), class names) of a class folder, centre-cropped as step 6 does;
    unreadable images are left out, named in one printed line."""
    from repro.data.image_loader import read_squares
    from repro.data.image_sources import list_images

    src = list_images(folder)
    if not src.class_names:
        raise ReproError(f"{folder} has no class sub-folders: the recognition check needs one folder per class")
    images, labels, _ = read_squares(src, image_size, what="recognition check")
    if not images:
        raise ReproError(f"no image of {folder} can be read: the recognition check needs readable real images")
    return np.stack(images), np.asarray(labels, dtype=np.int64), list(src.class_names)


def _grey(images: np.ndarray) -> np.ndarray:
    return images.astype(np.float64).mean(axis=3).reshape(len(images), -1) / 255.0


def fit_classifier(images: np.ndarray, labels: np.ndarray, seed: int = 0, test_fraction: float = 0.2):
    """(LogisticRegression fitted on a stratified 1 - test_fraction share, its accuracy on the rest)."""
    try:
        from sklearn.linear_model import LogisticRegression
        from sklearn.model_selection import train_test_split
        from threadpoolctl import threadpool_limits
    except ImportError:
        raise ReproError("the recognition check fits a scikit-learn classifier: pip install "
                         "'repro-latent-kit[own-data]' (scikit-learn, threadpoolctl)") from None

    if len(np.unique(labels)) < 2:
        raise ReproError("the recognition check needs at least two classes (an unconditional model has none to check)")
    x = _grey(images)
    num_classes = len(np.unique(labels))
    # a stratified split needs one held-out image per class at least (small folders: 4 images x 10 classes)
    num_test = max(int(round(test_fraction * len(x))), num_classes)
    if len(x) - num_test < num_classes:
        raise ReproError(f"the recognition check needs at least {2 * num_classes} real images for {num_classes} "
                         f"classes (one to fit and one to hold out per class); the folder has {len(x)}")
    x_fit, x_test, y_fit, y_test = train_test_split(x, labels, test_size=num_test, stratify=labels,
                                                    random_state=seed)
    with threadpool_limits(1):
        clf = LogisticRegression(max_iter=2000).fit(x_fit, y_fit)
        return clf, float(clf.score(x_test, y_test))


def recognised(clf, images: np.ndarray, labels: np.ndarray, num_classes: int) -> tuple[float, list[Optional[float]]]:
    """(share of `images` classified as their `labels`, the share per class (None for a class without images))."""
    from threadpoolctl import threadpool_limits

    with threadpool_limits(1):
        hit = clf.predict(_grey(images)) == labels
    per_class = [float(hit[labels == c].mean()) if (labels == c).any() else None for c in range(num_classes)]
    return float(hit.mean()), per_class


def recognition_check(real_folder: str | os.PathLike, samples, image_size: int, seed: int = 0) -> dict:
    """Fit on the real folder, score the samples (an npz with arr_0 images and arr_1 labels, or a pair)."""
    real, real_labels, names = folder_images(real_folder, image_size)
    if isinstance(samples, (str, os.PathLike)):
        with np.load(samples) as f:
            if "arr_1" not in f:
                raise ReproError(f"{samples} has no arr_1 (the labels the samples were asked for)")
            fake, fake_labels = f["arr_0"], f["arr_1"].astype(np.int64)
    else:
        fake, fake_labels = samples
    if fake.shape[1:3] != real.shape[1:3]:
        raise ReproError(f"samples are {fake.shape[1]}x{fake.shape[2]} px but the real images are cropped to "
                         f"{real.shape[1]}x{real.shape[2]}: pass the image size the model was trained at")
    clf, heldout = fit_classifier(real, real_labels, seed=seed)
    share, per_class = recognised(clf, fake, fake_labels, len(names))
    worst = min((v for v in per_class if v is not None), default=None)
    summary = (f"{share:.1%} of {len(fake)} samples recognised as the class they were asked for (worst class "
               f"{worst:.0%}); the same classifier on held-out real images: {heldout:.1%}")
    return {"recognised": share, "heldout_accuracy": heldout, "per_class": per_class, "class_names": names,
            "num_samples": int(len(fake)), "num_real": int(len(real)), "summary": summary}
