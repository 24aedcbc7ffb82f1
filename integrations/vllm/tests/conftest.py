"""Session fixtures: the tiny hosts and plugins, built once per host type, and runs of one vLLM engine."""

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
    kind: str
    host: str
    plugin: str
    images: list[str]
    root: str


class Built:
    """Builds each host type's checkpoint, plugin and images on first use."""

    def __init__(self, root: str):
        self.root = root
        self._done: dict[str, Artifacts] = {}

    def __call__(self, kind: str) -> Artifacts:
        if kind not in self._done:
            root = os.path.join(self.root, kind)
            os.makedirs(root)
            host = tiny.build_host(kind, os.path.join(root, "host"))
            plugin = tiny.build_plugin(host, os.path.join(root, "plugin"))
            self._done[kind] = Artifacts(kind, host, plugin, tiny.images(root, 4), root)
        return self._done[kind]


@pytest.fixture(scope="session")
def built(tmp_path_factory) -> Built:
    return Built(str(tmp_path_factory.mktemp("qfusion-vllm")))


def run_engine(kind: str, root: str, name: str, model: str, hf_overrides: dict, rounds: list[list[tiny.Request]],
               steps: int) -> subprocess.CompletedProcess:
    """Run ``engine_cases.py`` in a subprocess; returns the finished process (its JSON is ``root/name.out.json``)."""
    cases = os.path.join(root, f"{name}.json")
    with open(cases, "w") as f:
        json.dump({"model": model, "hf_overrides": hf_overrides, "steps": steps, "suppress": tiny.SUPPRESS[kind],
                   "rounds": [[{"name": r.name, "prompt": tiny.prompt(kind, r), "images": r.images,
                                "mm_processor_kwargs": r.mm_processor_kwargs} for r in round_] for round_ in rounds]}, f)
    env = dict(os.environ, OMP_NUM_THREADS=os.environ.get("OMP_NUM_THREADS", "2"))
    return subprocess.run([sys.executable, os.path.join(HERE, "engine_cases.py"), cases,
                           os.path.join(root, f"{name}.out.json")],
                          capture_output=True, text=True, timeout=ENGINE_TIMEOUT_S, env=env)


def engine_outputs(kind: str, root: str, name: str, *args) -> dict:
    done = run_engine(kind, root, name, *args)
    if done.returncode != 0:
        raise AssertionError(f"vLLM engine run {name!r} failed:\n{done.stdout[-3000:]}\n{done.stderr[-6000:]}")
    with open(os.path.join(root, f"{name}.out.json")) as f:
        return json.load(f)
