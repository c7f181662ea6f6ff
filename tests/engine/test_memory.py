"""The malloc setting the tinyunet command makes (tinyunet.kernels.cpu.runtime, re-exported
by tinyunet.memory)."""

import subprocess
import sys

import pytest
from tinyunet.kernels.cpu import runtime as memory


class RecordingLibc:
    def __init__(self, result=1):
        self.calls, self.result = [], result

    def mallopt(self, parameter, value):
        self.calls.append((parameter, value))
        return self.result


def test_it_sets_both_thresholds(monkeypatch):
    libc = RecordingLibc()
    monkeypatch.setattr(memory, "_glibc", lambda: libc)
    for name in memory.USER_SETTINGS:
        monkeypatch.delenv(name, raising=False)
    assert memory.keep_freed_memory() is True
    assert libc.calls == [(memory.M_MMAP_THRESHOLD, memory.HEAP_ARRAYS_UP_TO),
                          (memory.M_TRIM_THRESHOLD, memory.KEEP_FREED_BYTES)]


@pytest.mark.parametrize("name", memory.USER_SETTINGS)
def test_a_users_own_malloc_setting_is_left_alone(monkeypatch, name):
    libc = RecordingLibc()
    monkeypatch.setattr(memory, "_glibc", lambda: libc)
    monkeypatch.setenv(name, "65536")
    assert memory.keep_freed_memory() is False
    assert libc.calls == []


def test_without_glibc_nothing_happens(monkeypatch):
    monkeypatch.setattr(memory, "_glibc", lambda: None)
    for name in memory.USER_SETTINGS:
        monkeypatch.delenv(name, raising=False)
    assert memory.keep_freed_memory() is False


def test_a_refused_setting_is_reported(monkeypatch):
    monkeypatch.setattr(memory, "_glibc", lambda: RecordingLibc(result=0))
    for name in memory.USER_SETTINGS:
        monkeypatch.delenv(name, raising=False)
    assert memory.keep_freed_memory() is False


PROBE = """
import resource, sys
import numpy as np
from tinyunet.kernels.cpu import runtime as memory
if sys.argv[1] == "keep":
    assert memory.keep_freed_memory()
def faults():
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt
def step():
    arrays = [np.ones(1 << 19) for _ in range(8)]  # 8 arrays of 4 MiB, then all freed
    del arrays
step()
step()
before = faults()
for _ in range(5):
    step()
print((faults() - before) // 5)
"""


@pytest.mark.skipif(memory._glibc() is None, reason="the setting is glibc's")
def test_a_steps_arrays_come_back_without_page_faults(monkeypatch):
    for name in memory.USER_SETTINGS:
        monkeypatch.delenv(name, raising=False)

    def faults_per_step(mode):
        run = subprocess.run([sys.executable, "-c", PROBE, mode], capture_output=True,
                             text=True, check=True)
        return int(run.stdout)

    # 32 MiB written per step is 8192 pages; with glibc's defaults about half of them
    # fault again every step (4072 measured), with the setting none.
    assert faults_per_step("default") > 1000
    assert faults_per_step("keep") < 100
