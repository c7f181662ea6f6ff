"""The CPU training-step benchmark runs end to end on its smallest config (timings
meaningless: one step per run), tables, run list and memory probe included."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("numba")

ROOT = Path(__file__).resolve().parents[1]


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
