"""The CPU benchmarks run end to end on small settings (timings meaningless): the
training step on its smallest config, tables, run list and memory probe included, and
the per-op benchmark."""

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("numba")

ROOT = Path(__file__).resolve().parents[2]


def benchmark(*args):
    run = subprocess.run([sys.executable, "-m", "benchmarks.train_step", *args], cwd=ROOT,
                         capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr[-2000:]
    return run.stdout


def test_train_step_benchmark_smoke_run():
    out = benchmark("--configs", "C", "--repeats", "1", "--runs", "2", "--no-torch",
                    "--no-memory", "--no-write")
    assert "run 2 train C: tinyunet" in out
    assert "| C |" in out and "### Inference" in out


def test_memory_probe_reports_the_warm_up_and_the_step():
    figures = json.loads(benchmark("--memory-probe", "tinyunet", "--configs", "C")
                         .strip().splitlines()[-1])
    assert figures["step_mib"] > 0 and figures["warmup_mib"] >= 0
    assert figures["total_mib"] == pytest.approx(figures["step_mib"] + figures["warmup_mib"])


def test_train_step_benchmark_runs_pytorch_in_its_own_process():
    pytest.importorskip("torch")
    out = benchmark("--configs", "C", "--repeats", "1", "--no-memory", "--no-write")
    assert "in a process of its own" in out
    row = next(line for line in out.splitlines() if line.startswith("| C |"))
    assert "x** | 1.5x |" in row  # PyTorch's columns and the speed-up are filled in


def test_ops_benchmark_smoke_run():
    """The per-op benchmark end to end on one case, one repeat; PyTorch, when installed,
    in a child process of its own (its column and the speed-ups filled in)."""
    have_torch = importlib.util.find_spec("torch") is not None
    run = subprocess.run([sys.executable, "-m", "benchmarks.ops", "--repeats", "1",
                          "--only", "A bottom", "--no-write",
                          *([] if have_torch else ["--no-torch"])],
                         cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr[-2000:]
    row = next(line for line in run.stdout.splitlines()
               if line.startswith("| conv 3x3, A bottom, 256->256 | fwd |"))
    assert row.count("GF/s") == (4 if have_torch else 3)
    assert ("in a process of its own" in run.stdout) == have_torch
    assert "Issue 4's bar" in run.stdout and "A bottom, 256->256 bwd" in run.stdout
    assert "A level 0" not in run.stdout


def test_inference_onnx_benchmark_smoke_run():
    """tinyunet against ONNX Runtime, each in a child process, on config C, once per
    OpenBLAS environment; the two sides' logits agree."""
    pytest.importorskip("onnxruntime")
    pytest.importorskip("onnx")
    run = subprocess.run([sys.executable, "-m", "benchmarks.inference_onnx", "--configs", "C",
                          "--repeats", "1", "--no-write"], cwd=ROOT, capture_output=True,
                         text=True, timeout=600)
    assert run.returncode == 0, run.stderr[-2000:]
    rows = [line for line in run.stdout.splitlines() if line.startswith("| C |")]
    assert len(rows) == 2 and all("x** |" in row for row in rows)
    assert all(float(row.split("|")[-2]) < 1e-4 for row in rows)


def test_ops_benchmark_forces_a_conv_algorithm():
    """--conv-algo runs the numba backend under the policy's override, and says so."""
    run = subprocess.run([sys.executable, "-m", "benchmarks.ops", "--repeats", "1",
                          "--only", "A bottom", "--no-write", "--no-torch",
                          "--conv-algo", "im2col"],
                         cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr[-2000:]
    assert "numba conv algorithm forced wherever it runs: `im2col`" in run.stdout
    bad = subprocess.run([sys.executable, "-m", "benchmarks.ops", "--repeats", "1",
                          "--only", "A bottom", "--no-write", "--no-torch",
                          "--conv-algo", "fft"],
                         cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert bad.returncode != 0 and "Expect: one of" in bad.stderr
