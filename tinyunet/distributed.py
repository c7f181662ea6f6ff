"""Data-parallel training over MPI: one process (a rank) per core group or GPU.

    mpiexec -n 2 tinyunet train ...                     # the CLI finds the launcher
    Trainer(config, comm=Communicator()).fit()           # the Python API, under mpiexec

Every rank holds the whole model and draws the same global batch of
``batch_size * size`` samples from the shared generator; each trains on its shard of
it, and one allreduce per step sums the gradients. ``Trainer`` (tinyunet/train.py) calls
the methods here; this module knows MPI, not training.

Shapes: the gradients travel in one flat 1-D array per dtype (``FlatGradients``):
every parameter's gradient raveled, in parameter order, and at the end of the first
array two status entries (this rank's share of the loss, and 1 when the rank failed in
the step). Each rank scales its gradient by its share of the global batch before the
sum, so the sum is the global batch's mean gradient, also when the last batch of an
epoch leaves the ranks unequal shards (or none).

The reduction is MPI's ``Allreduce`` on host arrays. With the ``cuda`` backend on a real
GPU it is NCCL through CuPy (``cupy.cuda.nccl``) on the device buffer, with no host
copy; each rank takes the GPU of its local rank (its index among the ranks of its node).

Failures end the whole job, never one rank alone (the others would wait forever):
- an error every rank meets at the same point of the program (setup, a step, the
  validation) is agreed on in a collective, and every rank raises a
  ``DistributedError`` whose message names the failing rank;
- any other exception that escapes a rank prints one line and calls ``MPI_Abort``;
- a collective that waits longer than the timeout (``TINYUNET_MPI_TIMEOUT`` seconds,
  default 600: a rank hangs, or died under a launcher that left the others running)
  prints one line and aborts. A rank killed by a signal is seen by ``mpiexec``, which
  ends the others itself.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import sys
import threading
import time
from collections.abc import Callable, Mapping
from typing import Any, NoReturn

import numpy as np

from .autograd import Tensor

# What MPI launchers put in each process's environment: MPICH's and Intel MPI's hydra
# (PMI_*), Open MPI (OMPI_*), MVAPICH (MV2_*). Read before MPI is started, so that a
# launch without mpi4py still gives a clear error.
SIZE_VARIABLES = ("PMI_SIZE", "OMPI_COMM_WORLD_SIZE", "MV2_COMM_WORLD_SIZE")
RANK_VARIABLES = ("PMI_RANK", "OMPI_COMM_WORLD_RANK", "MV2_COMM_WORLD_RANK")
TIMEOUT_VARIABLE = "TINYUNET_MPI_TIMEOUT"
DEFAULT_TIMEOUT = 600.0  # seconds; a first step also compiles the numba kernels
# Ranks other than 0 wait this much longer before they abort, so that rank 0's line
# is the one printed when every rank is left waiting.
OTHER_RANKS_GRACE = 10.0
ABORT_OUTPUT_GRACE_S = 0.5  # time for the launcher to forward a rank's last lines


class DistributedError(RuntimeError):
    """Raised on every rank together: the job stops cleanly with this one message."""


class RankFailure(DistributedError):
    """A rank met an error; the message is that rank's (named, unless all failed alike)."""


class RankMismatch(DistributedError):
    """Ranks disagree on what must be equal: the config, the data, a checkpoint, the weights."""


def launcher_processes(environ: Mapping[str, str] | None = None) -> int:
    """How many processes an MPI launcher started (1 when none did)."""
    environ = os.environ if environ is None else environ
    for name in SIZE_VARIABLES:
        value = environ.get(name, "")
        if value.isdigit():
            return int(value)
    return 1


def launcher_rank(environ: Mapping[str, str] | None = None) -> int:
    """This process's rank as the launcher numbered it (0 when not launched by one)."""
    environ = os.environ if environ is None else environ
    for name in RANK_VARIABLES:
        value = environ.get(name, "")
        if value.isdigit():
            return int(value)
    return 0


