"""Data-parallel training over MPI (tinyunet/distributed.py and its hooks in the Trainer
and the CLI).

The packing of gradients and the launcher checks run in this process. Everything that
needs several ranks runs ``mpiexec -n 2`` on tests/distributed_worker.py or on the CLI
(the ``mpi`` extra: mpi4py and the mpich wheel); those tests are skipped, saying so,
only when mpi4py or mpiexec is missing. Every run uses one thread per process, as a
real job would on its cores.
"""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path

import numpy as np
import pytest

import tinyunet as tu
from tinyunet import cli
from tinyunet.checkpoint import read_checkpoint
from tinyunet.distributed import (
    FlatGradients,
    NcclReducer,
    describe_error,
    launcher_processes,
    launcher_rank,
)
from tinyunet.train import TrainConfig, Trainer

WORKER = Path(__file__).resolve().parents[1] / "distributed_worker.py"
MPIEXEC = shutil.which("mpiexec", path=os.pathsep.join(
    [str(Path(sys.executable).parent), os.environ.get("PATH", "")]))
HAVE_MPI = importlib.util.find_spec("mpi4py") is not None and MPIEXEC is not None
needs_mpi = pytest.mark.skipif(
    not HAVE_MPI, reason="needs mpi4py and mpiexec: pip install -e '.[mpi]'")
ONE_THREAD = {"NUMBA_NUM_THREADS": "1", "OMP_NUM_THREADS": "1", "OPENBLAS_NUM_THREADS": "1"}
# Out of the launcher's variables: a run started from a test under mpiexec would
# otherwise take them for its own.
LAUNCHER_VARIABLES = ("PMI_SIZE", "PMI_RANK", "PMI_FD", "OMPI_COMM_WORLD_SIZE",
                      "OMPI_COMM_WORLD_RANK", "MV2_COMM_WORLD_SIZE", "MV2_COMM_WORLD_RANK")


def environment(**extra) -> dict:
    env = {k: v for k, v in os.environ.items() if k not in LAUNCHER_VARIABLES}
    return {**env, **ONE_THREAD, **extra}


def run(command: list[str], cwd, timeout=240, **env) -> subprocess.CompletedProcess:
    return subprocess.run(command, cwd=cwd, env=environment(**env), capture_output=True,
                          text=True, timeout=timeout)


def mpiexec(*arguments) -> list[str]:
    return [MPIEXEC, "-n", "2", *arguments]


def tinyunet_cli() -> list[str]:
    return [sys.executable, "-m", "tinyunet"]


def error_lines(text: str) -> list[str]:
    return [line for line in text.splitlines() if line.startswith("tinyunet: error:")]


# ---- in this process ------------------------------------------------------------------

def test_launcher_variables():
    assert launcher_processes({}) == 1 and launcher_rank({}) == 0
    assert launcher_processes({"PMI_SIZE": "4", "PMI_RANK": "3"}) == 4
    assert launcher_rank({"PMI_SIZE": "4", "PMI_RANK": "3"}) == 3
    assert launcher_processes({"OMPI_COMM_WORLD_SIZE": "2"}) == 2
    assert launcher_rank({"OMPI_COMM_WORLD_RANK": "1"}) == 1


def test_describe_error_keeps_user_messages_plain():
    message = "--lr: Expect: a positive number. Actual: -1."
    assert describe_error(ValueError(message)) == message
    assert describe_error(KeyError("weights")) == "KeyError: 'weights'"


