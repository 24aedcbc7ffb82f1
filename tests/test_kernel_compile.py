"""The kernel's production configs compile for sm_80 and sm_90 without spills, with pipelined loops.

No GPU is needed: ``triton.compile`` with a ``GPUTarget`` runs Triton's NVIDIA pipeline and its
bundled ``ptxas`` on the host (``benchmarks/compile_check.py``). The kernels must be compiled in a
process where ``TRITON_INTERPRET`` is unset (under it they are interpreted objects), so each test
module run compiles once in a subprocess and the tests read its rows. The default run compiles a
subset (bfloat16, d = 64 and 128, ``grouped``: the most mask code, on both targets); the slow run
compiles every production config.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

pytest.importorskip("triton", reason="the compile check needs triton")

ROOT = Path(__file__).resolve().parent.parent
BENCHMARKS = ROOT / "benchmarks"  # the compile check is a developer tool there, not in the package
sys.path.insert(0, str(BENCHMARKS))

from compile_check import Case, problems, production_cases  # noqa: E402

from qfusion.ops.triton.configs import ARCHS, TABLE, PassConfig  # noqa: E402

# The check must be able to fail: one stage cannot pipeline (nothing to overlap), so its loops
# hold no multi-buffered async copies.
UNPIPELINED = Case("fwd", 80, torch.bfloat16, 64, "causal", override=PassConfig(64, 64, 4, 1))

SCRIPT = """
import json, sys
from concurrent.futures import ProcessPoolExecutor
import torch
from compile_check import Case, compile_case, production_cases, quiet
from qfusion.ops.triton.configs import PassConfig
cases = production_cases(full={full})
cases.append(Case("fwd", 80, torch.bfloat16, 64, "causal", override=PassConfig(64, 64, 4, 1)))
with ProcessPoolExecutor(2, initializer=quiet) as pool:  # CI has 2 cores
    json.dump(list(pool.map(compile_case, cases)), open(sys.argv[1], "w"))
"""


def compile_rows(tmp_path_factory, full: bool) -> list[dict]:
    try:
        from triton.backends.nvidia import compiler  # noqa: F401
    except ImportError:
        pytest.skip("this triton has no NVIDIA backend")
    out = tmp_path_factory.mktemp("compile") / "rows.json"
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), str(BENCHMARKS), env.get("PYTHONPATH", "")])
    done = subprocess.run([sys.executable, "-c", SCRIPT.format(full=full), str(out)], env=env, cwd=ROOT,
                          capture_output=True, text=True, timeout=3000)
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(out.read_text())


@pytest.fixture(scope="module")
def subset_rows(tmp_path_factory):
    return compile_rows(tmp_path_factory, full=False)


def production(rows):
    return [r for r in rows if (r["kernel"], r["num_stages"]) != ("fwd", 1)]


def test_subset_covers_every_kernel_on_both_targets(subset_rows):
    rows = production(subset_rows)
    assert len(rows) == len(production_cases(full=False))
    assert {(r["kernel"], r["arch"]) for r in rows} == {(k, a) for k in ("fwd", "dkdv", "dq") for a in ARCHS}


def assert_clean(rows):
    bad = {f"{r['kernel']} sm_{r['arch']} {r['dtype']} d{r['head_dim']} {r['policy']}": problems(r)
           for r in production(rows) if problems(r)}
    assert not bad, json.dumps(bad, indent=1)


def test_production_configs_do_not_spill_and_are_pipelined(subset_rows):
    assert_clean(subset_rows)
    for row in production(subset_rows):
        # Each tile loop (full tiles, partial tiles) copies asynchronously into >= 2 stages.
        assert row["loops"] >= 2 and row["loops_with_async_copies"] == row["loops"]
        assert row["min_buffer_depth"] >= 2 and row["ptx_async_copies"] > 0
        assert row["spill_stores"] == row["spill_loads"] == 0 and 0 < row["registers"] <= 255
        assert row["cubin_stack_bytes"] == 0  # Triton's own cubin: no stack frame, where spills would go


def test_hopper_kernels_use_async_warpgroup_mma(subset_rows):
    rows = [r for r in production(subset_rows) if r["arch"] == 90]
    assert rows and all(r["async_mma"] for r in rows)


def test_check_flags_a_loop_that_is_not_pipelined(subset_rows):
    (row,) = [r for r in subset_rows if (r["kernel"], r["num_stages"]) == ("fwd", 1)]
    assert any("multi-buffered" in p for p in problems(row))


def test_check_flags_spills_and_errors():
    clean = dict(spill_stores=0, spill_loads=0, loops=2, loops_with_async_copies=2, tile_buffers=4,
                 min_buffer_depth=2, ptx_async_copies=10)
    assert problems(clean) == []
    assert "spills" in problems(dict(clean, spill_stores=8))[0]
    assert "stack 16 B in Triton's cubin" in problems(dict(clean, cubin_stack_bytes=16))[0]
    assert "1 of 2 tile loops" in problems(dict(clean, loops_with_async_copies=1))[0]
    assert problems({"error": "OutOfResources: shared memory"}) == ["OutOfResources: shared memory"]


def test_table_has_every_generation_dtype_and_bucket():
    assert {(arch, kind, dim) for arch, kind, dim in TABLE} == {
        (a, k, d) for a in ARCHS for k in ("half", "float32") for d in (64, 128, 256)}
    assert UNPIPELINED.config.num_stages == 1


@pytest.mark.slow
def test_every_production_config_is_clean(tmp_path_factory):
    assert_clean(compile_rows(tmp_path_factory, full=True))
