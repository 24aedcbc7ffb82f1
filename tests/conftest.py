"""Fixtures every test module may use: the tiny host checkpoints (``hosts``, built once per session)."""

from conftest_hosts import hosts  # noqa: F401