def test_flat_gradients_pack_scale_and_unpack(backend):
    """Two dtypes, a parameter without a gradient, a share of 1/4: the buffers hold
    share * grad in parameter order, then the status; unpack gives views of them."""
    rng = np.random.default_rng(0)
    shapes = [((2, 3), np.float32), ((4,), np.float64), ((3, 1, 2), np.float32), ((5,), np.float32)]
    params = [tu.tensor(rng.standard_normal(s), dtype=d, requires_grad=True, backend=backend)
              for s, d in shapes]
    grads = [rng.standard_normal(s).astype(d) for s, d in shapes]
    for p, g in zip(params[:3], grads[:3], strict=True):
        p.grad = tu.tensor(g, dtype=g.dtype, backend=backend)
    loss = tu.tensor(np.array(0.75, np.float32), backend=backend)

    flat = FlatGradients(params)
    flat.pack(params, 0.25, loss, failed=False)
    f32, f64 = (np.asarray(get(b)) for get, b in
                zip([tu.get_backend(backend).to_numpy] * 2, flat.buffers, strict=True))
    assert f32.dtype == np.float32 and f64.dtype == np.float64
    expected32 = np.concatenate([grads[0].ravel() / 4, grads[2].ravel() / 4, np.zeros(5),
                                 [0.75 / 4, 0]])
    np.testing.assert_array_equal(f32, expected32.astype(np.float32))
    np.testing.assert_array_equal(f64, grads[1] / 4)
    assert flat.nbytes == (6 + 6 + 5 + 2) * 4 + 4 * 8
    assert flat.status() == (0.75 / 4, 0)

    flat.unpack(params)
    for p, (shape, dtype) in zip(params, shapes, strict=True):
        assert p.grad.shape == shape and p.grad.dtype == dtype
    np.testing.assert_array_equal(params[0].grad.numpy(), grads[0] / 4)
    np.testing.assert_array_equal(params[3].grad.numpy(), np.zeros(5, np.float32))
    # The gradients are views: what the reduction writes is what the optimizer reads.
    flat.buffers[0][0] = 42
    assert params[0].grad.numpy()[0, 0] == 42

    flat.pack(params, 0.5, loss, failed=True)  # a failed rank sends zeros and its flag
    assert flat.status() == (0.0, 1)
    assert not tu.get_backend(backend).to_numpy(flat.buffers[1]).any()


def test_flat_gradients_fit_only_the_same_parameters():
    params = [tu.tensor(np.ones((2, 2)), requires_grad=True, backend="numpy")]
    flat = FlatGradients(params)
    assert flat.fits(params)
    assert not flat.fits([tu.tensor(np.ones((4,)), requires_grad=True, backend="numpy")])


def test_nccl_reducer_passes_the_device_buffer_in_place():
    """What NcclReducer hands NCCL (checked against a recording stand-in: NCCL itself
    needs GPUs): the uid made by rank 0 and broadcast, and one in-place allReduce of
    the whole buffer with its dtype's code on the current stream."""
    calls = []

    class OneRank:
        def Get_rank(self):  # noqa: N802 - mpi4py's names
            return 0

        def Get_size(self):  # noqa: N802
            return 1

        def bcast(self, value, root):
            calls.append(("bcast", value, root))
            return value

    class Recorder:
        NCCL_FLOAT16, NCCL_FLOAT32, NCCL_FLOAT64, NCCL_SUM = 6, 7, 8, 0

        def get_unique_id(self):
            return (1, 2, 3)

        def NcclCommunicator(self, size, uid, rank):  # noqa: N802
            calls.append(("init", size, uid, rank))
            return self

        def allReduce(self, send, receive, count, dtype, op, stream):  # noqa: N802
            calls.append(("allReduce", send, receive, count, dtype, op, stream))

    buffer = np.zeros(10, np.float32)
    reducer = NcclReducer(OneRank(), nccl=Recorder(), stream=lambda: 77)
    reducer.allreduce(buffer)
    address = buffer.ctypes.data
    assert calls == [("bcast", (1, 2, 3), 0), ("init", 1, (1, 2, 3), 0),
                     ("allReduce", address, address, 10, 7, 0, 77)]


def test_mpi_launch_without_mpi4py_is_one_line(monkeypatch, capsys, tmp_path):
    monkeypatch.setenv("PMI_SIZE", "2")
    monkeypatch.setenv("PMI_RANK", "0")
    monkeypatch.setitem(sys.modules, "mpi4py", None)  # makes `import mpi4py` fail
    code = cli.main(["train", "--backend", "numpy", "--out", str(tmp_path / "run")])
    err = capsys.readouterr().err
    assert code == 2
    assert error_lines(err) == err.strip().splitlines()
    assert "one of 2 started by an MPI launcher, but mpi4py cannot be used" in err
    assert "pip install 'tinyunet[mpi]'" in err
    assert not (tmp_path / "run").exists()


