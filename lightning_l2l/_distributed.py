"""Process-group hygiene for DDP runs that Lightning leaves to the user.

Lightning destroys the default process group at interpreter exit only for NCCL
(``lightning.fabric.utilities.distributed._init_dist_connection``). With gloo (DDP on CPU) it is left
alive, so gloo's worker threads may still hold finished collectives whose tensors are owned by Python
when the interpreter finalizes. Freeing such a tensor there needs the GIL, a finalizing CPython ends
that thread with ``pthread_exit`` inside C++ code that cannot unwind, and the worker process dies
with SIGABRT ("terminate called without an active exception") after training finished and saved
everything: a red exit status for a run that succeeded (pytorch/pytorch#190489, #179291).

:func:`destroy_process_group_at_exit` registers, once per process, the handler Lightning registers
for NCCL, so the group is destroyed (its threads joined) while the interpreter is still whole.
"""

from __future__ import annotations

import atexit

import torch.distributed
from lightning.fabric.utilities.distributed import _destroy_dist_connection

__all__ = ["destroy_process_group_at_exit"]

_registered = False


def destroy_process_group_at_exit() -> bool:
    """Destroy the default process group at interpreter exit, if one is initialized now.

    Idempotent; returns whether the handler is registered. Call it from a hook that runs inside every
    rank (``setup``), after Lightning initialized the group.
    """
    global _registered
    if _registered:
        return True
    if not (torch.distributed.is_available() and torch.distributed.is_initialized()):
        return False
    atexit.register(_destroy_dist_connection)  # a no-op if the group was already destroyed
    _registered = True
    return True
