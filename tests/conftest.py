import os
import sys

import torch

os.environ.setdefault("OMP_NUM_THREADS", "1")
torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import pytest  # noqa: E402


@pytest.fixture(scope="session")
def small_demo(tmp_path_factory):
    """One small demo model for every end-to-end and launcher test of the session."""
    from tests.demo_runs import make_small_demo

    return make_small_demo(tmp_path_factory.mktemp("small_demo"))


def pytest_collection_modifyitems(config, items):
    # every test is either e2e (marked in its module) or unit, so `-m unit` and `-m "not e2e"` agree
    for item in items:
        if item.get_closest_marker("e2e") is None:
            item.add_marker(pytest.mark.unit)