def test_predict_refuses_several_processes(monkeypatch, capsys, tmp_path):
    monkeypatch.setenv("PMI_SIZE", "2")
    monkeypatch.setenv("PMI_RANK", "0")
    code = cli.main(["predict", "--checkpoint", "x.npz", "--out", str(tmp_path), "y.png"])
    assert code == 2
    assert "predict: Expect: one process (only train runs on several)" in capsys.readouterr().err


# ---- two ranks ----------------------------------------------------------------------

# A tiny run: SGD with momentum, whose weights move by lr times the gradients, so the
# weights of two runs differ by about lr times the rounding of their summed gradients
# (Adam divides by sqrt(v) and so magnifies the rounding of near-zero gradients).
# 5 training images and a global batch of 4: the second step of each epoch has one
# image, so rank 1's shard is empty there.
TINY = dict(backend="numba", epochs=2, depth=2, base_channels=4, crop=32, synthetic_train=5,
            synthetic_val=3, synthetic_size=40, optimizer="sgd", lr=0.05, momentum=0.9,
            schedule="none")
# Weights are O(1); two runs of the same global batch differ by float32 rounding of
# the summed gradients (1.5e-8 measured), a run with another batch by about 3e-2.
TOLERANCE = 1e-6


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """Weights after: 2 ranks x batch 2, uninterrupted (0) and interrupted after epoch 1
    then resumed (1), and 1 epoch alone (2); one process with batch 4 (3) and with
    batch 2 (4); one process with batch 4 resuming run 2's 2-rank checkpoint (5)."""
    if not HAVE_MPI:
        pytest.skip("needs mpi4py and mpiexec: pip install -e '.[mpi]'")
    where = tmp_path_factory.mktemp("distributed")
    two = [dict(TINY, batch_size=2, out=str(where / "a")),
           dict(TINY, batch_size=2, out=str(where / "b"), stop_after=1),
           dict(TINY, batch_size=2, out=str(where / "e"), epochs=1)]
    done = run(mpiexec(sys.executable, str(WORKER), "train", json.dumps(two), "two.npz"),
               where)
    assert done.returncode == 0, done.stdout + done.stderr
    one = [dict(TINY, batch_size=4, out=str(where / "c")),
           dict(TINY, batch_size=2, out=str(where / "d")),
           dict(TINY, batch_size=4, out=str(where / "f"), resume=str(where / "e/last.npz"))]
    done = run([sys.executable, str(WORKER), "train", json.dumps(one), "one.npz"], where)
    assert done.returncode == 0, done.stdout + done.stderr
    two, one = np.load(where / "two.npz"), np.load(where / "one.npz")
    results = {}
    for source, first in ((two, 0), (one, 3)):
        for key in source.files:
            index, name = key.split("/", 1)
            results.setdefault(first + int(index), {})[name] = source[key]
    return where, results


def weights(result: dict) -> dict:
    return {k: v for k, v in result.items() if k not in ("train_loss", "val_dice")}


def largest_difference(a: dict, b: dict) -> float:
    wa, wb = weights(a), weights(b)
    assert wa.keys() == wb.keys()
    return max(float(np.abs(wa[k] - wb[k]).max()) for k in wa)


@needs_mpi
def test_two_ranks_equal_one_process_with_twice_the_batch(runs):
    _, r = runs
    assert largest_difference(r[0], r[3]) <= TOLERANCE
    np.testing.assert_allclose(r[0]["train_loss"], r[3]["train_loss"], rtol=1e-6)
    np.testing.assert_allclose(r[0]["val_dice"], r[3]["val_dice"], rtol=1e-6)
    # The check can tell: one process with the per-rank batch trains other weights.
    assert largest_difference(r[0], r[4]) > 1000 * TOLERANCE


@needs_mpi
def test_two_ranks_resume_bit_for_bit(runs):
    _, r = runs
    for name, value in weights(r[0]).items():
        np.testing.assert_array_equal(value, r[1][name], err_msg=name)


