"""The attention contract in ``qfusion.ops.meta``, and the ops package standing on its own."""

import subprocess
import sys
from pathlib import Path

import pytest
import torch

import qfusion.layout
from qfusion.ops import meta
from qfusion.ops.meta import NO_GROUP, TEXT, VISION, AttentionMeta, mask_rule

ROOT = Path(__file__).resolve().parent.parent


def test_mask_rule_broadcasts_and_rejects_unknown_policy():
    q = torch.tensor([[TEXT]]), torch.tensor([[2]]), torch.tensor([[5]])
    k = torch.tensor([[VISION, TEXT, TEXT]]), torch.tensor([[NO_GROUP, 1, 0]]), torch.tensor([[0, 4, 2]])
    assert mask_rule("grouped", *q, *k).tolist() == [[True, False, True]]
    with pytest.raises(ValueError, match="policy: expected one of"):
        mask_rule("sliding", *q, *k)


def test_metadata_from_lists_counts_samples_and_tokens():
    built = AttentionMeta.from_lists([VISION, VISION, TEXT, VISION], [NO_GROUP, NO_GROUP, 0, NO_GROUP], [0, 1, 2, 0],
                                     [3, 1])
    assert built.cu_seqlens.tolist() == [0, 3, 4] and built.max_seqlen == 3
    assert (built.num_samples, built.num_tokens) == (2, 4)
    assert built.sample_ids().tolist() == [0, 0, 0, 1] and built.kind.dtype == torch.int32


def test_layout_builds_the_contract_of_ops_and_its_old_names_still_work():
    for name in ("VISION", "TEXT", "QUERY", "NO_GROUP", "POLICIES", "AttentionMeta", "mask_rule", "dense_mask"):
        assert getattr(qfusion.layout, name) is getattr(meta, name), name
    assert isinstance(qfusion.layout.pack([2], [[1]], budget=(1, 1)).meta, AttentionMeta)


def test_ops_imports_nothing_else_of_qfusion():
    # qfusion as a bare namespace: importing the ops (and the kernel, where triton is installed) must
    # not pull in the layout, the model or the adapters.
    script = (
        "import importlib.util, sys, types\n"
        f"package = types.ModuleType('qfusion'); package.__path__ = [{str(ROOT / 'qfusion')!r}]\n"
        "sys.modules['qfusion'] = package\n"
        "import qfusion.ops, qfusion.ops.attention, qfusion.ops.checks, qfusion.ops.meta\n"
        "if importlib.util.find_spec('triton') is not None:\n"
        "    import qfusion.ops.triton\n"
        "print(' '.join(sorted(m for m in sys.modules if m.startswith('qfusion'))))\n"
    )
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    loaded = done.stdout.split()
    assert "qfusion.ops.attention" in loaded
    assert [m for m in loaded if m != "qfusion" and not m.startswith("qfusion.ops")] == []
