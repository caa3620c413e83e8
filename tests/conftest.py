"""Shared pytest set-up. Fixtures live in tests/fixtures/, one module per real component.

Hypothesis runs derandomized by default, so ``make test`` (and CI) checks the same examples on
every run; ``HYPOTHESIS_PROFILE=explore`` draws fresh random examples (and more of them) to hunt
for new failures locally.
"""

import os

from hypothesis import settings

settings.register_profile("repeatable", derandomize=True)
settings.register_profile("explore", max_examples=500)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "repeatable"))

pytest_plugins = [
    "tests.fixtures.s3",
    "tests.fixtures.models",
    "tests.fixtures.label_studio",
    "tests.fixtures.prefect",
]