@needs_mpi
def test_one_process_continues_a_two_rank_checkpoint(runs):
    """Same sample order and augmentation after a change of ranks: with the same global
    batch the run matches the 2-rank one to float32 rounding."""
    where, r = runs
    assert largest_difference(r[0], r[5]) <= TOLERANCE
    assert read_checkpoint(where / "e/last.npz")[0]["ranks"] == 2
    assert read_checkpoint(where / "c/last.npz")[0]["ranks"] == 1


@needs_mpi
@pytest.mark.parametrize("batch, expect", [
    (4, "the global batch is the same (4), so the run follows the one it continues to "
        "float32 rounding, not bit for bit"),
    (2, "the global batch changes from 4 to 2, so the steps group the samples differently"),
])
def test_resume_with_other_ranks_prints_a_note(runs, batch, expect):
    where, _ = runs
    lines = []
    config = TrainConfig(**dict(TINY, backend="numpy", batch_size=batch,
                                out=str(where / "note")))
    Trainer(config, log=lines.append, progress_stream=False).restore(where / "e/last.npz")
    assert lines == [f"note: {where / 'e/last.npz'} was written by 2 process(es), this run "
                     f"has 1. The sample order and the augmentation go on unchanged; {expect}."]


CLI_RUN = ["--backend", "numpy", "--depth", "1", "--base-channels", "2", "--crop", "16",
           "--synthetic-train", "4", "--synthetic-val", "2", "--synthetic-size", "20",
           "--batch-size", "1"]


@needs_mpi
def test_cli_under_mpiexec_prints_once_and_writes_from_rank_0(tmp_path):
    done = run(mpiexec(*tinyunet_cli(), "train", *CLI_RUN, "--epochs", "2", "--out", "run"),
               tmp_path)
    assert done.returncode == 0, done.stdout + done.stderr
    out = done.stdout.splitlines()
    assert len([line for line in out if line.startswith("training a U-Net")]) == 1
    assert "batch 1 per process on 2 processes (global batch 2)" in out[0]
    assert len([line for line in out if line.startswith("epoch ")]) == 2
    assert done.stderr.count("epoch 1/2 [") == 1  # one progress bar
    assert read_checkpoint(tmp_path / "run/last.npz")[0]["ranks"] == 2
    assert sorted(p.name for p in (tmp_path / "run").iterdir()) == sorted(
        ["last.npz", "best.npz", "history.json", "history.csv", "curves.png", "samples.png"])


def write_folder(root: Path, seed: int):
    rng = np.random.default_rng(seed)
    for sub in ("images", "masks"):
        (root / sub).mkdir(parents=True)
    for i in range(3):
        np.save(root / "images" / f"{i}.npy", rng.random((16, 16)).astype(np.float32))
        np.save(root / "masks" / f"{i}.npy", (rng.random((16, 16)) > 0.5).astype(np.uint8))


@needs_mpi
@pytest.mark.parametrize("rank_1_option", [["--lr", "0.01"], ["--data", "other"]])
def test_ranks_that_disagree_refuse_at_start(tmp_path, rank_1_option):
    write_folder(tmp_path / "data", 0)
    write_folder(tmp_path / "other", 1)  # same names and shapes, other pixels
    common = [*tinyunet_cli(), "train", *CLI_RUN, "--epochs", "1", "--out", "run",
              "--data", "data"]
    done = run([MPIEXEC, "-n", "1", *common, ":", "-n", "1", *common, *rank_1_option],
               tmp_path)
    assert done.returncode == 2, done.stdout + done.stderr
    assert error_lines(done.stderr) == [
        "tinyunet: error: Expect: every rank to have the same options, backend and data. "
        "Actual: rank(s) 1 of 2 differ from rank 0; start every rank with the same "
        "options, data and files"]
    assert not (tmp_path / "run").exists()


@needs_mpi
@pytest.mark.parametrize("failing", ["rank 1", "every rank"])
def test_an_error_at_start_is_printed_once(tmp_path, failing):
    common = [*tinyunet_cli(), "train", *CLI_RUN, "--epochs", "1", "--out", "run"]
    rank_0 = common + (["--data", "missing"] if failing == "every rank" else [])
    done = run([MPIEXEC, "-n", "1", *rank_0, ":", "-n", "1", *common, "--data", "missing"],
               tmp_path)
    assert done.returncode == 2, done.stdout + done.stderr
    prefix = "rank 1 of 2: " if failing == "rank 1" else ""
    assert error_lines(done.stderr) == [
        f"tinyunet: error: {prefix}missing: not a folder. A dataset folder holds "
        "images/ and masks/ with matching file stems"]