def from_launcher(timeout: float | None = None) -> Communicator | None:
    """A Communicator over every process the MPI launcher started, or None when this
    process was not started as one of several.

    Raises ImportError when mpi4py (or the MPI library it needs) is missing, and
    DistributedError when MPI sees fewer processes than the launcher started (mpi4py
    linked to another MPI than the launcher's: each process would train alone).
    """
    processes = launcher_processes()
    if processes <= 1:
        return None
    try:
        from mpi4py import MPI
    except (ImportError, RuntimeError) as error:
        raise ImportError(
            f"this process is one of {processes} started by an MPI launcher, but mpi4py "
            f"cannot be used ({type(error).__name__}: {error}). Install it with: pip "
            "install 'tinyunet[mpi]' (or your cluster's mpi4py), or run without mpiexec"
        ) from error
    seen = MPI.COMM_WORLD.Get_size()
    if seen != processes:
        raise DistributedError(
            f"Expect: MPI to see the {processes} processes the launcher started. Actual: "
            f"it sees {seen}, so mpi4py uses another MPI library than this mpiexec; launch "
            "with the mpiexec of the MPI that mpi4py uses (python -m mpi4py --mpi-library)"
        )
    return Communicator(timeout=timeout)


def describe_error(error: BaseException) -> str:
    """An error as one line: the message of tinyunet's and the user's errors (bad
    options, data, files), the type too for anything else (a bug, a crash)."""
    message = " ".join(str(error).split())
    known = isinstance(error, (ValueError, ImportError, OSError)) or type(
        error).__module__.startswith("tinyunet")
    return message if known and message else f"{type(error).__name__}: {message}"


# ---- the gradients as flat buffers ---------------------------------------------------

class FlatGradients:
    """The gradients of ``params`` packed into one flat array per dtype, on their backend.

    Shapes: ``buffers[k]`` is (n_k,) for the n_k gradient entries of the k-th dtype
    (first seen first), plus ``STATUS`` entries at the end of ``buffers[0]``.
    ``pack`` copies (and scales) every gradient in; ``unpack`` makes each parameter's
    ``grad`` a view of its slice, so the optimizer reads the reduced sums in place.
    """

    STATUS = 2  # this rank's share of the loss; 1 when this rank failed in the step

    def __init__(self, params: list[Tensor]):
        self.backend = params[0].backend
        self.shapes = [tuple(p.shape) for p in params]
        dtypes = list(dict.fromkeys(np.dtype(p.dtype) for p in params))
        sizes = [0] * len(dtypes)
        self.slots = []  # per parameter: (buffer index, start, stop)
        for p in params:
            k = dtypes.index(np.dtype(p.dtype))
            size = int(np.prod(p.shape))
            self.slots.append((k, sizes[k], sizes[k] + size))
            sizes[k] += size
        xp = self.backend.xp
        self.buffers = [xp.zeros(size + (self.STATUS if k == 0 else 0), dtype=dtype)
                        for k, (size, dtype) in enumerate(zip(sizes, dtypes, strict=True))]

    def fits(self, params: list[Tensor]) -> bool:
        return (len(params) == len(self.shapes) and params[0].backend is self.backend
                and all(tuple(p.shape) == s for p, s in zip(params, self.shapes, strict=True)))

    @property
    def nbytes(self) -> int:
        """Bytes reduced per step (the status entries included)."""
        return sum(int(b.nbytes) for b in self.buffers)

    def pack(self, params: list[Tensor], share: float, loss: Tensor | None,
             failed: bool) -> None:
        """Copy ``share * grad`` of every parameter in (zeros for a parameter without a
        gradient, or when ``failed``), and the status: ``share * loss`` and ``failed``."""
        xp = self.backend.xp
        for p, (k, start, stop) in zip(params, self.slots, strict=True):
            target = self.buffers[k][start:stop]
            if p.grad is None or failed:
                target[...] = 0
            elif share == 1.0:
                target[...] = p.grad.data.reshape(-1)
            else:
                xp.multiply(p.grad.data.reshape(-1), share, out=target)
        status = self.buffers[0][-self.STATUS:]
        # Assigned on the backend: on a GPU the loss stays on the device until read.
        status[0] = 0 if loss is None or failed else loss.data.reshape(()) * share
        status[1] = 1 if failed else 0

    def unpack(self, params: list[Tensor]) -> None:
        """Point every parameter's ``grad`` at its slice of the (reduced) buffers."""
        for p, shape, (k, start, stop) in zip(params, self.shapes, self.slots, strict=True):
            p.grad = Tensor._wrap(self.buffers[k][start:stop].reshape(shape), self.backend)

    def status(self) -> tuple[float, int]:
        """(summed loss shares, number of failed ranks), read to the host."""
        loss, failed = self.backend.to_numpy(self.buffers[0][-self.STATUS:]).tolist()
        return float(loss), int(round(failed))


