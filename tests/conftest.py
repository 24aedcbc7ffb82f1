"""Fixtures every test module may use, each built once per session: the tiny host checkpoints (``hosts``) and
the training tests' workspace (``colour_workspace``: a tiny LLaVA that answers colour questions, and their data)."""

from conftest_hosts import hosts  # noqa: F401
from training_workspace import colour_workspace  # noqa: F401