@needs_mpi
def test_a_failed_step_raises_on_every_rank(tmp_path):
    done = run(mpiexec(sys.executable, str(WORKER), "fail-step"), tmp_path, timeout=60)
    assert done.returncode == 0, done.stdout + done.stderr
    # The ranks' lines reach mpiexec's stdout in pieces that may interleave.
    for rank in (0, 1):
        assert (f"rank {rank} raised RankFailure: rank 1 of 2: a bad sample on rank 1"
                in done.stdout), done.stdout


@needs_mpi
def test_weights_that_drift_apart_stop_every_rank(tmp_path):
    done = run(mpiexec(sys.executable, str(WORKER), "drift"), tmp_path, timeout=60)
    assert done.returncode == 0, done.stdout + done.stderr
    for rank in (0, 1):
        assert (f"rank {rank} raised RankMismatch: Expect: equal weights on every rank after "
                "epoch 1. Actual: rank(s) 1 of 2 differ from rank 0." in done.stdout), done.stdout


@needs_mpi
def test_an_exception_outside_agreement_ends_the_job(tmp_path):
    # MPI_Abort ends the launcher's output forwarding too; before the abort waited for
    # it, about 1 run in 7 lost the traceback's tail and the error line. Ten runs.
    for _ in range(10):
        started = time.monotonic()
        done = run(mpiexec(sys.executable, str(WORKER), "raise"), tmp_path, timeout=60)
        assert done.returncode != 0
        assert "RuntimeError: rank 1 broke down\n" in done.stderr, done.stderr
        assert error_lines(done.stderr) == [
            "tinyunet: error: rank 1 of 2: stopped by RuntimeError: rank 1 broke down; "
            "ending the job"], done.stderr
        assert time.monotonic() - started < 30


@needs_mpi
def test_a_hanging_rank_ends_the_job_after_the_timeout(tmp_path):
    started = time.monotonic()
    done = run(mpiexec(sys.executable, str(WORKER), "hang", "2"), tmp_path, timeout=60)
    assert done.returncode != 0
    assert error_lines(done.stderr) == [
        "tinyunet: error: rank 0 of 2: waited 2 s for the other ranks in the gradient "
        "allreduce of a training step: a rank crashed or hangs; ending the job "
        "(TINYUNET_MPI_TIMEOUT sets the limit in seconds)"], done.stderr[-3000:]
    assert time.monotonic() - started < 40  # rank 1 would sleep for 120 s


def wait_for_epochs(job: subprocess.Popen, history: Path, epochs: int):
    deadline = time.monotonic() + 180
    while not (history.exists() and len(json.loads(history.read_text() or "[]")) >= epochs):
        assert job.poll() is None and time.monotonic() < deadline, "no epoch finished"
        time.sleep(0.2)


def rank_process(marker: str, rank: int) -> int | None:
    """The pid of the process of ``rank`` in the job whose environment holds ``marker``."""
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            variables = (entry / "environ").read_bytes().split(b"\0")
        except OSError:
            continue
        if marker.encode() in variables and f"PMI_RANK={rank}".encode() in variables:
            return int(entry.name)
    return None


