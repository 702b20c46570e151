"""A pause at interpreter exit for the process groups' worker threads.

A gloo worker thread drops its reference to a finished collective's tensors after the caller's
``wait()`` has returned; in torch 2.11 and 2.13 that release takes the GIL whenever the tensor has a Python object
(``c10/util/intrusive_ptr.h``: a reference count going from 2 to 1 decrefs the Python object). Should the
process reach the end of the script before that thread gets the GIL (a step or a checkpoint gather as the last thing
the script does: under the 5 ms GIL switch interval), the thread asks for it once the interpreter is finalizing,
Python ends the thread in the middle of C++, and the process aborts ("terminate called without an active exception",
exit code -6) after the script has done all of its work. The ``atexit`` callback below runs before the interpreter
begins finalizing and hands those threads the GIL for a moment, so that their pending releases complete first.
"""

from __future__ import annotations

import atexit
import time

_PAUSE_S = 0.2  # (0.05 s held in 80 runs of probe 49's test, and failed once in a CI run under load, 2026-12-05)
_registered = False


def _pause() -> None:
    time.sleep(_PAUSE_S)  # (releases the GIL: a worker thread waiting for it takes it now)


def settle_at_exit() -> None:
    """Register the pause, once per process: called wherever this package starts collectives."""
    global _registered
    if not _registered:
        atexit.register(_pause)
        _registered = True
