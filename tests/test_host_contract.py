"""The contract every registered host family keeps, run on a tiny checkpoint of each (saved and loaded back).

One test per property, parametrised over ``HOST_CASES`` (tests/conftest_hosts.py); the per-family
test files keep only what is specific to a family.
"""

import inspect

import pytest
import torch
from conftest_hosts import HOST_CASES, capture_llm_inputs, fusion_config, greedy, images, videos

import qfusion
from qfusion import QFusionProcessor
from qfusion.adapters import MODEL_TYPES, FusionCache
from qfusion.adapters.patching import QFUSION_PARAMETERS
from qfusion.inputs import decode_questions, placeholder_runs

CASES = {case.name: case for case in HOST_CASES}


def _params(names):
    return [pytest.param(name, marks=pytest.mark.skipif(not CASES[name].available,
                                                        reason=f"needs transformers>={CASES[name].min_transformers}"))
            for name in names]


CONVERSATION = [
    {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "what is this ?"}]},
    {"role": "assistant", "content": [{"type": "text", "text": "a cat ."}]},
    {"role": "user", "content": [{"type": "text", "text": "what color is it ?"}]},
    {"role": "assistant", "content": [{"type": "text", "text": "red"}]},
]
PROMPTS = [["what is this ?", "how many"], ["red"], ["what color is it ?", "left", "big"]]
each_host = pytest.mark.parametrize("name", _params(CASES))


def attached(hosts, name, seed=0, **kwargs):
    case = CASES[name]
    model = hosts.model(case.kind, **kwargs)
    torch.manual_seed(seed)
    adapter = qfusion.attach(model, fusion_config(), **({"mode": case.mode} if case.mode else {}))
    return model, adapter, QFusionProcessor(hosts.processor(case.kind), model)


def pictures(count, first_seed=10):
    return [images(1, seed=first_seed + i)[0] for i in range(count)]


def llm(adapter):
    return adapter.model.get_submodule(adapter.llm_name)


def no_placeholders(adapter):
    """A random tiny host may write placeholder or marker tokens; generation comparisons suppress them."""
    return [t for t in (adapter.tokens.image, adapter.tokens.video, adapter.tokens.start, adapter.tokens.end)
            if t is not None]


def placeholder_mask(adapter, input_ids):
    return torch.isin(input_ids, torch.tensor(adapter.placeholder_ids))


def test_every_registered_model_type_has_a_contract_case():
    assert set(MODEL_TYPES) <= {case.kind for case in HOST_CASES}


@each_host
def test_forward_trains_only_the_plugin(hosts, name):
    model, adapter, processor = attached(hosts, name)
    batch = processor(images=pictures(1), conversations=[CONVERSATION], return_labels=True)
    out = model(**batch)
    assert torch.isfinite(out.loss)
    out.loss.backward()
    with_grad = {name for name, p in model.named_parameters() if p.grad is not None}
    assert with_grad and all(name.startswith("qfusion.") for name in with_grad)
    assert not any(p.requires_grad for name, p in model.named_parameters() if not name.startswith("qfusion."))
    assert model.qfusion.codebook.weight.grad.abs().sum() > 0


@each_host
def test_the_llm_gets_the_fused_tokens_exactly_at_the_placeholders(hosts, name):
    model, adapter, processor = attached(hosts, name)
    batch = processor(images=pictures(2), questions=[["what is this ?", "how many", "red"], ["what color is it ?"]])
    records, handle = capture_llm_inputs(llm(adapter))
    with torch.no_grad():
        model(**batch)
        handle.remove()
        # independently: the fusion on the family's vision tokens, with each sample's questions
        features = adapter.encode(batch)
        questions = decode_questions(batch["qfusion_input_ids"], batch["qfusion_attention_mask"], 2)
        tokens = [torch.cat(sample) for sample in adapter.fusion(features, questions).tokens]
        if adapter.family.name == "blip2":  # fused tokens have the Q-Former's width, then the host's projection
            tokens = [model.language_projection(t) for t in tokens]
        text = model.get_input_embeddings()(batch["input_ids"])
    embeds = records[-1]
    mask = placeholder_mask(adapter, batch["input_ids"])
    prefix = adapter.image_prefix
    budget = adapter.budget
    for b, wanted in enumerate(tokens):
        assert int(mask[b].sum()) == prefix + wanted.shape[0]
        torch.testing.assert_close(embeds[b][mask[b]][prefix:], wanted.to(embeds.dtype), rtol=0, atol=0)
        torch.testing.assert_close(embeds[b][~mask[b]], text[b][~mask[b]], rtol=0, atol=0)
    assert [t.shape[0] for t in tokens] == [budget.m + 2 * budget.n, budget.m]


