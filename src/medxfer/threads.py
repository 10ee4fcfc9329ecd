"""How many intra-op threads a run uses, and how OpenMP's idle threads wait.

Resolution (:func:`resolve_threads`), first that applies:

1. an explicit count (``train.threads`` of a run config);
2. ``OMP_NUM_THREADS`` as the user set it (a value medxfer itself wrote is never taken for the user's:
   :func:`apply_threads` keeps the user's original in ``MEDXFER_USER_OMP_NUM_THREADS``);
3. the CPUs of this process's affinity mask (``os.sched_getaffinity``: what ``taskset``, a batch system or
   a container allows, not the machine's core count), divided among the local sweep's workers, at least 1.

The thread count changes a run's numbers (float sums in another order), so a fine-tune's run id hashes the
resolved count (:func:`medxfer.finetune.run_id_for`). The id therefore never depends on what medxfer wrote
into the environment during an earlier run of the same process.

Wait policy: OpenMP's default lets idle threads spin for a while before they sleep. On a machine whose
cores are busy with other processes, the spinning threads take the cores the working ones need, and a run
became many times slower (docs/benchmarks.md, benchmarks/results/threads.json). ``OMP_WAIT_POLICY=PASSIVE``
makes them sleep at once. OpenMP reads the variable once, when torch loads it, so :func:`default_wait_policy`
runs when medxfer is imported (``medxfer/__init__.py``), before anything imports torch; a value the user
set is kept.
"""

from __future__ import annotations

import logging
import os
import sys
from typing import Any, Optional

from medxfer.errors import ConfigError

log = logging.getLogger(__name__)

WAIT_POLICY_VAR = "OMP_WAIT_POLICY"
DEFAULT_WAIT_POLICY = "PASSIVE"
USER_VALUE_VAR = "MEDXFER_USER_OMP_NUM_THREADS"  # the user's OMP_NUM_THREADS before medxfer wrote its own
THREAD_VARS = ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS")

# The wait policy OpenMP runs with in this process: the variable's value when torch was loaded (None = the
# runtime's default, spinning); set by default_wait_policy.
_effective_wait_policy: Optional[str] = None
_wait_policy_known = False


def affinity_cpus() -> int:
    """CPUs this process may run on: its affinity mask, else (not Linux) the machine's count."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except (AttributeError, OSError):
        return max(1, os.cpu_count() or 1)


def user_threads() -> Optional[int]:
    """``OMP_NUM_THREADS`` as the user set it, or None; an unusable value is a one-line error."""
    if USER_VALUE_VAR in os.environ:  # medxfer overwrote OMP_NUM_THREADS: the user's value is kept here
        raw = os.environ[USER_VALUE_VAR]
    else:
        raw = os.environ.get("OMP_NUM_THREADS", "")
    raw = raw.strip()
    if not raw:
        return None
    first = raw.split(",")[0].strip()  # OpenMP allows a list for nested levels: the first is the outer one
    try:
        value = int(first)
    except ValueError:
        value = 0
    if value < 1:
        raise ConfigError(f"environment variable OMP_NUM_THREADS={raw!r}: expected a whole number >= 1 "
                          "(or unset it to let medxfer choose from the CPU affinity mask)")
    return value


def resolve_threads(explicit: Optional[int] = None, workers: int = 1) -> int:
    """The intra-op thread count of one run: ``explicit``, else the user's ``OMP_NUM_THREADS``, else the
    affinity mask's CPUs // ``workers`` (at least 1)."""
    if explicit is not None:
        return int(explicit)
    from_env = user_threads()
    if from_env is not None:
        return from_env
    return max(1, affinity_cpus() // max(1, int(workers)))


def threads_source(explicit: Optional[int] = None) -> str:
    """Where :func:`resolve_threads` took its count from, for the run record."""
    if explicit is not None:
        return "config"
    if user_threads() is not None:
        return "OMP_NUM_THREADS"
    return "affinity"


def apply_threads(threads: int) -> None:
    """Run this process's torch (and the OpenMP / MKL / OpenBLAS of processes it starts) with ``threads``
    threads. The user's own ``OMP_NUM_THREADS`` is kept in ``MEDXFER_USER_OMP_NUM_THREADS`` (once), so that
    a later resolution in this process or its children still sees the user's setting, not ours."""
    if USER_VALUE_VAR not in os.environ:
        os.environ[USER_VALUE_VAR] = os.environ.get("OMP_NUM_THREADS", "")
    for var in THREAD_VARS:
        os.environ[var] = str(threads)
    import torch

    if torch.get_num_threads() != threads:
        torch.set_num_threads(threads)


class torch_threads:
    """``with torch_threads(n):`` torch runs with ``n`` intra-op threads inside, its previous count after
    (a run in a notebook or a test leaves the process as it found it)."""

    def __init__(self, threads: int):
        self.threads = int(threads)
        self.previous: Optional[int] = None

    def __enter__(self) -> "torch_threads":
        import torch

        self.previous = torch.get_num_threads()
        if self.previous != self.threads:
            torch.set_num_threads(self.threads)
        return self

    def __exit__(self, *exc: Any) -> None:
        import torch

        if self.previous is not None and torch.get_num_threads() != self.previous:
            torch.set_num_threads(self.previous)


def default_wait_policy() -> Optional[str]:
    """Set ``OMP_WAIT_POLICY=PASSIVE`` unless the user set a policy or torch (and with it OpenMP) is
    already loaded; return the policy OpenMP runs with in this process (None = its default, spinning)."""
    global _effective_wait_policy, _wait_policy_known
    if _wait_policy_known:
        return _effective_wait_policy
    loaded = "torch" in sys.modules
    if not loaded and not os.environ.get(WAIT_POLICY_VAR):
        os.environ[WAIT_POLICY_VAR] = DEFAULT_WAIT_POLICY
    # Loaded before medxfer: OpenMP read the variable then, and it has not changed since.
    _effective_wait_policy = os.environ.get(WAIT_POLICY_VAR) or None
    _wait_policy_known = True
    return _effective_wait_policy


def wait_policy() -> str:
    """The wait policy for the record: the variable's value ("PASSIVE", "ACTIVE", ...) or "default"."""
    policy = default_wait_policy()
    return policy.upper() if policy else "default"


def threads_record(threads: int, source: str) -> dict[str, Any]:
    """What a run record says about its threading."""
    return {"intra_op": int(threads), "source": source, "affinity_cpus": affinity_cpus(),
            "omp_wait_policy": wait_policy()}


def inherited_threads_record() -> dict[str, Any]:
    """:func:`threads_record` for work that runs with torch's threads as it finds them in this process (scoring:
    its ``score_config.json``), so the count is torch's and the source says who set it: ``sweep worker`` (a
    sweep worker's share: :func:`apply_threads` wrote OMP_NUM_THREADS and kept the user's value aside),
    ``OMP_NUM_THREADS`` (the user's), else ``torch default``."""
    import torch

    if USER_VALUE_VAR in os.environ:
        source = "sweep worker"
    elif os.environ.get("OMP_NUM_THREADS", "").strip():
        source = "OMP_NUM_THREADS"
    else:
        source = "torch default"
    return threads_record(torch.get_num_threads(), source)


# How far a run's headline Dice may move between 1 and 2 intra-op threads on one machine (float sums in another
# order change the training trajectory): measured in benchmarks/results/threads.json, documented on the
# fine-tuning page; tests/test_threads.py checks a small run against it.
THREAD_COUNT_DICE_TOLERANCE = 0.02
