"""qfusion.adapters.blip2 on tiny random BLIP-2 (OPT) and InstructBLIP (Llama) checkpoints."""

import pytest
import torch
from conftest_hosts import IMAGE_TOKEN_ID, capture_llm_inputs, fusion_config, images

import qfusion
from qfusion import QFusionProcessor, QuestionFusion
from qfusion.adapters import FusionCache
from qfusion.adapters.patching import QFusionArguments
from qfusion.inputs import decode_questions

CASES = [("blip-2", "replace"), ("blip-2", "augment"), ("instructblip", "replace"), ("instructblip", "augment")]

CONVERSATION = [
    {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "what is this ?"}]},
    {"role": "assistant", "content": [{"type": "text", "text": "a dog ."}]},
    {"role": "user", "content": [{"type": "text", "text": "how many are there ?"}]},
]


def attached(hosts, kind, mode, seed=0):
    model = hosts.model(kind)
    torch.manual_seed(seed)
    adapter = qfusion.attach(model, fusion_config(), mode=mode)
    return model, adapter, QFusionProcessor(hosts.processor(kind), model)


@pytest.mark.parametrize("kind,mode", CASES)
def test_forward_loss_backward_and_the_llm_input(hosts, kind, mode):
    model, adapter, processor = attached(hosts, kind, mode)
    prefix = model.config.num_query_tokens if mode == "augment" else 0
    assert adapter.image_prefix == prefix
    assert adapter.fusion.config.output_dim == model.config.qformer_config.hidden_size
    batch = processor(images=images(2), questions=[["what is this ?", "how many", "red"], "what color is it ?"],
                      padding_side="left")
    records, handle = capture_llm_inputs(model.language_model)
    out = model(**batch, labels=batch["input_ids"])
    handle.remove()
    out.loss.backward()
    assert all(name.startswith("qfusion.") for name, p in model.named_parameters() if p.grad is not None)
    assert model.qfusion.codebook.weight.grad.abs().sum() > 0

    text = model.get_input_embeddings()(batch["input_ids"])
    positions = (records[-1] != text).any(-1)
    assert positions.sum(-1).tolist() == [prefix + adapter.budget[0] + 2 * adapter.budget[1], prefix + adapter.budget[0]]
    assert torch.equal(positions, batch["input_ids"] == IMAGE_TOKEN_ID)
    with torch.no_grad():
        vision = model.vision_model(pixel_values=batch["pixel_values"]).last_hidden_state
        questions = decode_questions(batch["qfusion_input_ids"], batch["qfusion_attention_mask"], 2)
        tokens = adapter.fusion(list(vision), questions).tokens
        if mode == "augment":
            extra = {"qformer_input_ids": batch["qformer_input_ids"],
                     "qformer_attention_mask": batch["qformer_attention_mask"]} if kind == "instructblip" else {}
            host = model.get_image_features(batch["pixel_values"], return_dict=True, **extra).pooler_output
    for b in range(2):
        spliced = records[-1][b][positions[b]]
        fused = model.language_projection(torch.cat(tokens[b]))
        if mode == "augment":
            torch.testing.assert_close(spliced[:prefix], host[b], rtol=0, atol=0)
        torch.testing.assert_close(spliced[prefix:], fused, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("kind,mode", [("blip-2", "replace"), ("instructblip", "augment")])
def test_mm_encoder_outputs_path_and_attach_give_identical_logits(hosts, kind, mode):
    model, adapter, processor = attached(hosts, kind, mode)
    batch = processor(images=images(2), questions=[["what is this ?", "how many"], "red"], padding_side="left")
    extra = {k: batch[k] for k in ("qformer_input_ids", "qformer_attention_mask") if k in batch}
    with torch.no_grad():
        precomputed = adapter.with_fused_tokens(
            {"input_ids": batch["input_ids"], "pixel_values": batch["pixel_values"], **extra},
            QFusionArguments(batch["qfusion_input_ids"], batch["qfusion_attention_mask"]))["mm_encoder_outputs"]
        with_plugin = model(**batch).logits
        fusion = qfusion.detach(model)
        assert isinstance(fusion, QuestionFusion)
        zero_patch = model(pixel_values=None, input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                           mm_encoder_outputs=precomputed, **extra).logits
    assert torch.equal(zero_patch, with_plugin)


def test_too_few_placeholders_raise_instead_of_misplacing_features(hosts):
    model, _, processor = attached(hosts, "blip-2", "replace")
    batch = dict(processor(images=images(1), questions=[["what is this ?", "red"]]))
    ids = batch["input_ids"].clone()
    ids[0, (ids[0] == IMAGE_TOKEN_ID).nonzero()[0]] = 10  # one placeholder fewer
    for call in (model, model.generate):
        with pytest.raises(ValueError, match=r"runs \[3, 2\] \(total 5\), expected \[4, 2\] \(total 6\)"):
            call(**{**batch, "input_ids": ids})
    with pytest.raises(ValueError, match="input_ids: required"):
        model.generate(**{**batch, "input_ids": None})


def test_encoder_decoder_host_is_not_supported_yet(hosts):
    from transformers import Blip2ForConditionalGeneration

    model = Blip2ForConditionalGeneration.from_pretrained(hosts.directory("blip-2-t5"))
    with pytest.raises(NotImplementedError, match="not supported yet"):
        qfusion.attach(model, fusion_config())
    assert "forward" not in model.__dict__ and not hasattr(model, "qfusion")


def test_follow_up_reuses_the_cached_vision_and_qformer_outputs(hosts):
    model, _, processor = attached(hosts, "instructblip", "augment")
    calls = []
    handle = model.vision_model.register_forward_hook(lambda *args: calls.append(1))
    cache = FusionCache()
    image = images(1)
    model.generate(**processor(images=image, conversations=[CONVERSATION[:1]]), max_new_tokens=3,
                   do_sample=False, qfusion_cache=cache)
    turn2 = processor(images=image, conversations=[CONVERSATION])
    cached = model.generate(**turn2, max_new_tokens=3, do_sample=False, qfusion_cache=cache)
    assert len(calls) == 1 and cache.hits == 1
    handle.remove()
    assert torch.equal(cached, model.generate(**turn2, max_new_tokens=3, do_sample=False))


def test_bad_options_raise_clearly(hosts):
    with pytest.raises(ValueError, match="mode: expected one of"):
        qfusion.attach(hosts.model("blip-2"), fusion_config(), mode="concat")
    with pytest.raises(ValueError, match="vision_source"):
        qfusion.attach(hosts.model("blip-2"), fusion_config(), vision_source="projector")
    with pytest.raises(ValueError, match="hd"):
        qfusion.attach(hosts.model("instructblip"), fusion_config(), hd=(2, 2))
    model, _, processor = attached(hosts, "instructblip", "augment")
    batch = dict(processor(images=images(1), questions="what is this ?"))
    with pytest.raises(ValueError, match="qformer_input_ids: required"):
        model(**{**batch, "qformer_input_ids": None})
