"""``hvd.elastic`` for a fixed-size MPI world: state commits, rollback and retry.

``@hvd.elastic.run`` runs the training function with a :class:`State`; when a collective
fails with :class:`~pybrain_mpi.horovod.HorovodInternalError` (a timeout naming a stopped or
slow peer, a mismatch, a peer that raised), every rank rolls its state back to the last
:meth:`State.commit`, re-synchronizes it from rank 0 and calls the function again.

Limits (stated, as the MPI world cannot change size): ranks are never added or removed, so
:class:`~pybrain_mpi.horovod.HostsUpdatedInterrupt` is never raised and
``check_host_updates()`` does nothing; a rank that died cannot be replaced (the survivors'
retries time out again and the run stops after ``HOROVOD_ELASTIC_RETRIES`` attempts, default
3); recovery needs every rank to see the failure, which a collective error on one rank
provides because the others time out on it too.
"""

from __future__ import annotations

import copy
import functools
import os
from typing import Any, Callable

import torch

__all__ = ["run", "State", "ObjectState", "TorchState"]


class State:
    """State kept across failures: ``commit()`` saves it, ``restore()`` rolls back to the last
    commit, ``sync()`` makes every rank equal to rank 0."""

    def __init__(self, bcast_object: Callable | None = None, get_rank: Callable | None = None):
        from . import broadcast_object, rank

        self._bcast_object = bcast_object or broadcast_object
        self._rank = get_rank or rank
        self._reset_callbacks: list[Callable] = []

    def register_reset_callbacks(self, callbacks: list[Callable]) -> None:
        """Functions called after every reset (a fixed world resets only after a failure)."""
        self._reset_callbacks.extend(callbacks)

    def on_reset(self) -> None:
        """Runs the reset callbacks."""
        for callback in self._reset_callbacks:
            callback()

    def on_hosts_updated(self, timestamp: float, update_res: Any) -> None:
        """Never called in a fixed MPI world."""

    def commit(self) -> None:
        """Saves the state (to roll back to) and checks for host updates (none in a fixed world)."""
        self.save()
        self.check_host_updates()

    def check_host_updates(self) -> None:
        """A fixed MPI world has no host updates: nothing to do."""

    def save(self) -> None:
        raise NotImplementedError

    def restore(self) -> None:
        raise NotImplementedError

    def sync(self) -> None:
        raise NotImplementedError


class ObjectState(State):
    """State of plain Python attributes (given as keyword arguments)."""

    def __init__(self, bcast_object: Callable | None = None, get_rank: Callable | None = None, **kwargs: Any):
        super().__init__(bcast_object, get_rank)
        self._saved_state = dict(kwargs)
        self._set_attrs()

    def _set_attrs(self) -> None:
        for attr, value in self._saved_state.items():
            setattr(self, attr, value)

    def save(self) -> None:
        self._saved_state = {attr: copy.deepcopy(getattr(self, attr)) for attr in self._saved_state}

    def restore(self) -> None:
        self._set_attrs()

    def sync(self) -> None:
        if self._saved_state:
            self._saved_state = self._bcast_object(self._saved_state)
            self._set_attrs()


class TorchState(ObjectState):
    """State of a model, an optimizer and plain attributes (``TorchState(model, optimizer,
    epoch=0, batch=0)``): commit copies their ``state_dict``s, restore loads them back, sync
    broadcasts parameters, optimizer state and attributes from rank 0."""

    def __init__(self, model: torch.nn.Module | None = None, optimizer: torch.optim.Optimizer | None = None,
                 **kwargs: Any):
        from . import broadcast_object, rank

        self.model = model
        self.optimizer = optimizer
        self._saved_model = copy.deepcopy(model.state_dict()) if model is not None else None
        self._saved_optimizer = copy.deepcopy(optimizer.state_dict()) if optimizer is not None else None
        super().__init__(broadcast_object, rank, **kwargs)

    def save(self) -> None:
        if self.model is not None:
            self._saved_model = copy.deepcopy(self.model.state_dict())
        if self.optimizer is not None:
            self._saved_optimizer = copy.deepcopy(self.optimizer.state_dict())
        super().save()

    def restore(self) -> None:
        if self.model is not None:
            self.model.load_state_dict(self._saved_model)
        if self.optimizer is not None:
            self.optimizer.load_state_dict(self._saved_optimizer)
        super().restore()

    def sync(self) -> None:
        from . import broadcast_optimizer_state, broadcast_parameters

        if self.model is not None:
            broadcast_parameters(self.model.state_dict(), root_rank=0)
        if self.optimizer is not None:
            broadcast_optimizer_state(self.optimizer, root_rank=0)
        super().sync()


def run(func: Callable) -> Callable:
    """Decorates ``func(state, *args, **kwargs)``: syncs the state from rank 0, runs it, and
    on :class:`HorovodInternalError` restores the last commit, re-syncs and retries (at most
    ``HOROVOD_ELASTIC_RETRIES`` times, default 3; then the error is raised)."""
    from . import HorovodInternalError, HostsUpdatedInterrupt

    @functools.wraps(func)
    def wrapper(state: State, *args: Any, **kwargs: Any) -> Any:
        retries = int(os.environ.get("HOROVOD_ELASTIC_RETRIES", 3))
        failures = 0
        skip_sync = False
        while True:
            try:
                if not skip_sync:
                    state.sync()
                return func(state, *args, **kwargs)
            except HorovodInternalError:
                failures += 1
                if failures > retries:
                    raise
                state.restore()
                skip_sync = False
            except HostsUpdatedInterrupt as interrupt:  # not raised in a fixed world; kept for scripts
                skip_sync = interrupt.skip_sync
            state.on_reset()

    return wrapper
