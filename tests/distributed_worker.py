"""Runs that tests/model/test_distributed.py starts, under ``mpiexec -n P`` or as one process.

    python tests/distributed_worker.py train CONFIG_JSON RESULT_NPZ
        With a launcher: one run on every rank (Trainer(config, comm=...)); without one:
        a single process. Writes the final weights to RESULT_NPZ (rank 0). CONFIG_JSON
        is a JSON list of TrainConfig dicts, run one after the other (weights of run i
        as "i/<name>"). A config with "stop_after" is interrupted after that many
        epochs and resumed in a new Trainer from its last.npz; one with "resume" (a
        checkpoint path) starts from that checkpoint.
    python tests/distributed_worker.py cuda-sim RESULT_NPZ
        A tiny U-Net on the cuda backend under the CUDA simulator, float64, 3 SGD steps
        on a batch of 4 shared by the ranks, the gradients summed through NcclReducer
        with StandInNccl; writes the losses and the weights (rank 0).
    python tests/distributed_worker.py hang SECONDS
        Rank 1 sleeps instead of joining the gradient allreduce; the others wait in it
        with a timeout of SECONDS (the watchdog's test).
    python tests/distributed_worker.py raise
        Rank 1 raises outside any agreement; the excepthook must end the job.
    python tests/distributed_worker.py fail-step
        Rank 1 fails inside a step; every rank must raise RankFailure together.
    python tests/distributed_worker.py drift
        Rank 1's weights are changed behind the Trainer's back; the validation's check
        must stop every rank with RankMismatch.
"""

from __future__ import annotations

import ctypes
import json
import sys
import time

import numpy as np

import tinyunet as tu
import tinyunet.functional as F
from tinyunet import nn, optim
from tinyunet.distributed import (
    Communicator,
    NcclReducer,
    RankFailure,
    RankMismatch,
    from_launcher,
)
from tinyunet.train import TrainConfig, Trainer


def train(config_json: str, result_path: str):
    comm = from_launcher()
    results = {}
    for index, fields in enumerate(json.loads(config_json)):
        stop_after = fields.pop("stop_after", None)
        resume = fields.pop("resume", None)
        config = TrainConfig(**fields)
        trainer = Trainer(config, log=lambda *_: None, progress_stream=False, comm=comm)
        if resume is not None:
            trainer.restore(resume)
        if stop_after is not None:
            trainer.fit(stop_after=stop_after)
            trainer = Trainer(config, log=lambda *_: None, progress_stream=False, comm=comm)
            trainer.restore(f"{config.out}/last.npz")
        trainer.fit()
        for name, parameter in trainer.model.named_parameters():
            results[f"{index}/{name}"] = parameter.numpy()
        results[f"{index}/train_loss"] = np.array([h["train_loss"] for h in trainer.history])
        results[f"{index}/val_dice"] = np.array([h["val_dice"] for h in trainer.history])
    if comm is None or comm.rank == 0:
        np.savez(result_path, **results)


def _tiny_step(comm: Communicator):
    """One parameter, one gradient: what reduce_gradients needs."""
    p = tu.tensor(np.ones(3, np.float32), requires_grad=True, backend="numpy")
    p.grad = tu.tensor(np.full(3, comm.rank + 1.0, np.float32), backend="numpy")
    return p


def hang(seconds: str):
    comm = Communicator(timeout=float(seconds))
    p = _tiny_step(comm)
    if comm.rank == 1:
        time.sleep(120)
    comm.reduce_gradients([p], None, 0.5)


def raise_outside():
    comm = Communicator()
    p = _tiny_step(comm)
    if comm.rank == 1:
        raise RuntimeError("rank 1 broke down")
    comm.reduce_gradients([p], None, 0.5)


