"""OpenMP threads that behave on shared cores and alone.

A thread that finishes its share of a parallel region waits for the next one: it spins, then sleeps.
OpenMP's default (libgomp: 300,000 spins) takes the cores a busy neighbour needs: beside another busy
process (a second Ray worker on the node, another job: the common case on shared cluster nodes)
issue 12 measured 80-130 s per epoch against 2.8-3.0 s with ``OMP_WAIT_POLICY=PASSIVE`` (no spin).
But PASSIVE makes every parallel region wake a sleeping thread, and on this project's VM that cost
is large and erratic: one 2-thread training step alone took 20-73 ms (PASSIVE) against 16 ms
(default), minutes apart. A short spin keeps both: ``GOMP_SPINCOUNT=3000`` took 18-19 ms alone and
33-35 ms beside a busy 2-thread process (PASSIVE: 27 ms there; 1 thread: 21 alone, 27 beside;
2026-12-03, 8,000 x 2,000 simulated cells, batch 128). Whole epochs (benchmarks/shared_cores.py,
with the loader's thread) were noisier: spin 1.2-3.4 s alone and 2.1-2.3 beside the busy process,
no spin 3.0-3.4 alone and 1.3 beside it (a busy neighbour probably keeps this VM's CPUs awake). So
atlasdgd sets that spin count: a node of its own is where speed is judged, and beside a busy
process both stay within 2x of alone.

The settings are read once, when the OpenMP runtime loads, which happens when torch is imported.
So :func:`prefer_short_spinning` runs in ``atlasdgd/__init__`` before anything imports torch. The
CLI, the Python API (``import atlasdgd`` first) and Ray workers (through Ray's ``runtime_env``) all
get it. Override: set ``OMP_WAIT_POLICY`` or ``GOMP_SPINCOUNT`` yourself (they are kept), or
``ATLASDGD_OMP_WAIT_POLICY=default`` to leave OpenMP's own default. ``GOMP_SPINCOUNT`` is libgomp's
(torch's Linux wheels); other OpenMP runtimes ignore it and keep their defaults.
"""

from __future__ import annotations

import os
import sys

SPIN_COUNT = "3000"
_USER_SETTINGS = ("OMP_WAIT_POLICY", "GOMP_SPINCOUNT")


def _settings() -> dict[str, str]:
    return {k: os.environ[k] for k in _USER_SETTINGS if k in os.environ}


def prefer_short_spinning() -> dict[str, str]:
    """Set ``GOMP_SPINCOUNT`` to :data:`SPIN_COUNT` unless the user chose a wait setting; returns the
    OpenMP wait settings in effect (empty: OpenMP's default). It only takes effect if torch is not yet
    imported."""
    if os.environ.get("ATLASDGD_OMP_WAIT_POLICY", "").lower() != "default" and "torch" not in sys.modules:
        if not _settings():
            os.environ["GOMP_SPINCOUNT"] = SPIN_COUNT
    return _settings()


def warn_if_torch_came_first() -> bool:
    """Warn (once, on ``import atlasdgd``) when torch was imported first with no policy chosen: OpenMP
    has then already fixed its busy-waiting, and beside other busy processes training can be 30x
    slower (issue 12). Returns whether it warned."""
    if "torch" not in sys.modules or _settings():
        return False
    if os.environ.get("ATLASDGD_OMP_WAIT_POLICY", "").lower() == "default":
        return False
    import warnings

    warnings.warn("torch was imported before atlasdgd, so OpenMP's threads busy-wait: on cores shared with other "
                  f"busy processes training can run 5-30x slower. Import atlasdgd before torch, or set "
                  f"GOMP_SPINCOUNT={SPIN_COUNT} before Python starts (ATLASDGD_OMP_WAIT_POLICY=default silences this).",
                  RuntimeWarning, stacklevel=3)
    return True


def worker_environment() -> dict[str, str]:
    """Environment for worker processes (Ray's ``runtime_env``): the same wait settings as this process."""
    return prefer_short_spinning()
