"""Read ahead in a background thread: overlap file reading/decoding with the consumer's work."""

from __future__ import annotations

import queue
import threading
from typing import Iterable, Iterator


def prefetch(items: Iterable, depth: int = 2) -> Iterator:
    """Produce `items` in a background thread, `depth` ahead.
    Exceptions are re-raised in the consumer; leaving the loop early stops the producer."""
    q: queue.Queue = queue.Queue(maxsize=depth)
    stop = threading.Event()

    def put(entry) -> bool:
        while not stop.is_set():
            try:
                q.put(entry, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    def work():
        try:
            for item in items:
                if not put(("item", item)):
                    return
            put(("done", None))
        except BaseException as e:  # handed to the consumer, which re-raises it
            put(("error", e))

    thread = threading.Thread(target=work, daemon=True)
    thread.start()
    try:
        while True:
            kind, value = q.get()
            if kind == "item":
                yield value
            elif kind == "done":
                return
            else:
                raise value
    finally:
        stop.set()
        thread.join(timeout=5)
