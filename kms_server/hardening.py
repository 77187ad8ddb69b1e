# Process hardening at start: no core dumps, no ptrace by same-uid processes, locked memory.
# Best effort by design: what the system refuses becomes a warning, never a failure to start.
"""Keep key material out of core dumps, swap and same-uid debuggers.

* ``prctl(PR_SET_DUMPABLE, 0)``: no core dump, and processes of the same uid
  can no longer ptrace the daemon or read its ``/proc/<pid>/mem``.
* ``RLIMIT_CORE = 0``: no core file even if something re-enables dumping.
* ``mlockall``: keep pages out of swap. With an unlimited ``RLIMIT_MEMLOCK``
  (``LimitMEMLOCK=infinity``) or ``CAP_IPC_LOCK``, current and future pages
  are locked; with a finite limit only current pages, because locking future
  pages would turn the limit into allocation failures at run time.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import logging
import resource

log = logging.getLogger("kmsd.hardening")

_PR_SET_DUMPABLE = 4
_MCL_CURRENT = 1
_MCL_FUTURE = 2
_CAP_IPC_LOCK = 14


def _libc() -> ctypes.CDLL:
    return ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)


def _has_ipc_lock() -> bool:
    """CAP_IPC_LOCK in the effective set: RLIMIT_MEMLOCK does not apply to us."""
    try:
        with open("/proc/self/status") as status:
            for line in status:
                if line.startswith("CapEff:"):
                    return bool(int(line.split()[1], 16) >> _CAP_IPC_LOCK & 1)
    except OSError:
        pass
    return False


def forbid_core_dumps() -> list[str]:
    """No core file and no same-uid debugger; a warning for each protection refused.

    Every ``kmsd`` command calls it before it reads a KEK: ``init``, ``rekey`` and
    ``verify`` hold the KEK and key material too, if only for seconds.
    """
    warnings: list[str] = []
    if _libc().prctl(_PR_SET_DUMPABLE, 0, 0, 0, 0) != 0:
        warnings.append(f"prctl(PR_SET_DUMPABLE, 0) failed: errno {ctypes.get_errno()}")
    try:
        resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
    except (ValueError, OSError) as exc:
        warnings.append(f"cannot set RLIMIT_CORE to 0: {exc}")
    return warnings


def harden_process() -> list[str]:
    """Apply every protection the system allows; return a warning for each refused one.

    The daemon's protections: those of :func:`forbid_core_dumps` and locked memory.
    """
    warnings = forbid_core_dumps()
    libc = _libc()
    soft, _ = resource.getrlimit(resource.RLIMIT_MEMLOCK)
    unbounded = soft == resource.RLIM_INFINITY or _has_ipc_lock()
    flags = _MCL_CURRENT | (_MCL_FUTURE if unbounded else 0)
    if libc.mlockall(flags) != 0:
        warnings.append(
            f"mlockall failed (errno {ctypes.get_errno()}): key material may be swapped out; "
            "raise RLIMIT_MEMLOCK (systemd: LimitMEMLOCK=infinity) to allow it"
        )
    elif not flags & _MCL_FUTURE:
        warnings.append(
            "RLIMIT_MEMLOCK is finite: only memory present at start is locked; "
            "set LimitMEMLOCK=infinity to lock all of it"
        )
    return warnings
