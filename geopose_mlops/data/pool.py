"""Process pools that decode source files in parallel (the cache build, ``data check``).

Decoding a 2048² JPEG 2000 takes most of a second of one core, and the files are independent, so the
cache build and the decode check hand them to worker processes. The workers come from the
``forkserver`` context: the server is a fresh single-threaded process, so a worker never inherits a
lock held by another thread of the caller (torch's OpenMP pool, MLflow's upload threads, a progress
bar's monitor), which plain ``fork`` could. The server imports the decoding modules once and each
worker is then forked from it in milliseconds; only the first pool of a process pays for starting the
server (about a second here). Workers ignore SIGINT: the caller takes Ctrl-C, cancels what has not
started, waits for what has, and cleans up. As with any spawn or forkserver pool, the workers import
the caller's main module, so a script that builds a cache must keep its top level under
``if __name__ == "__main__":`` (the ``geopose-ml`` commands do).
"""

from __future__ import annotations

import multiprocessing
import os
import signal
from collections.abc import Callable
from concurrent.futures import ProcessPoolExecutor

# What the forkserver imports before forking workers (Python's default, __main__, plus rasterio's caller).
_PRELOAD = ["__main__", "geopose_mlops.data.io", "geopose_mlops.data.cache", "geopose_mlops.data.check"]


def usable_cores() -> int:
    """Cores this process may run on (its affinity mask where the OS has one): the default ``--workers``."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # no affinity masks on this OS
        return os.cpu_count() or 1


def resolve_workers(workers: int | None, tasks: int) -> int:
    """Worker processes for ``tasks`` independent files.

    ``workers`` (None: the usable cores), at most one per task, at least 1 (1: decode in this process).
    """
    wanted = usable_cores() if workers is None else int(workers)
    return max(1, min(wanted, tasks))


def limit_decode_threads(threads: int) -> None:
    """Let GDAL decode with ``threads`` threads in this process (call it in a decoding worker).

    GDAL's JPEG 2000 driver decodes one image on every core by default (GDAL_NUM_THREADS=ALL_CPUS:
    0.18 s wall for 0.34 s CPU per 2048² image read at 1024² on the 2 cores here); with a decoding
    process per core that would be cores² threads, so each worker takes its share of the cores.
    """
    os.environ["GDAL_NUM_THREADS"] = str(max(1, int(threads)))


def decode_threads(workers: int) -> int:
    """GDAL threads for each of ``workers`` decoding processes: its share of the usable cores, at least 1."""
    return max(1, usable_cores() // max(1, workers))


def _start_worker(threads: int, initializer: Callable[..., None] | None, *initargs: object) -> None:
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    limit_decode_threads(threads)
    if initializer is not None:
        initializer(*initargs)


def decode_pool(
    workers: int, initializer: Callable[..., None] | None = None, initargs: tuple = ()
) -> ProcessPoolExecutor:
    """A pool of ``workers`` decoding processes (forkserver where the OS has it, else spawn).

    Each worker decodes with ``decode_threads(workers)`` GDAL threads.

    Args:
        workers: Number of processes (>= 2; with 1, decode in the calling process instead).
        initializer: Run once in each worker with ``initargs`` (e.g. open the memory-mapped arrays).
        initargs: Its arguments (picklable).
    """
    if "forkserver" in multiprocessing.get_all_start_methods():
        context = multiprocessing.get_context("forkserver")
        context.set_forkserver_preload(_PRELOAD)  # takes effect when the server starts (once per process)
    else:
        context = multiprocessing.get_context("spawn")
    return ProcessPoolExecutor(
        workers,
        mp_context=context,
        initializer=_start_worker,
        initargs=(decode_threads(workers), initializer, *initargs),
    )
