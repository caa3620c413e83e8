"""Shared pytest set-up. Fixtures live in tests/fixtures/, one module per real component."""

pytest_plugins = [
    "tests.fixtures.s3",
    "tests.fixtures.models",
    "tests.fixtures.label_studio",
]
