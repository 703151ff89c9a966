"""How a search uses the machine: reads overlapped with products on a thread, torch's
threads lowered while they are, and the time of each step measured where asked."""

from __future__ import annotations

import itertools
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from typing import TypeVar

import torch

T = TypeVar("T")
R = TypeVar("R")


def read_ahead(read: Callable[[T], R], items: Iterable[T], thread: bool = True) -> Iterator[tuple[T, R]]:
    """``(item, read(item))`` in order, the next item read on a thread while the caller uses
    this one (reads release the GIL: the copies out of the page cache overlap the products);
    with ``thread=False`` each read in turn on the caller's thread."""
    if not thread:
        yield from ((item, read(item)) for item in items)
        return
    with ThreadPoolExecutor(1, thread_name_prefix="cbir-read") as reader:
        it = iter(items)
        ahead = [(item, reader.submit(read, item)) for item in itertools.islice(it, 1)]
        while ahead:
            item, future = ahead.pop()
            result = future.result()
            ahead.extend((following, reader.submit(read, following)) for following in itertools.islice(it, 1))
            yield item, result


@contextmanager
def intra_op_threads(threads: int) -> Iterator[None]:
    """torch's (and faiss's) intra-op threads set to ``threads`` inside the block, restored
    after. While a thread copies rows out of the page cache it holds a core: products on
    every core beside it wait for each other in OpenMP barriers (1M map, 2 cores: an indexed
    query's reads and products overlapped took 0.57-0.65 s with one product thread, 0.81-1.0 s
    with two). The setting is the process's: callers that search on several threads of one
    process at once must not use it."""
    before = torch.get_num_threads()
    torch.set_num_threads(max(1, threads))
    try:
        yield
    finally:
        torch.set_num_threads(before)


class StepClock:
    """Accumulates the time of named steps into a dict (nothing when there is none):
    ``with clock("read"): ...``. On a GPU each step ends with a synchronisation, so that its
    time is its own. Steps may nest and run on several threads (their times then overlap)."""

    def __init__(self, timings: dict[str, float] | None, device: torch.device):
        self.timings, self.device = timings, device
        self._lock = threading.Lock()

    @contextmanager
    def __call__(self, name: str) -> Iterator[None]:
        if self.timings is None:
            yield
            return
        start = time.perf_counter()
        try:
            yield
        finally:
            if self.device.type == "cuda":
                torch.cuda.synchronize()
            with self._lock:
                self.timings[name] = self.timings.get(name, 0.0) + time.perf_counter() - start

    def timed(self, items: Iterable[T], name: str) -> Iterator[T]:
        """``items``, the time of making each counted as ``name``."""
        it = iter(items)
        while True:
            with self(name):
                try:
                    item = next(it)
                except StopIteration:
                    return
            yield item
