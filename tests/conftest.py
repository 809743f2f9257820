import os

from hypothesis import settings

# The property tests' examples: "ci" (the default) draws the same 200 every run, so a failure reproduces;
# HYPOTHESIS_PROFILE=explore draws new ones (and remembers failures in .hypothesis/) to hunt for more.
settings.register_profile("ci", derandomize=True, max_examples=200, deadline=None, database=None)
settings.register_profile("explore", max_examples=1000, deadline=None)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))