# ---- NCCL for device buffers ------------------------------------------------------------

class NcclReducer:
    """Sums device buffers across ranks with NCCL, in place, on the current CuPy stream.

    The NCCL communicator's id is made by rank 0 and broadcast over MPI. ``nccl`` is the
    ``cupy.cuda.nccl`` module (a stand-in with the same calls in the tests, where
    there is no NCCL).
    """

    def __init__(self, mpi_comm, nccl=None, stream: Callable[[], int] | None = None):
        if nccl is None:
            from cupy.cuda import nccl as cupy_nccl

            nccl = cupy_nccl
        self.nccl = nccl
        self.stream = stream if stream is not None else _current_stream_pointer
        uid = nccl.get_unique_id() if mpi_comm.Get_rank() == 0 else None
        uid = mpi_comm.bcast(uid, root=0)
        self.comm = nccl.NcclCommunicator(mpi_comm.Get_size(), uid, mpi_comm.Get_rank())
        self.dtypes = {np.dtype(np.float32): nccl.NCCL_FLOAT32,
                       np.dtype(np.float64): nccl.NCCL_FLOAT64,
                       np.dtype(np.float16): nccl.NCCL_FLOAT16}

    def allreduce(self, buffer) -> None:
        pointer = _pointer(buffer)
        self.comm.allReduce(pointer, pointer, buffer.size, self.dtypes[np.dtype(buffer.dtype)],
                            self.nccl.NCCL_SUM, self.stream())


def _pointer(array) -> int:
    """The address of an array's data: device memory for CuPy, host memory for numpy
    (the CUDA simulator's stand-in for device arrays)."""
    data = array.data
    return data.ptr if hasattr(data, "ptr") else array.ctypes.data


def _current_stream_pointer() -> int:
    import cupy

    return cupy.cuda.get_current_stream().ptr


# ---- the communicator -------------------------------------------------------------------