def _check_mrope(position_ids, input_ids, attention_mask, placeholders):
    """M-RoPE rule: text rows agree and count up; a run of k fused tokens starting at p has t = h = p and
    w = p … p+k−1; the text after it continues at p + k."""
    if position_ids.shape[0] == 4:  # text positions first, then (t, h, w)
        position_ids = position_ids[1:]
    for b in range(input_ids.shape[0]):
        real = attention_mask[b].bool()
        ids, pos = input_ids[b][real].tolist(), position_ids[:, b][:, real]
        p, i = int(pos[0, 0]), 0
        while i < len(ids):
            if ids[i] in placeholders:
                k = 1
                while i + k < len(ids) and ids[i + k] == ids[i]:
                    k += 1
                assert pos[0, i:i + k].tolist() == [p] * k and pos[1, i:i + k].tolist() == [p] * k
                assert pos[2, i:i + k].tolist() == list(range(p, p + k))
                p, i = p + k, i + k
            else:
                assert pos[:, i].tolist() == [p, p, p]
                p, i = p + 1, i + 1


@each_host
def test_positions_follow_the_hosts_own_rule(hosts, name):
    model, adapter, processor = attached(hosts, name)
    batch = processor(images=pictures(2), questions=[["what is this ?", "how many"], ["red"]])
    seen = []
    handle = llm(adapter).register_forward_pre_hook(lambda m, a, kw: seen.append(kw.get("position_ids")),
                                                     with_kwargs=True)
    with torch.no_grad():
        model(**batch)
    handle.remove()
    positions = seen[-1]
    if CASES[name].positions == "mrope":
        _check_mrope(positions, batch["input_ids"], batch["attention_mask"], set(adapter.placeholder_ids))
    elif positions is not None:  # the LLM's own consecutive positions, fused runs counted like any token
        for b in range(batch["input_ids"].shape[0]):
            real = positions.reshape(-1, positions.shape[-1])[b if positions.shape[0] > 1 else 0]
            real = real[batch["attention_mask"][b].bool()]
            assert torch.equal(real.diff(), torch.ones_like(real.diff()))


@each_host
def test_generate_equals_a_greedy_loop(hosts, name):
    model, adapter, processor = attached(hosts, name)
    inputs = processor(images=pictures(1), conversations=[CONVERSATION[:3]])
    quiet = no_placeholders(adapter)
    generated = model.generate(**inputs, max_new_tokens=5, do_sample=False, suppress_tokens=quiet)
    assert torch.equal(generated, greedy(model, inputs, 5, quiet)[:, : generated.shape[1]])


@each_host
def test_a_batch_equals_each_prompt_alone_and_right_padded_generate_is_refused(hosts, name):
    model, adapter, processor = attached(hosts, name)
    quiet = no_placeholders(adapter)
    samples = pictures(len(PROMPTS))
    alone = [processor(images=[image], questions=[questions]) for image, questions in zip(samples, PROMPTS)]
    with torch.no_grad():
        alone_logits = [model(**inputs).logits[0] for inputs in alone]
    alone_tokens = [model.generate(**inputs, max_new_tokens=4, do_sample=False, suppress_tokens=quiet)
                    [0, inputs["input_ids"].shape[1]:] for inputs in alone]
    batch = processor(images=samples, questions=PROMPTS, padding_side="left")
    with torch.no_grad():
        logits = model(**batch).logits
    for b, want in enumerate(alone_logits):
        real = batch["attention_mask"][b].bool()
        torch.testing.assert_close(logits[b, real], want, rtol=1e-4, atol=1e-4)
    together = model.generate(**batch, max_new_tokens=4, do_sample=False,
                              suppress_tokens=quiet)[:, batch["input_ids"].shape[1]:]
    for b, want in enumerate(alone_tokens):
        assert torch.equal(together[b, : want.numel()], want)
    right = processor(images=samples, questions=PROMPTS, padding_side="right")
    with pytest.raises(ValueError, match="right-padded; batched generation needs left padding"):
        model.generate(**right, max_new_tokens=2, do_sample=False)


@each_host
def test_follow_ups_with_the_fusion_cache_equal_recomputing(hosts, name):
    model, _, processor = attached(hosts, name)
    image = pictures(1)
    first = processor(images=image, conversations=[CONVERSATION[:1]])
    second = processor(images=image, conversations=[CONVERSATION[:3]])
    cache = FusionCache()
    with torch.no_grad():
        model(**first, qfusion_cache=cache)
        cached = model(**second, qfusion_cache=cache).logits
        fresh = model(**second).logits
    assert (cache.hits, cache.misses) == (1, 1)
    torch.testing.assert_close(cached, fresh, rtol=1e-5, atol=1e-5)


