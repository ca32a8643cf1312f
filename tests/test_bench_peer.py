"""bench_peer's decode timing on a fake run with a simulated clock: a slow prompt phase in one of
its samples does not pass for decode time. llama-cpp-python is not needed."""

import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "benchmarks"))

import bench_peer  # noqa: E402


class FakeEngine:
    """run(new): a prompt phase of 0.35 s (0.55 s on the calls listed as slow) and 0.01 s a
    decoded token, on a clock it advances itself."""

    def __init__(self, slow_calls):
        self.now, self.calls, self.slow_calls = 0.0, 0, set(slow_calls)

    def clock(self):
        return self.now

    def run(self, new):
        self.now += 0.55 if self.calls in self.slow_calls else 0.35
        self.now += 0.01 * (new - 1)
        self.calls += 1
        return list(range(new))


def test_a_slow_prompt_phase_does_not_pass_for_decode_time():
    engine = FakeEngine(slow_calls={0})  # the first prompt-only call is slow
    seconds, produced = bench_peer.decode_seconds(engine.run, 32, 3, clock=engine.clock)
    assert abs(seconds - 0.32) < 1e-9 and produced == list(range(33))
    engine = FakeEngine(slow_calls={3})  # the second whole run is slow
    assert abs(bench_peer.decode_seconds(engine.run, 32, 3, clock=engine.clock)[0] - 0.32) < 1e-9
    # One sample each, as before: the slow prompt phase makes decoding look 0.2 s shorter.
    engine = FakeEngine(slow_calls={0})
    assert abs(bench_peer.decode_seconds(engine.run, 32, 1, clock=engine.clock)[0] - 0.12) < 1e-9
