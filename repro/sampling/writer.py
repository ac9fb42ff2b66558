"""Writing samples: PNGs on a background thread, and the ADM evaluator's `samples.npz`, streamed.

- `ImageWriter`: the sampling loop hands over each batch's latents and goes on with the next batch;
  a background thread decodes them (VA-VAE) and writes `{index:06d}.png` files, each to a temp
  name then renamed, so the accelerator never waits on the disk and a killed run never leaves a
  half-written PNG. A bounded queue (default 2 batches) caps the memory held by pending batches.
- `pack_npz`: `samples.npz` as ADM's evaluator (guided-diffusion evaluations/evaluator.py) reads
  it: `arr_0` uint8 (N, H, W, 3) and, as ADM's image_sample.py writes, `arr_1` int64 (N,) labels.
  Upstream tools/save_npz.py stacks all N images in memory first (~10 GB at 50,000 x 256 px);
  here the .npy members are streamed into the zip image by image, so memory stays at one chunk.
  Fixed zip timestamps make the file a pure function of the images (byte-identical reruns).
"""

from __future__ import annotations

import os
import queue
import threading
import zipfile
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Callable, Iterable, Optional, Sequence

import numpy as np
from PIL import Image

from repro.data.npz import write_npy_member
from repro.errors import ReproError
from repro.utils.io import atomic_path

_STOP = object()


def write_png(path: str | os.PathLike, image: np.ndarray) -> Path:
    """Write one (H, W, 3) uint8 image as PNG atomically (temp name, then rename)."""
    with atomic_path(path, suffix=".png") as tmp:
        Image.fromarray(image).save(tmp, format="PNG")
    return Path(path)


def read_png(path: str | os.PathLike, shape: Optional[tuple[int, ...]] = None) -> np.ndarray:
    """(H, W, 3) uint8 pixels of a sample PNG; a ReproError naming the file if it is unusable."""
    try:
        with Image.open(path) as im:
            if im.mode != "RGB":
                raise ReproError(f"{path} is a {im.mode} image, expected RGB: delete it and run the same "
                                 "command again to re-sample it")
            arr = np.asarray(im, dtype=np.uint8)
    except (OSError, SyntaxError) as e:
        raise ReproError(f"{path} is not a readable PNG ({e}): delete it and run the same command again") from None
    if shape is not None and arr.shape != tuple(shape):
        raise ReproError(f"{path} has shape {arr.shape}, expected {tuple(shape)}: it comes from another run; "
                         "delete it (or use a new --out) and run again")
    return arr


