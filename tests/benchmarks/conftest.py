"""Benchmarks are not part of the default test run (pyproject: -m "not benchmarks").
Run them with:  python -m pytest tests/benchmarks -m benchmarks --benchmark-enable"""

import pytest


def pytest_collection_modifyitems(items):
    for item in items:
        if "tests/benchmarks/" in str(item.fspath).replace("\\", "/"):
            item.add_marker(pytest.mark.benchmarks)
