"""The SGD and Adam updates of the numba backend: every parameter in one kernel call.

Shapes: params, grads and each state list hold arrays of matching shapes, any shape,
C-contiguous (updated in place through flat views). Parameters and state go to the
kernels as numba typed Lists, kept across steps; gradients, new every step, as a
tuple; ``spans`` rows (list index, start, stop) cut them into pieces for the threads.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from numba import typed

from ...kernels.cpu import optim as kernels
from ...kernels.cpu.runtime import run
from .scratch import contiguous

# The optimizer updates take the gradients as a tuple (_gradient_tuple), whose length
# numba compiles for: rounded up to a multiple of this, a few lengths cover every model.
GRADIENT_TUPLE_STEP = 16
# Parameters per optimizer-update call: numba's parallel loops take tuples of at most 100
# entries, so a model with more parameter tensors is updated in groups of this many (a
# multiple of GRADIENT_TUPLE_STEP, so the groups add no tuple lengths to compile).
UPDATE_MAX_TENSORS = 64
# Elements per parallel step of the optimizer updates: big enough to stream, small
# enough that the pieces of a model's parameters share the threads evenly.
UPDATE_PIECE = 1 << 15


class OptimizerUpdates:
    """One fused pass over every parameter (all of a step's arithmetic per element, in
    place), instead of the reference's several whole-array numpy operations each. Uses
    ``self._lists`` and ``self._piece_tables`` (mixed into NumbaBackend)."""

    def sgd_update(self, params: Sequence[np.ndarray], grads: Sequence[np.ndarray],
                   buffers: Sequence[np.ndarray], lr: float, momentum: float,
                   dampening: float, nesterov: bool, weight_decay: float,
                   first_step: bool) -> None:
        for group, chosen in _update_groups(params):
            gradients = _gradient_tuple(params, grads, chosen)
            # Without momentum the kernel never touches the buffers.
            buffer_list = (self._cached_typed_list(("buffers", group), buffers, chosen)
                           if momentum else gradients)
            sizes = [params[i].size for i in chosen]
            run(kernels.sgd_update, sum(sizes),
                self._cached_typed_list(("params", group), params, chosen), gradients,
                buffer_list, self._spans(sizes), float(lr), float(momentum),
                float(1 - dampening), bool(nesterov), float(weight_decay), bool(first_step))

    def adam_update(self, params: Sequence[np.ndarray], grads: Sequence[np.ndarray],
                    exp_avgs: Sequence[np.ndarray], exp_avg_sqs: Sequence[np.ndarray],
                    step: int, lr: float, beta1: float, beta2: float, eps: float,
                    weight_decay: float, decoupled: bool) -> None:
        bias1, bias2 = 1 - beta1**step, 1 - beta2**step
        for group, chosen in _update_groups(params):
            lists = (self._cached_typed_list(("params", group), params, chosen),
                     _gradient_tuple(params, grads, chosen),
                     self._cached_typed_list(("exp_avgs", group), exp_avgs, chosen),
                     self._cached_typed_list(("exp_avg_sqs", group), exp_avg_sqs, chosen))
            sizes = [params[i].size for i in chosen]
            run(kernels.adam_update, sum(sizes), *lists, self._spans(sizes),
                float(lr / bias1), float(beta1), float(1 - beta1), float(beta2),
                float(1 - beta2), float(bias2), float(eps), float(weight_decay),
                float(1 - lr * weight_decay), bool(decoupled))

    def _cached_typed_list(self, role, arrays, chosen):
        """``_typed_list`` of arrays[i] for i in chosen, kept while the same arrays come
        back: parameters and optimizer state persist across steps, and building a typed
        List costs tens of microseconds a step. One list per role (a name and an update
        group): the entry
        holds its arrays (so their ids stay theirs) until a call with other arrays of
        that role replaces it, so the backend keeps the last-updated model's parameters
        and state alive until then."""
        picked = [arrays[i] for i in chosen]
        key = tuple(map(id, picked))
        cached = self._lists.get(role)
        if cached is None or cached[0] != key:
            cached = (key, _typed_list(picked), picked)
            self._lists[role] = cached
        return cached[1]

    def _spans(self, sizes):
        """(pieces, 3) int64 rows (list index, start, stop) that cut arrays of ``sizes``
        into pieces of at most UPDATE_PIECE elements."""
        key = (tuple(sizes), UPDATE_PIECE)
        spans = self._piece_tables.get(key)
        if spans is None:
            rows = [(i, start, min(start + UPDATE_PIECE, size))
                    for i, size in enumerate(sizes) for start in range(0, size, UPDATE_PIECE)]
            spans = np.array(rows, dtype=np.int64).reshape(-1, 3)
            self._piece_tables[key] = spans
        return spans


def _by_dtype(arrays) -> list[list[int]]:
    """Index lists of ``arrays`` grouped by dtype: a typed List holds one array type."""
    groups: dict[np.dtype, list[int]] = {}
    for i, a in enumerate(arrays):
        groups.setdefault(a.dtype, []).append(i)
    return list(groups.values())


def _update_groups(arrays):
    """(number, indexes) of the optimizer-update calls for ``arrays``: one dtype each, at
    most UPDATE_MAX_TENSORS arrays each. The number names the group's cached lists."""
    chunks = [indexes[start : start + UPDATE_MAX_TENSORS] for indexes in _by_dtype(arrays)
              for start in range(0, len(indexes), UPDATE_MAX_TENSORS)]
    return list(enumerate(chunks))


def _gradient_tuple(params, grads, chosen):
    """Flat views of grads[i] for i in chosen, contiguous and in params[i]'s dtype, as a
    tuple for the update kernels, padded with empty arrays (which no span names) to a
    multiple of GRADIENT_TUPLE_STEP entries.

    Not a typed List, as parameters and state are: gradients are new arrays every step,
    and numba unboxes a tuple of them far faster than a typed List is built. numba
    compiles a kernel for each tuple length, hence the padding."""
    flat = [_flat(_writeable(contiguous(grads[i]).astype(params[i].dtype, copy=False)))
            for i in chosen]
    padding = -len(flat) % GRADIENT_TUPLE_STEP
    return tuple(flat) + (np.empty(0, dtype=params[chosen[0]].dtype),) * padding


def _writeable(a):
    """a, or a copy of it if it is read-only: numba gives read-only arrays a type of their
    own, and a tuple's entries must share one type to be indexed in a loop."""
    return a if a.flags.writeable else a.copy()


def _typed_list(arrays):
    """A numba typed List of flat views of C-contiguous arrays, for the update kernels."""
    return typed.List([_flat(a) for a in arrays])


def _flat(a):
    """A 1-D view of a contiguous array; updates through it land in ``a`` itself."""
    if not a.flags.c_contiguous:
        raise ValueError("optimizer update: Expect: C-contiguous parameters and state. "
                         f"Actual: an array of shape {a.shape} with strides {a.strides}.")
    return a.reshape(-1)