class ImageWriter:
    """Decode + PNG writing on a background thread, fed through a bounded queue.

    `decode(batch) -> (B, H, W, 3) uint8 ndarray` runs on the writer thread (identity if None).
    `submit(batch, paths)` blocks only while `max_pending` batches are waiting. An error on the
    thread is raised by the next `submit` or by `close`. `threaded=False` does the work inline.
    """

    def __init__(self, decode: Optional[Callable] = None, max_pending: int = 2, threaded: bool = True,
                 on_written: Optional[Callable[[int], None]] = None):
        self.decode = decode or (lambda x: x)
        self.on_written = on_written
        self.written = 0
        self._error: Optional[BaseException] = None
        self._threaded = threaded
        self._queue: queue.Queue = queue.Queue(maxsize=max(1, max_pending))
        self._thread: Optional[threading.Thread] = None
        self._finished = threading.Event()  # set by the thread as it ends (see abort)
        if threaded:
            self._thread = threading.Thread(target=self._run, name="repro-image-writer", daemon=True)
            self._thread.start()

    def _work(self, batch, paths: Sequence[Path]) -> None:
        import torch

        with torch.inference_mode():  # grad mode is per thread: off here too
            images = np.asarray(self.decode(batch))
        if images.shape[0] != len(paths) or images.dtype != np.uint8 or images.ndim != 4:
            raise RuntimeError(f"decode returned {images.dtype} {images.shape} for {len(paths)} paths")
        for image, path in zip(images, paths):
            write_png(path, image)
            self.written += 1
        if self.on_written is not None:
            self.on_written(len(paths))

    def _run(self) -> None:
        try:
            while True:
                job = self._queue.get()
                try:
                    if job is _STOP:
                        return
                    if self._error is None:  # after a failure, drain without working so submit never blocks
                        self._work(*job)
                except BaseException as e:  # noqa: BLE001 -- handed to the producer thread
                    self._error = e
                finally:
                    self._queue.task_done()
        finally:
            self._finished.set()

    def _raise_error(self) -> None:
        if self._error is not None:
            err, self._error = self._error, None
            raise err

    def submit(self, batch, paths: Sequence[str | os.PathLike]) -> None:
        self._raise_error()
        paths = [Path(p) for p in paths]
        if not self._threaded:
            self._work(batch, paths)
            return
        self._queue.put((batch, paths))

    def close(self) -> None:
        """Wait for every pending batch to be written; raise the writer's error, if any."""
        if self._thread is not None and self._thread.is_alive():
            try:
                self._queue.put(_STOP)  # blocks while the queue is full
                self._thread.join()
            except BaseException:  # a second SIGTERM/Ctrl-C while waiting: drop what is queued, then go
                self.abort()
                raise
        self._raise_error()

    def abort(self) -> None:
        """Stop after the batch in progress (its PNGs stay complete or absent); drop queued batches."""
        if self._thread is None or not self._thread.is_alive():
            return
        self._error = self._error or RuntimeError("aborted")
        while True:
            try:
                self._queue.get_nowait()
                self._queue.task_done()
            except queue.Empty:
                break
        self._queue.put(_STOP)
        # Wait for the batch in progress (a few PNGs) even through further signals: a daemon thread left
        # inside torch when the interpreter exits aborts the whole process (exit -6, no message). An event, not
        # join(): Python 3.11's join, interrupted by a signal, marks a running thread as stopped (bpo-45274's fix).
        while not self._finished.is_set():
            try:
                self._finished.wait()
            except KeyboardInterrupt:
                continue
        self._error = None

    def __enter__(self) -> "ImageWriter":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self.close()
        else:
            self.abort()


# ---------------------------------------------------------------------------------------------
# samples.npz in the ADM evaluator's format, streamed


def pack_npz(images_dir: str | os.PathLike, num_samples: int, out_path: str | os.PathLike,
             labels: Optional[Sequence[int] | np.ndarray] = None, chunk: int = 256, workers: int = 4) -> Path:
    """Pack `images_dir/{i:06d}.png`, i < num_samples, into `out_path` (arr_0 images, arr_1 labels).

    Streaming and atomic: chunks of `chunk` PNGs are decoded by `workers` threads and appended.
    """
    images_dir = Path(images_dir)
    paths = [images_dir / f"{i:06d}.png" for i in range(num_samples)]
    missing = [p.name for p in paths if not p.is_file()]
    if missing:
        raise ReproError(f"cannot pack {out_path}: {len(missing)} of {num_samples} PNGs are missing in "
                         f"{images_dir} (first: {missing[0]}); run the sampling command again to finish them")
    first = read_png(paths[0])  # (H, W, 3): read_png refuses anything but RGB
    if labels is not None and len(labels) != num_samples:
        raise ReproError(f"pack_npz: {len(labels)} labels for {num_samples} images")

    def chunks(pool: ThreadPoolExecutor) -> Iterable[np.ndarray]:
        for start in range(0, num_samples, chunk):
            part = paths[start:start + chunk]
            yield np.stack(list(pool.map(lambda p: read_png(p, first.shape), part)))

    with atomic_path(out_path, suffix=".npz") as tmp:
        with zipfile.ZipFile(tmp, "w", compression=zipfile.ZIP_STORED, allowZip64=True) as zf:
            with ThreadPoolExecutor(max_workers=max(1, workers)) as pool:
                write_npy_member(zf, "arr_0.npy", (num_samples, *first.shape), np.uint8, chunks(pool))
            if labels is not None:
                arr = np.asarray(labels, dtype=np.int64)
                write_npy_member(zf, "arr_1.npy", (num_samples,), np.int64, [arr])
    return Path(out_path)
