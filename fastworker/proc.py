"""Linux process controls through prctl(2): die with the parent, and a process name that `ps` and `top` show.

Both are no-ops on other systems. The C library is loaded at import, never between fork and exec.
"""

from __future__ import annotations

import ctypes
import signal
import sys

PR_SET_PDEATHSIG = 1
PR_SET_NAME = 15
_LIBC = ctypes.CDLL(None, use_errno=True) if sys.platform == "linux" else None


def die_with_parent(signum: int = signal.SIGKILL) -> None:
    """Ask the kernel to send `signum` to this process when its parent dies."""
    if _LIBC is not None:
        _LIBC.prctl(PR_SET_PDEATHSIG, signum)


def set_process_name(name: str) -> None:
    """Set the name in /proc/PID/comm (15 bytes at most), e.g. `fw-worker-0`."""
    if _LIBC is not None:
        _LIBC.prctl(PR_SET_NAME, name.encode()[:15])


def describe_exit(code: int | None) -> str:
    """How a child process ended, from its exit code (negative: the signal that killed it)."""
    if code is None:
        return "exited (code unknown)"
    if code < 0:
        try:
            return f"killed by {signal.Signals(-code).name}"
        except ValueError:
            return f"killed by signal {-code}"
    return f"exited with code {code}"
