"""Session fixtures: the tiny checkpoint and plugins, built once, and one vLLM engine run over all cases."""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys

import pytest

import tiny

HERE = os.path.dirname(os.path.abspath(__file__))
ENGINE_TIMEOUT_S = 600


@dataclasses.dataclass
class Artifacts:
    host: str
    plugin: str
    images: list[str]
    root: str


@pytest.fixture(scope="session")
def artifacts(tmp_path_factory) -> Artifacts:
    root = str(tmp_path_factory.mktemp("qfusion-vllm"))
    host = tiny.build_host(os.path.join(root, "host"))
    plugin = tiny.build_plugin(host, os.path.join(root, "plugin"))
    return Artifacts(host=host, plugin=plugin, images=tiny.images(root, 4), root=root)


def run_engine(root: str, name: str, model: str, hf_overrides: dict, rounds: list[list[tiny.Request]],
               steps: int) -> subprocess.CompletedProcess:
    """Run ``engine_cases.py`` in a subprocess; returns the finished process (its JSON is ``root/name.out.json``)."""
    cases = os.path.join(root, f"{name}.json")
    with open(cases, "w") as f:
        json.dump({"model": model, "hf_overrides": hf_overrides, "steps": steps,
                   "rounds": [[dataclasses.asdict(r) for r in round_] for round_ in rounds]}, f)
    env = dict(os.environ, OMP_NUM_THREADS=os.environ.get("OMP_NUM_THREADS", "2"))
    return subprocess.run([sys.executable, os.path.join(HERE, "engine_cases.py"), cases,
                           os.path.join(root, f"{name}.out.json")],
                          capture_output=True, text=True, timeout=ENGINE_TIMEOUT_S, env=env)


def engine_outputs(root: str, name: str, *args) -> dict:
    done = run_engine(root, name, *args)
    if done.returncode != 0:
        raise AssertionError(f"vLLM engine run {name!r} failed:\n{done.stdout[-3000:]}\n{done.stderr[-6000:]}")
    with open(os.path.join(root, f"{name}.out.json")) as f:
        return json.load(f)