def fail_step():
    comm = Communicator()
    p = _tiny_step(comm)
    error = ValueError("a bad sample on rank 1") if comm.rank == 1 else None
    try:
        comm.reduce_gradients([p], None, 0.5, error)
    except RankFailure as failure:
        print(f"rank {comm.rank} raised RankFailure: {failure}", flush=True)
        return
    print(f"rank {comm.rank} did not raise", flush=True)


def drift():
    comm = from_launcher()
    config = TrainConfig(backend="numpy", depth=1, base_channels=2, crop=16, synthetic_train=2,
                         synthetic_val=2, synthetic_size=16, out="unused")
    trainer = Trainer(config, log=lambda *_: None, progress_stream=False, comm=comm)
    if comm.rank == 1:
        next(iter(trainer.model.parameters())).data[...] += 1e-3
    try:
        trainer.evaluate()
    except RankMismatch as mismatch:
        print(f"rank {comm.rank} raised RankMismatch: {mismatch}", flush=True)
        return
    print(f"rank {comm.rank} did not raise", flush=True)


class StandInNccl:
    """The part of ``cupy.cuda.nccl`` that NcclReducer calls, done over MPI on host
    memory (the simulator's device arrays): allReduce receives the addresses, count,
    dtype code, op and stream that NCCL would, and reduces the memory they point at."""

    NCCL_FLOAT16, NCCL_FLOAT32, NCCL_FLOAT64, NCCL_SUM = 6, 7, 8, 0  # nccl.h's values
    DTYPES = {6: ctypes.c_uint16, 7: ctypes.c_float, 8: ctypes.c_double}

    def __init__(self, comm: Communicator):
        self.mpi = comm
        self.calls = []

    def get_unique_id(self):
        return (self.mpi.size, 12345)

    def NcclCommunicator(self, size, uid, rank):  # noqa: N802 - NCCL's name
        assert (size, rank, uid) == (self.mpi.size, self.mpi.rank, (self.mpi.size, 12345))
        return self

    def allReduce(self, send, receive, count, dtype, op, stream):  # noqa: N802
        assert send == receive and op == self.NCCL_SUM and stream == 0
        self.calls.append((count, dtype))
        memory = (self.DTYPES[dtype] * count).from_address(send)
        array = np.ctypeslib.as_array(memory)
        self.mpi.comm.Allreduce(self.mpi.MPI.IN_PLACE, array, op=self.mpi.MPI.SUM)


def cuda_sim(result_path: str):
    comm = from_launcher()
    nccl = StandInNccl(comm)
    comm.use_nccl(NcclReducer(comm.comm, nccl=nccl, stream=lambda: 0))
    tu.manual_seed(0)
    model = nn.UNet(1, 1, depth=1, base_channels=2).to("cuda")
    for p in model.parameters():
        p.data = p.data.astype(np.float64)
    opt = optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    rng = np.random.default_rng(0)
    images, masks = rng.standard_normal((4, 1, 6, 6)), (rng.random((4, 1, 6, 6)) > 0.5)
    shard = comm.shard(4)
    mine = slice(shard.start, shard.stop)
    losses = []
    for _ in range(3):
        opt.zero_grad()
        loss = F.bce_dice_loss(
            model(tu.tensor(images[mine], dtype=np.float64, backend="cuda")),
            tu.tensor(masks[mine], dtype=np.float64, backend="cuda"))
        loss.backward()
        losses.append(comm.reduce_gradients(opt.params, loss, len(shard) / 4))
        opt.step()
    if comm.rank == 0:
        count = sum(p.numpy().size for p in opt.params) + 2
        assert nccl.calls == [(count, StandInNccl.NCCL_FLOAT64)] * 3, nccl.calls
        np.savez(result_path, losses=np.array(losses), **dict(model.state_dict()))


if __name__ == "__main__":
    mode, *arguments = sys.argv[1:]
    {"train": train, "hang": hang, "raise": raise_outside, "fail-step": fail_step,
     "cuda-sim": cuda_sim, "drift": drift}[mode](
        *arguments)
