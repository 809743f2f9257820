import os

import pytest
import torch
from hypothesis import settings

# The property tests' examples: "ci" (the default) draws the same 200 every run, so a failure reproduces;
# HYPOTHESIS_PROFILE=explore draws new ones (and remembers failures in .hypothesis/) to hunt for more.
settings.register_profile("ci", derandomize=True, max_examples=200, deadline=None, database=None)
settings.register_profile("explore", max_examples=1000, deadline=None)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))


@pytest.fixture(scope="module")
def one_thread():
    """torch on one thread for a module's tests: on tiny tensors, and against wall-time budgets, its worker
    threads on a busy 2-core machine only wait for each other (at 100x the cost of the work)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