class Communicator:
    """An MPI communicator for training (``MPI.COMM_WORLD`` by default).

    ``rank``, ``size``; ``local_rank``/``local_size``: the index and the count of the
    ranks on this node. Creating one installs an excepthook that ends the whole job
    (``MPI_Abort``) when an exception escapes any rank.
    """

    def __init__(self, mpi_comm=None, timeout: float | None = None):
        from mpi4py import MPI

        self.MPI = MPI
        self.comm = MPI.COMM_WORLD if mpi_comm is None else mpi_comm
        self.rank, self.size = self.comm.Get_rank(), self.comm.Get_size()
        node = self.comm.Split_type(MPI.COMM_TYPE_SHARED)
        self.local_rank, self.local_size = node.Get_rank(), node.Get_size()
        node.Free()
        if timeout is None:
            timeout = float(os.environ.get(TIMEOUT_VARIABLE, DEFAULT_TIMEOUT))
        self.timeout = timeout
        self._watchdog = _Watchdog(self)
        self._flat: FlatGradients | None = None
        self._nccl: NcclReducer | None = None
        _install_excepthook(self)

    def __repr__(self):
        return f"Communicator(rank {self.rank} of {self.size}, local rank {self.local_rank})"

    # -- the end of the job --
    def abort(self, message: str | None = None, code: int = 1) -> NoReturn:
        """Print ``tinyunet: error: rank r of P: message`` (unless None) and end every
        rank's process with exit status ``code``."""
        if message is not None:
            print(f"tinyunet: error: rank {self.rank} of {self.size}: {message}",
                  file=sys.__stderr__, flush=True)
        for stream in (sys.stdout, sys.stderr):
            with contextlib.suppress(Exception):
                stream.flush()
        # The launcher forwards each rank's output through pipes, and MPI_Abort ends
        # that forwarding: without a pause the last lines written were lost at times.
        time.sleep(ABORT_OUTPUT_GRACE_S)
        self.comm.Abort(code)
        os._exit(code)  # MPI_Abort called from a thread may return before the end comes

    # -- agreement --
    def gather(self, value: Any = None, error: BaseException | None = None,
               what: str = "") -> list:
        """Every rank's ``value``, in rank order (an allgather); the point where ranks
        learn of each other's errors. When any rank passes an ``error``, every rank
        raises RankFailure with that error's message. ``what`` names the wait for the
        timeout's message.
        """
        text = None if error is None else describe_error(error)
        with self._watchdog.waiting(what or "a collective"):
            answers = self.comm.allgather((text, value))
        failed = [(rank, text) for rank, (text, _) in enumerate(answers) if text is not None]
        if failed:
            raise RankFailure(self._failure_message(failed)) from error
        return [value for _, value in answers]

    def _failure_message(self, failed: list[tuple[int, str]]) -> str:
        texts = {text for _, text in failed}
        if len(failed) == self.size and len(texts) == 1:
            return failed[0][1]  # every rank failed alike: the plain message
        rank, text = failed[0]
        others = [r for r, _ in failed[1:]]
        also = f" (ranks {', '.join(map(str, others))} failed too)" if others else ""
        return f"rank {rank} of {self.size}: {text}{also}"

    def check_same(self, value: Any, what: str, error: BaseException | None = None) -> None:
        """Raise RankMismatch on every rank unless every rank passed an equal ``value``."""
        values = self.gather(value, error, f"the check of {what}")
        differ = [rank for rank, v in enumerate(values) if v != values[0]]
        if differ:
            raise RankMismatch(
                f"Expect: every rank to have the same {what}. Actual: rank(s) "
                f"{', '.join(map(str, differ))} of {self.size} differ from rank 0; start "
                "every rank with the same options, data and files")

    def together(self, work: Callable[..., Any], *args: Any) -> Any:
        """``work(*args)`` on every rank, then an agreement: an error on any rank is
        raised on all (RankFailure). ``work`` may itself call ``gather``/``check_same``:
        a rank that fails before one of them meets the others there."""
        try:
            result = work(*args)
        except DistributedError:
            raise  # already agreed on by every rank
        except Exception as error:  # noqa: BLE001 - any error must reach the other ranks
            self.gather(error=error, what="the start")  # raises RankFailure on every rank
        self.gather(what="the start")
        return result

    # -- GPUs --
    def bind_gpu(self, simulated: bool = False) -> None:
        """Use GPU ``local_rank`` (modulo the GPUs on this node) for CuPy and numba, and
        NCCL for the gradient sums. Under the CUDA simulator only MPI is used."""
        if simulated:
            return
        import cupy
        from numba import cuda

        device = self.local_rank % cupy.cuda.runtime.getDeviceCount()
        cupy.cuda.Device(device).use()
        cuda.select_device(device)
        with self._watchdog.waiting("the start of NCCL"):
            self.use_nccl(NcclReducer(self.comm))

    def use_nccl(self, reducer: NcclReducer) -> None:
        """Reduce gradients with ``reducer`` (an NcclReducer) from now on."""
        self._nccl = reducer

    # -- the step --
    def reduce_gradients(self, params: list[Tensor], loss: Tensor | None, share: float,
                         error: BaseException | None = None) -> float:
        """Sum ``share * grad`` over every rank, one allreduce per dtype; return the
        summed ``share * loss``: the global batch's mean loss.

        params: every trained parameter, in the same order on every rank. loss: this
        rank's mean loss over its shard (None when its shard is empty). share: its
        shard's part of the global batch. error: what this rank met in the step, if
        anything; it still takes part, so that every rank raises RankFailure together.
        Afterwards each parameter's ``grad`` is the global mean gradient.
        """
        if self._flat is None or not self._flat.fits(params):
            self._flat = FlatGradients(params)
        flat = self._flat
        flat.pack(params, share, loss, failed=error is not None)
        with self._watchdog.waiting("the gradient allreduce of a training step"):
            for buffer in flat.buffers:
                if self._nccl is not None:
                    self._nccl.allreduce(buffer)
                else:
                    self.comm.Allreduce(self.MPI.IN_PLACE, buffer, op=self.MPI.SUM)
        total_loss, failed = flat.status()
        if failed:
            self.gather(error=error, what="the report of a failed step")
        flat.unpack(params)
        return total_loss

    @property
    def reduced_bytes(self) -> int:
        """Bytes each rank reduces per step (0 before the first step)."""
        return 0 if self._flat is None else self._flat.nbytes

    def shard(self, count: int) -> range:
        """The items of ``range(count)`` this rank takes: contiguous, sizes within one."""
        pieces = np.array_split(np.arange(count), self.size)
        mine = pieces[self.rank]
        return range(int(mine[0]), int(mine[-1]) + 1) if len(mine) else range(0)