@each_host
def test_save_then_attach_is_bit_exact(hosts, name, tmp_path):
    model, adapter, processor = attached(hosts, name, seed=3)
    batch = processor(images=pictures(1), questions=[["what is this ?", "red"]])
    with torch.no_grad():
        before = model(**batch).logits
    adapter.save_pretrained(tmp_path / "plugin", processor=processor)
    fresh = hosts.model(CASES[name].kind)
    qfusion.attach(fresh, tmp_path / "plugin")
    reloaded = QFusionProcessor.from_pretrained(tmp_path / "plugin", hosts.processor(CASES[name].kind), fresh)
    with torch.no_grad():
        assert torch.equal(fresh(**reloaded(images=pictures(1), questions=[["what is this ?", "red"]])).logits, before)


@each_host
def test_lora_on_the_llm_trains_only_lora_and_the_plugin_copy(hosts, name):
    from peft import get_peft_model

    model, adapter, processor = attached(hosts, name)
    peft_model = get_peft_model(model, qfusion.lora_config(model))
    trainable = [n for n, p in peft_model.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in n or "qfusion" in n for n in trainable)
    assert any("lora_" in n and adapter.llm_name.split(".")[-1] in n for n in trainable)
    batch = processor(images=pictures(1), conversations=[CONVERSATION], return_labels=True)
    peft_model(**batch).loss.backward()
    with_grad = {n for n, p in peft_model.named_parameters() if p.grad is not None}
    assert any("lora_" in n for n in with_grad) and any("qfusion" in n for n in with_grad)


@each_host
def test_a_bf16_host_gets_fused_tokens_in_its_dtype(hosts, name):
    model, adapter, processor = attached(hosts, name, dtype=torch.bfloat16)
    assert adapter.fusion.dtype == torch.bfloat16
    records, handle = capture_llm_inputs(llm(adapter))
    with torch.no_grad():
        out = model(**processor(images=pictures(1), questions="what is this ?"))
    handle.remove()
    assert records[-1].dtype == torch.bfloat16 and torch.isfinite(out.logits.float()).all()


@each_host
def test_detach_leaves_the_host_bit_identical(hosts, name):
    kind = CASES[name].kind
    model = hosts.model(kind)
    if inspect.signature(type(model).forward).parameters["pixel_values"].default is inspect.Parameter.empty:
        text = dict(hosts.processor(kind)(images=pictures(1), text="what is this ?", return_tensors="pt"))
    else:  # the host alone on text
        text = {"input_ids": torch.tensor([[2, 9, 12, 14, 15, 16]]), "attention_mask": torch.ones(1, 6, dtype=torch.long)}
    with torch.no_grad():
        before = model(**text).logits
    state = {k: v.clone() for k, v in model.state_dict().items()}
    attributes = dict(model.__dict__)
    flags = {n: p.requires_grad for n, p in model.named_parameters()}
    adapter = qfusion.attach(model, fusion_config(), train_projector=True)
    batch = QFusionProcessor(hosts.processor(CASES[name].kind), model)(images=pictures(1), questions="what is this ?")
    model(**batch).logits.sum().backward()
    plugin = adapter.fusion
    assert qfusion.detach(model) is plugin
    with torch.no_grad():
        assert torch.equal(model(**text).logits, before)
    after = model.state_dict()
    assert after.keys() == state.keys() and all(torch.equal(after[k], v) for k, v in state.items())
    assert model.__dict__.keys() == attributes.keys()
    assert {n: p.requires_grad for n, p in model.named_parameters()} == flags
    assert type(model).forward is model.forward.__func__ and type(model).generate is model.generate.__func__


@each_host
def test_patched_methods_carry_the_host_signature_plus_the_qfusion_parameters(hosts, name):
    model, _, _ = attached(hosts, name)
    for method in ("forward", "generate"):
        host = [p for p in inspect.signature(getattr(type(model), method)).parameters if p != "self"]
        patched = inspect.signature(getattr(model, method)).parameters
        assert [p for p in patched if p not in QFUSION_PARAMETERS] == host
        assert all(patched[p].kind is inspect.Parameter.KEYWORD_ONLY for p in QFUSION_PARAMETERS)


