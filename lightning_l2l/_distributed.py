"""Process-group hygiene for DDP runs that Lightning leaves to the user.

Lightning destroys the default process group at interpreter exit only for NCCL
(``lightning.fabric.utilities.distributed._init_dist_connection``). With gloo (DDP on CPU) it is left
alive, so gloo's worker threads may still hold finished collectives whose tensors are owned by Python
when the interpreter finalizes. Freeing such a tensor there needs the GIL, a finalizing CPython ends
that thread with ``pthread_exit`` inside C++ code that cannot unwind, and the worker process dies
with SIGABRT ("terminate called without an active exception") after training finished and saved
everything: a failed exit status for a run that succeeded. The mechanism is described in
pytorch/pytorch#179291 (a PR to register such a handler in ``init_process_group``, abandoned by its
author as needing more discussion) and #190489 (open).

:func:`destroy_process_group_at_exit` registers, once per process, a handler that destroys the default
group (joining its threads) while the interpreter is still whole.
"""

from __future__ import annotations

import atexit

import torch.distributed

__all__ = ["destroy_process_group_at_exit"]

_registered = False


def _destroy_default_group() -> None:
    """The default process group, destroyed if it still exists (a no-op after Lightning's NCCL handler)."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()


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
    atexit.register(_destroy_default_group)
    _registered = True
    return True