@needs_mpi
@pytest.mark.skipif(not Path("/proc/self/environ").exists(), reason="reads /proc (Linux)")
def test_a_killed_rank_ends_the_job_and_leaves_whole_checkpoints(tmp_path):
    marker = f"TINYUNET_TEST_JOB={uuid.uuid4().hex}"
    key, value = marker.split("=")
    job = subprocess.Popen(
        mpiexec(*tinyunet_cli(), "train", *CLI_RUN, "--epochs", "500", "--out", "run"),
        cwd=tmp_path, env=environment(**{key: value}), stdout=subprocess.PIPE,
        stderr=subprocess.PIPE, text=True)
    try:
        wait_for_epochs(job, tmp_path / "run/history.json", 2)
        victim = rank_process(marker, 1)
        assert victim is not None
        os.kill(victim, signal.SIGKILL)
        stdout, stderr = job.communicate(timeout=60)
    finally:
        if job.poll() is None:
            job.kill()
            job.communicate()
    assert job.returncode != 0
    # mpiexec (MPICH's hydra) names the killed rank's end and stops the other rank.
    assert "Killed (signal 9)" in stdout + stderr, stdout + stderr
    # Both files load; best.npz holds an epoch up to last's (the best need not be the
    # latest epoch), and never one last.npz does not know of.
    last, _ = read_checkpoint(tmp_path / "run" / "last.npz")
    best, _ = read_checkpoint(tmp_path / "run" / "best.npz")
    assert last["epoch"] >= 2
    assert best["epoch"] >= 1 and best["epoch"] <= last["epoch"]
    assert best["epoch"] in {last["best_epoch"], *[row["epoch"] for row in last["history"]]}


@needs_mpi
def test_ctrl_c_ends_every_rank(tmp_path):
    """mpiexec passes Ctrl-C to the ranks; rank 0 says where the run stopped and ends
    the job, also the rank left waiting in a collective."""
    job = subprocess.Popen(
        mpiexec(*tinyunet_cli(), "train", *CLI_RUN, "--epochs", "500", "--out", "run"),
        cwd=tmp_path, env=environment(), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
        text=True)
    try:
        wait_for_epochs(job, tmp_path / "run/history.json", 2)
        job.send_signal(signal.SIGINT)
        _, stderr = job.communicate(timeout=60)
    finally:
        if job.poll() is None:
            job.kill()
            job.communicate()
    assert job.returncode == 130
    assert "interrupted during epoch" in stderr and "tinyunet train --resume --out run" in stderr
    assert read_checkpoint(tmp_path / "run/last.npz")[0]["epoch"] >= 2


@needs_mpi
def test_cuda_backend_step_through_nccl_reducer_under_the_simulator(tmp_path):
    """Under the CUDA simulator, 2 ranks share a batch of 4 on the cuda backend and sum
    their gradients through NcclReducer, whose NCCL calls a stand-in performs over MPI
    on the memory they point at; the result matches one numpy process with the whole
    batch to float64 rounding (as tests/backends/test_cuda_training.py)."""
    if "cuda" not in tu.available_backends():
        pytest.skip("the cuda backend (GPU or simulator) is not available")
    done = run(mpiexec(sys.executable, str(WORKER), "cuda-sim", "sim.npz"), tmp_path,
               NUMBA_ENABLE_CUDASIM="1")
    assert done.returncode == 0, done.stdout + done.stderr
    result = np.load(tmp_path / "sim.npz")

    import tinyunet.functional as F
    from tinyunet import nn, optim

    tu.manual_seed(0)
    model = nn.UNet(1, 1, depth=1, base_channels=2).to("numpy")
    for p in model.parameters():
        p.data = p.data.astype(np.float64)
    opt = optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    rng = np.random.default_rng(0)
    images = tu.tensor(rng.standard_normal((4, 1, 6, 6)), dtype=np.float64, backend="numpy")
    masks = tu.tensor(rng.random((4, 1, 6, 6)) > 0.5, dtype=np.float64, backend="numpy")
    losses = []
    for _ in range(3):
        opt.zero_grad()
        loss = F.bce_dice_loss(model(images), masks)
        loss.backward()
        opt.step()
        losses.append(loss.item())
    np.testing.assert_allclose(result["losses"], losses, rtol=1e-9)
    for key, value in model.state_dict().items():
        np.testing.assert_allclose(result[key], value, rtol=1e-9, atol=1e-12)


@needs_mpi
def test_scaling_benchmark_smoke_run():
    """benchmarks.scaling end to end on the small config C (timings meaningless)."""
    root = Path(__file__).resolve().parents[2]
    done = run([sys.executable, "-m", "benchmarks.scaling", "--configs", "C", "--steps", "1",
                "--no-write"], root, timeout=300)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "| C | 1 | 8 |" in done.stdout and "| C | 2 | 16 |" in done.stdout
    assert "| 10 Gb/s |" in done.stdout
