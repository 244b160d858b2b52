"""Benchmarks are not part of the default test run (pyproject: -m "not benchmarks").
Run them with:  python -m pytest tests/benchmarks -m benchmarks --benchmark-enable

Every benchmark here measures a *ratio* (kdbench against a baseline) inside one test. The
machines are shared and noisy, so the two sides are timed in alternation — one round is the
baseline(s) then the candidate — and a ratio is the median of the per-round ratios: a slow
spell of the machine hits both sides of a round alike and cancels in that round's ratio.
Nothing asserts a time; the benchmarks assert only that both sides did the same work.

With --benchmark-disable (CI) pytest-benchmark runs one round without warm-up; the tests
then shrink their sizes, check correctness and print the cold ratios marked as such.
"""

from __future__ import annotations

import statistics
import time
from dataclasses import dataclass, field
from typing import Any, Callable

import pytest


def pytest_collection_modifyitems(items):
    for item in items:
        if "tests/benchmarks/" in str(item.fspath).replace("\\", "/"):
            item.add_marker(pytest.mark.benchmarks)


WALL, CPU = "wall", "cpu"


@dataclass
class Comparison:
    """Times of each side of an interleaved comparison, one entry per measured round, on two
    clocks: wall time, and this process's CPU time. On a shared machine the CPU time is the
    steadier measure of the work done — a neighbour's job that takes the core away stretches
    wall time, not CPU time — as long as the work runs in this process (one torch thread)."""

    seconds: dict[str, dict[str, list[float]]] = field(default_factory=lambda: {WALL: {}, CPU: {}})
    measured: bool = True  # False: --benchmark-disable ran one cold round

    def rounds(self) -> int:
        return min(len(times) for times in self.seconds[WALL].values())

    def median(self, name: str, clock: str = WALL) -> float:
        return statistics.median(self.seconds[clock][name])

    def ratio(self, numerator: str, denominator: str, clock: str = WALL) -> float:
        """Median over rounds of numerator / denominator, each round's pair taken together."""
        times = self.seconds[clock]
        return statistics.median(a / b for a, b in zip(times[numerator], times[denominator]))


# Ratios reported by the tests of this session, printed together at the end of the run.
REPORTED: list[tuple[str, str]] = []


def _interleave(benchmark: Any, candidate: tuple[str, Callable[[], object]],
                baselines: dict[str, Callable[[], object]], rounds: int,
                warmup_rounds: int = 1) -> Comparison:
    """Time ``candidate`` with pytest-benchmark and every baseline by hand, in alternation.

    pytest-benchmark's ``setup`` hook runs before each of its rounds, untimed by it: the
    baselines run there (timed here), so each round is baselines → candidate. pytest-benchmark's
    own statistics are those of the candidate (wall time); the warm-up rounds are dropped from
    ours too.
    """
    name, run_candidate = candidate
    keys = (*baselines, name)
    comparison = Comparison({clock: {key: [] for key in keys} for clock in (WALL, CPU)},
                            measured=benchmark.enabled)

    def timed(key: str, function: Callable[[], object]) -> object:
        wall, cpu = time.perf_counter(), time.process_time()
        result = function()
        comparison.seconds[CPU][key].append(time.process_time() - cpu)
        comparison.seconds[WALL][key].append(time.perf_counter() - wall)
        return result

    def run_baselines() -> None:
        for key, function in baselines.items():
            timed(key, function)

    benchmark.pedantic(lambda: timed(name, run_candidate), setup=run_baselines,
                       rounds=rounds, warmup_rounds=warmup_rounds)
    if benchmark.enabled and warmup_rounds:
        comparison.seconds = {clock: {key: times[warmup_rounds:] for key, times in per_key.items()}
                              for clock, per_key in comparison.seconds.items()}
    return comparison


@pytest.fixture
def interleave(benchmark) -> Callable[..., Comparison]:
    """interleave(candidate=(name, fn), baselines={name: fn}, rounds=N): see ``_interleave``."""
    return lambda candidate, baselines, rounds, warmup_rounds=1: _interleave(
        benchmark, candidate, baselines, rounds, warmup_rounds)


@pytest.fixture
def report(benchmark, request) -> Callable[..., None]:
    """report(ratio_name, value, **details): into extra_info, printed now and at the end."""

    def record(ratio_name: str, value: float, **details: Any) -> None:
        benchmark.extra_info[ratio_name] = round(value, 4)
        benchmark.extra_info.update(details)
        cold = "" if benchmark.enabled else "  (benchmark disabled: one cold round, not a measurement)"
        extras = ", ".join(f"{key}={val}" for key, val in details.items())
        line = f"{request.node.name}: {ratio_name} = {value:.3f}×  [{extras}]{cold}"
        print(line)
        REPORTED.append((request.node.name, line))

    return record


def pytest_terminal_summary(terminalreporter, exitstatus, config) -> None:
    if REPORTED:
        terminalreporter.section("kdbench ratios (medians of interleaved rounds)")
        for _, line in REPORTED:
            terminalreporter.write_line(line)
