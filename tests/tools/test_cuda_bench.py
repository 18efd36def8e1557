"""The CUDA benchmark's timing logic without a GPU: the event clock driven by a fake CuPy (so the
retry that keeps Python's launch overhead out of the events is exercised), batch sizes, and the
argument checks of `python -m pymoe.bench --backend cuda`."""
import types

import numpy as np

from pymoe.bench import cuda as bench_cuda
from pymoe.bench.__main__ import main


class FakeCupy:
    """Just what _EventClock touches: a spin kernel, events, elapsed time, the clock rate. The
    host takes `queue_s` to queue a batch; the device spins for the requested cycles."""

    def __init__(self, queue_s: float) -> None:
        self.queue_s, self.spins, self.now = queue_s, [], 0.0
        outer = self

        class Event:
            def record(self):
                self.t = outer.now

            def synchronize(self):
                pass

        def elapsed(start, stop):
            return (stop.t - start.t) * 1e3  # ms, as CuPy returns

        self.cuda = types.SimpleNamespace(
            Event=Event, get_elapsed_time=elapsed, Device=lambda: types.SimpleNamespace(id=0),
            runtime=types.SimpleNamespace(getDeviceProperties=lambda i: {"clockRate": 1_000_000}))
        self.RawKernel = lambda src, name: self._spin

    def _spin(self, grid, block, args):
        self.spins.append(int(args[0]))


def test_event_clock_doubles_the_spin_until_the_queue_is_ahead(monkeypatch):
    cp = FakeCupy(queue_s=0.005)
    clock = bench_cuda._EventClock(cp)
    assert clock.cycles_per_s == 1e9 and clock.hold == 2e-3
    times = iter([0.0, cp.queue_s] * 10)  # perf_counter: before and after each queueing
    monkeypatch.setattr(bench_cuda.time, "perf_counter", lambda: next(times))
    calls = []

    def fn():
        calls.append(1)
        cp.now += 1e-4  # each call: 0.1 ms of device time between the events

    t = clock.time_batch(fn, 3)
    # 2 ms and 4 ms spins were shorter than the 5 ms of queueing: retried; 8 ms was enough
    assert cp.spins == [2_000_000, 4_000_000, 8_000_000]
    assert len(calls) == 9 and abs(t - 3e-4) < 1e-12


def test_queue_and_batch_rules():
    assert bench_cuda.queue_was_ahead(0.001, 0.002)
    assert not bench_cuda.queue_was_ahead(0.0019, 0.002)
    assert bench_cuda.batch_size(1e-6) == 1000 and bench_cuda.batch_size(5e-4) == 2
    assert bench_cuda.batch_size(1.0) == 1 and bench_cuda.batch_size(0.0) == 1000


def test_device_timer_sizes_batches_and_takes_the_median():
    class Clock:  # 0.1 ms per call, except one slow batch
        batches = []

        def time_batch(self, fn, n):
            self.batches.append(n)
            return n * (1e-3 if len(self.batches) == 3 else 1e-4)

    timer = bench_cuda.DeviceTimer(np, clock=Clock())
    calls = []
    assert abs(timer(lambda: calls.append(1), repeats=3) - 1e-4) < 1e-15  # the slow one ignored
    assert Clock.batches == [1, 10, 10, 10] and len(calls) == 1  # warm-up only: clock is fake
    assert isinstance(bench_cuda.DeviceTimer(np).clock, bench_cuda._HostClock)


def test_bad_block_sizes_are_refused(cuda_emulator_path, monkeypatch, capsys):
    monkeypatch.setenv("PYMOE_CUDA_LIB", cuda_emulator_path)
    assert main(["--backend", "cuda", "--quick", "--block-size", "48", "2048"]) == 2
    assert "--block-size: expected powers of two in [32, 1024], got [48, 2048]" in \
        capsys.readouterr().out