def digest(*parts: Any) -> str:
    """A hex digest of JSON-able values and numpy arrays (shape, dtype and bytes)."""
    h = hashlib.blake2b(digest_size=16)
    for part in parts:
        if isinstance(part, np.ndarray):
            h.update(f"{part.shape}{part.dtype.str}".encode())
            h.update(np.ascontiguousarray(part).tobytes())
        else:
            h.update(json.dumps(part, sort_keys=True, default=str).encode())
    return h.hexdigest()


def dataset_digest(dataset) -> str:
    """A digest of every sample of ``dataset`` (its images and masks, in order)."""
    h = hashlib.blake2b(digest_size=16)
    for index in range(len(dataset)):
        image, mask = dataset[index]
        h.update(digest(np.asarray(image), np.asarray(mask)).encode())
    return h.hexdigest()


def file_digest(path: str | os.PathLike) -> str:
    h = hashlib.blake2b(digest_size=16)
    with open(path, "rb") as file:
        for block in iter(lambda: file.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


# ---- ending the job ---------------------------------------------------------------------

def _install_excepthook(comm: Communicator):
    """After the usual traceback, an exception that escapes a rank ends every rank (the
    others would wait in their next collective). DistributedErrors are raised by every
    rank together, so those ranks just exit."""
    previous = sys.excepthook

    def hook(kind, error, traceback):
        previous(kind, error, traceback)
        if not issubclass(kind, DistributedError):
            comm.abort(f"stopped by {describe_error(error)}; ending the job")

    sys.excepthook = hook


class _Watchdog:
    """Aborts the job when one collective waits longer than ``comm.timeout`` seconds.

    A daemon thread sleeps until a wait starts, then until it ends or its deadline
    passes; mpi4py releases the GIL inside MPI calls, so the thread runs meanwhile.
    """

    def __init__(self, comm: Communicator):
        self.comm = comm
        self.condition = threading.Condition()
        self.what: str | None = None
        self.started = 0.0
        self.count = 0  # waits begun so far
        threading.Thread(target=self._watch, name="tinyunet-mpi-watchdog", daemon=True).start()

    @contextlib.contextmanager
    def waiting(self, what: str):
        with self.condition:
            self.what, self.started = what, time.monotonic()
            self.count += 1
            self.condition.notify()
        try:
            yield
        finally:
            with self.condition:
                self.what = None
                self.condition.notify()

    def _watch(self):
        limit = self.comm.timeout + (OTHER_RANKS_GRACE if self.comm.rank else 0.0)
        while True:
            with self.condition:
                self.condition.wait_for(lambda: self.what is not None)
                count, deadline = self.count, self.started + limit
                ended = self.condition.wait_for(
                    lambda count=count: self.what is None or self.count != count,
                    timeout=max(0.0, deadline - time.monotonic()))
                if ended:
                    continue
                what = self.what
            self.comm.abort(
                f"waited {self.comm.timeout:g} s for the other ranks in {what}: a rank "
                f"crashed or hangs; ending the job ({TIMEOUT_VARIABLE} sets the limit in "
                "seconds)")
