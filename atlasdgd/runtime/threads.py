"""OpenMP threads that behave on shared cores.

With OpenMP's default wait policy, a thread that finishes its share of a parallel region spins
for a while instead of sleeping. Alone on its cores that costs nothing; beside another busy
process (a second Ray worker on the node, another job: the common case on shared cluster nodes)
the spinning threads take the cores the working ones need. Issue 12 measured 80-130 s per epoch
against 2.8-3.0 s with ``OMP_WAIT_POLICY=PASSIVE``, same machine, minutes apart.

The policy is read once, when the OpenMP runtime loads, which happens when torch is imported. So
:func:`prefer_passive_waiting` runs in ``atlasdgd/__init__`` before anything imports torch. The CLI,
the Python API (``import atlasdgd`` first) and Ray workers (through Ray's ``runtime_env``) all get it.
Override: set ``OMP_WAIT_POLICY`` yourself (it is kept), or ``ATLASDGD_OMP_WAIT_POLICY=default`` to
leave OpenMP's own default.
"""

from __future__ import annotations

import os
import sys

PASSIVE = "PASSIVE"


def prefer_passive_waiting() -> str | None:
    """Set ``OMP_WAIT_POLICY=PASSIVE`` unless the user chose a policy; returns the policy in effect
    (None: OpenMP's default). It only takes effect if torch is not yet imported (see
    :func:`wait_policy_in_effect`)."""
    if os.environ.get("ATLASDGD_OMP_WAIT_POLICY", "").lower() == "default":
        return os.environ.get("OMP_WAIT_POLICY")
    if "torch" not in sys.modules:
        os.environ.setdefault("OMP_WAIT_POLICY", PASSIVE)
    return os.environ.get("OMP_WAIT_POLICY")


def warn_if_torch_came_first() -> bool:
    """Warn (once, on ``import atlasdgd``) when torch was imported first with no policy chosen: OpenMP
    has then already fixed its busy-waiting, and beside other busy processes training can be 30x
    slower (issue 12). Returns whether it warned."""
    if "torch" not in sys.modules or "OMP_WAIT_POLICY" in os.environ:
        return False
    if os.environ.get("ATLASDGD_OMP_WAIT_POLICY", "").lower() == "default":
        return False
    import warnings

    warnings.warn("torch was imported before atlasdgd, so OpenMP's threads busy-wait: on cores shared with other "
                  "busy processes training can run 30x slower. Import atlasdgd before torch, or set "
                  "OMP_WAIT_POLICY=PASSIVE before Python starts (ATLASDGD_OMP_WAIT_POLICY=default silences this).",
                  RuntimeWarning, stacklevel=3)
    return True


def worker_environment() -> dict[str, str]:
    """Environment for worker processes (Ray's ``runtime_env``): the same policy as this process."""
    policy = prefer_passive_waiting()
    return {} if policy is None else {"OMP_WAIT_POLICY": policy}