@each_host
def test_a_call_budget_reaches_the_processor_forward_generate_and_cache(hosts, name):
    model, adapter, default = attached(hosts, name)
    prefix = adapter.image_prefix
    picture = pictures(1)
    inputs = default(images=picture, questions=[["what is this ?", "red"]], budget=(2, 1))
    runs = placeholder_runs(inputs["input_ids"][0], adapter.placeholder_ids)
    assert runs == [prefix + 2, 1] and inputs["qfusion_budget"] == (2, 1)
    records, handle = capture_llm_inputs(llm(adapter))
    with torch.no_grad():
        logits = model(**inputs).logits
    handle.remove()
    assert int(placeholder_mask(adapter, inputs["input_ids"]).sum()) - prefix == 3  # m + n under this budget
    quiet = no_placeholders(adapter)
    generated = model.generate(**inputs, max_new_tokens=3, do_sample=False, suppress_tokens=quiet)
    assert torch.equal(generated, greedy(model, inputs, 3, quiet)[:, : generated.shape[1]])
    cache = FusionCache()
    with torch.no_grad():
        torch.testing.assert_close(model(**inputs, qfusion_cache=cache).logits, logits, rtol=1e-5, atol=1e-5)
        model(**default(images=picture, questions=[["what is this ?", "red"]]), qfusion_cache=cache)  # other budget
    assert (cache.hits, cache.misses) == (0, 2)
    assert adapter.budget == (4, 2)
    with pytest.raises(ValueError, match=r"placeholder runs .* expected"):
        model(**dict(inputs, qfusion_budget=(4, 2)))  # placeholders built for (2, 1)
    with pytest.raises(ValueError, match="qfusion_budget: expected m <= codebook_size=16"):
        model(**dict(inputs, qfusion_budget=(17, 1)))
    text_only = {"input_ids": inputs["input_ids"][:, :3], "pixel_values": None,
                 **{k: v for k, v in inputs.items() if k.startswith("qformer_")}}
    with pytest.raises(ValueError, match="qfusion_budget: m, n: expected 1 <= n <= m"):
        model(**text_only, qfusion_budget=(0, 0))  # refused on a call with nothing to fuse too
    with pytest.raises(TypeError, match="unknown qfusion keyword 'qfusion_bugdet'"):
        model(**inputs, qfusion_bugdet=(2, 1))


@pytest.mark.parametrize("name", _params([name for name, case in CASES.items() if case.video]))
def test_video_prompts_batch_and_follow_up_like_image_prompts(hosts, name):
    model, adapter, processor = attached(hosts, name)
    clips = videos(2, seed=3)
    conversations = [[{"role": "user", "content": [{"type": "video"}, {"type": "text", "text": "what is this ?"}]}],
                     [{"role": "user", "content": [{"type": "video"}, {"type": "text", "text": "how many ?"}]},
                      {"role": "assistant", "content": [{"type": "text", "text": "two ."}]},
                      {"role": "user", "content": [{"type": "text", "text": "what color is it ?"}]}]]
    batch = processor(videos=[[c] for c in clips], conversations=conversations)
    video_token = adapter.tokens.video
    assert [placeholder_runs(ids, video_token) for ids in batch["input_ids"]] == [[4], [4, 2]]
    with torch.no_grad():
        together = model(**batch).logits
        for b, (clip, conversation) in enumerate(zip(clips, conversations)):
            alone = processor(videos=[[clip]], conversations=[conversation])
            real = batch["attention_mask"][b].bool()
            torch.testing.assert_close(together[b, real], model(**alone).logits[0], rtol=1e-4, atol=1e-4)
        cache = FusionCache()
        model(**processor(videos=[[clips[1]]], conversations=[conversations[1][:1]]), qfusion_cache=cache)
        followed = model(**processor(videos=[[clips[1]]], conversations=[conversations[1]]), qfusion_cache=cache)
    assert cache.hits == 1
    torch.testing.assert_close(followed.logits[0], together[1][batch["attention_mask"][1].bool()], rtol=1e-4,
                               atol=1e-4)


@pytest.mark.parametrize("name", _params([name for name, case in CASES.items() if case.multi_image]))
def test_several_images_in_one_prompt_each_get_their_fused_tokens(hosts, name):
    model, adapter, processor = attached(hosts, name)
    conversation = [
        {"role": "user", "content": [{"type": "image"}, {"type": "image"}, {"type": "text", "text": "what is this ?"}]},
        {"role": "assistant", "content": [{"type": "text", "text": "a cat ."}]},
        {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "what color is it ?"}]},
    ]
    batch = processor(images=[pictures(3)], conversations=[conversation])
    assert batch["qfusion_image_counts"].tolist() == [[2, 1]]
    records, handle = capture_llm_inputs(llm(adapter))
    with torch.no_grad():
        model(**batch)
        handle.remove()
        features = adapter.encode(batch)
        questions = decode_questions(batch["qfusion_input_ids"], batch["qfusion_attention_mask"], 1)[0]
        # images 0 and 1 are about question 0 only; image 2 about question 1
        wanted = torch.cat([*(adapter.fusion([f], [questions[:1]]).tokens[0][0] for f in features[:2]),
                            adapter.fusion([features[2]], [questions[1:]]).tokens[0][0]])
    mask = placeholder_mask(adapter, batch["input_ids"])  # (fused in one batch there, one by one here)
    torch.testing.assert_close(records[-1][0][mask[0]], wanted, rtol=1e-5, atol=1e-6)
