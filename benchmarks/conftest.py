"""pytest-benchmark suite: ``pytest benchmarks/ --benchmark-only`` collects the ``bench_*.py`` files here
(pytest's own pattern is ``test_*.py``). Each test checks one provider against the reference, then times it;
a provider that cannot run its inputs is skipped with the reason."""

from __future__ import annotations

import pytest


def pytest_collect_file(file_path, parent):
    if file_path.suffix == ".py" and file_path.name.startswith("bench_"):
        return pytest.Module.from_parent(parent, path=file_path)
    return None
