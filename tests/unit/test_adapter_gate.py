"""The adapter gate: calls with different adapter sets never overlap, calls with the same set
do, switches happen with nothing running, and no set starves another."""

from __future__ import annotations

import random
import threading
import time

import pytest

from deployments.generator.adapters.adapter_gate import AdapterGate, CallAbandoned

INK = (("ink", 1.0),)
INK_HALF = (("ink", 0.5),)  # the same adapter at another scale is another set
PAPER = (("paper", 1.0),)
BASE = ()


class Recorder:
    """Runs calls through a gate and records every overlap of two different sets."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.running: list[tuple] = []
        self.overlaps = 0  # calls that found a call of another set running
        self.max_same = 0  # most calls of one set running at once
        self.switched_while_running = 0
        self.switches: list[tuple] = []
        self.gate = AdapterGate(self.switch)

    def switch(self, key) -> None:
        with self.lock:
            if self.running:
                self.switched_while_running += 1
            self.switches.append(key)

    def call(self, key, seconds: float) -> None:
        with self.gate.enter(key):
            with self.lock:
                if any(other != key for other in self.running):
                    self.overlaps += 1
                self.running.append(key)
                self.max_same = max(self.max_same, len(self.running))
            time.sleep(seconds)
            with self.lock:
                self.running.remove(key)


def run_threads(targets) -> None:
    threads = [threading.Thread(target=target) for target in targets]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=30)
    assert not any(thread.is_alive() for thread in threads), "a call never got in"


def test_calls_with_different_sets_never_overlap():
    recorder = Recorder()
    rng = random.Random(0)
    keys = [rng.choice([INK, INK_HALF, PAPER, BASE]) for _ in range(120)]
    run_threads([lambda key=key: recorder.call(key, rng.uniform(0, 0.004)) for key in keys])
    assert recorder.overlaps == 0
    assert recorder.switched_while_running == 0
    assert recorder.gate.running == 0


def test_calls_with_the_same_set_run_together():
    recorder = Recorder()
    run_threads([lambda: recorder.call(INK, 0.05) for _ in range(4)])
    assert recorder.max_same >= 2
    assert recorder.switches == [INK]  # one switch for all of them


def test_the_base_model_needs_no_switch_at_first():
    recorder = Recorder()
    recorder.call(BASE, 0)
    assert recorder.switches == []


def test_a_steady_stream_of_one_set_does_not_starve_another():
    recorder = Recorder()
    stop = threading.Event()
    paper_done = threading.Event()

    def ink_stream() -> None:
        while not stop.is_set():
            recorder.call(INK, 0.01)

    def paper() -> None:
        time.sleep(0.05)  # arrives while the ink calls keep the gate busy
        recorder.call(PAPER, 0)
        paper_done.set()

    streams = [threading.Thread(target=ink_stream) for _ in range(3)]
    for thread in streams:
        thread.start()
    try:
        assert run_with_timeout(paper, 5), "the paper call starved"
        assert paper_done.is_set()
    finally:
        stop.set()
        for thread in streams:
            thread.join(timeout=5)
    assert recorder.overlaps == 0


def run_with_timeout(target, seconds: float) -> bool:
    thread = threading.Thread(target=target)
    thread.start()
    thread.join(timeout=seconds)
    return not thread.is_alive()


def test_a_failed_switch_fails_its_call_only_and_the_next_call_switches_again():
    attempts: list[tuple] = []

    def switch(key) -> None:
        attempts.append(key)
        if len(attempts) == 1:
            raise RuntimeError("the adapter did not load")

    gate = AdapterGate(switch)
    with pytest.raises(RuntimeError), gate.enter(INK):
        pass
    assert gate.running == 0
    # After the failure the modules' state is unknown: even the base model switches.
    with gate.enter(BASE):
        assert gate.running == 1
    with gate.enter(INK):
        pass
    assert attempts == [INK, BASE, INK]


def test_a_call_cancelled_while_it_waits_leaves_without_switching():
    recorder = Recorder()
    cancelled = threading.Event()
    holding = threading.Event()
    release = threading.Event()
    outcome: list[str] = []

    def hold_ink() -> None:
        with recorder.gate.enter(INK):
            holding.set()
            release.wait(5)

    def wait_for_paper() -> None:
        try:
            with recorder.gate.enter(PAPER, cancelled):
                outcome.append("entered")
        except CallAbandoned:
            outcome.append("abandoned")

    first = threading.Thread(target=hold_ink)
    first.start()
    holding.wait(5)
    second = threading.Thread(target=wait_for_paper)
    second.start()
    time.sleep(0.1)  # waiting behind the running ink call
    cancelled.set()  # its clients left
    release.set()
    first.join(5)
    second.join(5)
    assert outcome == ["abandoned"]
    assert recorder.switches == [INK], "no switch to paper for a call nobody waits for"
    with recorder.gate.enter(INK):  # and the gate is free
        pass
