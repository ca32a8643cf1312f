"""DecodePlan: what a decode backend derives from a stage's modules for one set-up.

Backend.prepare(blocks) builds one; it owns everything derived from the weights and the sparse
set-up: the C kernels' views and ctypes structs, packed tables, predictor tiles, and the
stages (KV caches, CUDA graphs) it makes. A derived value is built once, at its first use, and
kept for the plan's life: nothing watches the weights per token. A new set-up (another sparse
configuration, replaced weights) means a new plan; weights changed in place need none.

While a plan runs a step (DecodePlan.running), it is the active plan (active_plan()): the
sparse MLPs ask it for their mode's kernels on its backend. Outside a plan, and under the torch
backend's plan, every module runs its torch ops.
"""

import contextlib
import contextvars

_active = contextvars.ContextVar("dejavu_active_decode_plan", default=None)


def active_plan():
    """The DecodePlan running the current step, or None (plain torch ops)."""
    return _active.get()


class DecodePlan:
    """One backend's plan for a list of blocks (Backend.prepare)."""

    def __init__(self, backend, blocks):
        self.backend = backend
        self.blocks = list(blocks)
        self._derived = {}  # (what, id(owner)) -> (owner, value): the owner is held, so its id stays its own

    @property
    def name(self):
        return self.backend.name

    def derived(self, what, owner, build):
        """build(), made once per (what, owner) for this plan's life."""
        key = (what, id(owner))
        entry = self._derived.get(key)
        if entry is None:
            entry = self._derived[key] = (owner, build())
        return entry[1]

    def built(self, what, owner):
        """What derived() built for (what, owner), or None where it built nothing yet."""
        entry = self._derived.get((what, id(owner)))
        return None if entry is None else entry[1]

    @contextlib.contextmanager
    def running(self):
        """This plan active for a block of calls (the steps of its stages, LocalModel.forward)."""
        token = _active.set(self)
        try:
            yield self
        finally:
            _active.reset(token)
