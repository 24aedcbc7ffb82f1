"""qfusion.adapters.gemma on tiny random Gemma 3 and Gemma 4 checkpoints: what is specific to the family
(the contract every host keeps is in test_host_contract.py)."""

import pytest
import torch
from conftest_hosts import GEMMA_BOI_ID, GEMMA_EOI_ID, IMAGE_TOKEN_ID, fusion_config, images

import qfusion
from qfusion import QFusionProcessor
from qfusion.inputs import placeholder_runs


def attached(hosts, kind="gemma3"):
    model = hosts.model(kind)
    torch.manual_seed(0)
    adapter = qfusion.attach(model, fusion_config())
    return model, QFusionProcessor(hosts.processor(kind), model), adapter


def llm_states(model, batch, perturb: int | None = None):
    """The LLM's last hidden states; with ``perturb``, the input embedding at that position is changed."""
    llm = model.model.language_model

    def pre(module, args, kwargs):
        if perturb is not None:
            embeds = kwargs["inputs_embeds"].clone()
            embeds[0, perturb] += 1.0
            kwargs["inputs_embeds"] = embeds
        return args, kwargs

    states = []
    handles = [llm.register_forward_pre_hook(pre, with_kwargs=True),
               llm.register_forward_hook(lambda m, a, out: states.append(out.last_hidden_state))]
    with torch.no_grad():
        model(**batch)
    for handle in handles:
        handle.remove()
    return states[-1][0]


@pytest.mark.parametrize("kind", ["gemma3", "gemma4"])
def test_each_fused_run_is_a_bidirectional_block_between_the_image_markers(hosts, kind):
    model, processor, adapter = attached(hosts, kind)
    batch = processor(images=images(1), questions=[["what is this ?", "red"]])
    ids = batch["input_ids"][0]
    assert placeholder_runs(ids, IMAGE_TOKEN_ID) == [4, 2]
    assert torch.equal(batch[adapter.family.token_types][0], (ids == IMAGE_TOKEN_ID).int())
    runs = (ids == IMAGE_TOKEN_ID).nonzero().flatten().tolist()
    first, second = runs[:4], runs[4:]
    assert ids[first[0] - 1] == GEMMA_BOI_ID and ids[first[-1] + 1] == GEMMA_EOI_ID
    base = llm_states(model, batch)
    changed = llm_states(model, batch, perturb=first[-1])  # the last fused token of the first run
    assert not torch.allclose(changed[first[0]], base[first[0]])  # seen by the run's first token: bidirectional
    assert torch.equal(changed[: first[0]], base[: first[0]])  # nothing before the run sees it
    changed = llm_states(model, batch, perturb=second[-1])  # the follow-up's run
    assert not torch.allclose(changed[second[0]], base[second[0]])
    assert torch.equal(changed[: second[0]], base[: second[0]])  # the first run does not see a later one


def test_pan_and_scan_crops_are_refused(hosts):
    model, processor, _ = attached(hosts)
    processor.host.image_processor.do_pan_and_scan = True
    processor.host.image_processor.pan_and_scan_min_crop_size = 8
    processor.host.image_processor.pan_and_scan_min_ratio_to_activate = 1.0
    processor.host.image_processor.pan_and_scan_max_num_crops = 4
    with pytest.raises(ValueError, match="pan-and-scan crops are not supported"):
        processor(images=images(1, size=(40, 160)), questions="what is this ?")
