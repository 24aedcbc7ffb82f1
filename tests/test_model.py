import json

import pytest
import torch

from qfusion import FusionConfig, QuestionFusion

POLICIES = ["causal", "prefix", "grouped"]


def tiny_config(**overrides):
    base = dict(vision_dim=12, hidden_size=16, num_layers=2, num_heads=2, intermediate_size=32,
                codebook_size=10, m=4, n=2, output_dim=10, text_vocab_size=30, contrastive_dim=6,
                attn_impl="eager")
    base.update(overrides)
    return FusionConfig(**base)


def tiny_fusion(dtype=torch.float64, seed=0, **overrides):
    torch.manual_seed(seed)
    return QuestionFusion(tiny_config(**overrides)).to(dtype)


def batch(dtype=torch.float64, seed=1):
    gen = torch.Generator().manual_seed(seed)
    vision = [torch.randn(5, 12, generator=gen, dtype=dtype), torch.randn(3, 12, generator=gen, dtype=dtype),
              torch.randn(7, 12, generator=gen, dtype=dtype)]
    questions = [
        [torch.tensor([1, 2, 3]), torch.tensor([4]), torch.tensor([5, 6])],
        [torch.tensor([7, 8])],
        [torch.tensor([9]), torch.tensor([10, 11, 12, 13])],
    ]
    return vision, questions


def test_output_shapes_and_token_counts():
    fusion = tiny_fusion()
    vision, questions = batch()
    out = fusion(vision, questions)
    assert [[t.shape for t in sample] for sample in out.tokens] == [
        [(4, 10), (2, 10), (2, 10)], [(4, 10)], [(4, 10), (2, 10)]]
    assert out.eos_embed.shape == (6, 6)
    torch.testing.assert_close(out.eos_embed.norm(dim=-1), torch.ones(6, dtype=torch.float64))
    assert [s.shape for s in out.slot_states] == [(4, 16), (2, 16), (2, 16), (4, 16), (4, 16), (2, 16)]
    assert out.packed_tokens.shape == (18, 10)


@pytest.mark.parametrize("policy", POLICIES)
def test_batch_equals_each_sample_alone(policy):
    fusion = tiny_fusion(mask=policy)
    vision, questions = batch()
    together = fusion(vision, questions)
    for b in range(3):
        alone = fusion(vision[b][None], [questions[b]])
        for got, want in zip(alone.tokens[0], together.tokens[b]):
            torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("policy", POLICIES)
def test_incremental_ask_equals_packed_forward(policy):
    fusion = tiny_fusion(mask=policy)
    vision, questions = batch()
    packed = fusion(vision, questions)
    state = fusion.start(vision)
    asked = [[] for _ in range(3)]
    for round_ in range(3):
        ids = [qs[round_] if round_ < len(qs) else None for qs in questions]
        tokens, state = fusion.ask(state, ids)
        for b, t in enumerate(tokens):
            assert (t is None) == (ids[b] is None)
            if t is not None:
                asked[b].append(t)
    for b in range(3):
        assert len(asked[b]) == len(packed.tokens[b])
        for got, want in zip(asked[b], packed.tokens[b]):
            torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)


def test_ask_does_not_mutate_state_so_followups_can_branch():
    fusion = tiny_fusion(mask="causal")
    vision, questions = batch()
    state = fusion.start(vision[:1])
    _, after_first = fusion.ask(state, [questions[0][0]])
    a, _ = fusion.ask(after_first, [questions[0][1]])
    b, _ = fusion.ask(after_first, [questions[0][1]])
    torch.testing.assert_close(a[0], b[0], rtol=0, atol=0)
    assert after_first.cursor.groups == (1,)


def test_gradients_flow_through_the_incremental_state():
    fusion = tiny_fusion(mask="prefix")
    vision, questions = batch()
    vision = [v.clone().requires_grad_() for v in vision[:1]]
    state = fusion.start(vision)
    _, state = fusion.ask(state, [questions[0][0]])
    tokens, _ = fusion.ask(state, [questions[0][1]])
    tokens[0].sum().backward()
    assert vision[0].grad is not None and vision[0].grad.abs().sum() > 0


def test_elastic_budget_counts_and_nesting():
    fusion = tiny_fusion(mask="causal")
    vision, questions = batch()
    captured = {}

    def grab_input(module, args):
        captured["h"] = args[0].detach().clone()

    handle = fusion.layers[0].register_forward_pre_hook(grab_input)
    outputs, slot_inputs = {}, {}
    for m, n in [(1, 1), (4, 2), (8, 3)]:
        out = fusion(vision, questions, m=m, n=n)
        outputs[m] = out
        slot_inputs[m] = captured["h"][out.layout.query_index]
        total = sum(t.shape[0] for sample in out.tokens for t in sample)
        assert total == sum(m + (len(qs) - 1) * n for qs in questions)
    handle.remove()
    # the last slot of every group is <eos>, at every budget
    for m, out in outputs.items():
        eos_rows = slot_inputs[m][out.layout.is_eos_slot()]
        assert torch.equal(eos_rows, fusion.eos.detach().expand_as(eos_rows))
    # the first k - 1 slots are codebook rows 0..k-2: a smaller budget is a prefix of a larger one
    first_group_8 = slot_inputs[8][:8]
    first_group_4 = slot_inputs[4][:4]
    assert torch.equal(first_group_4[:3], first_group_8[:3])
    assert torch.equal(first_group_8[:7], fusion.codebook.weight.detach()[:7])
    # under the causal mask the shared prefix of slots produces identical fused tokens
    torch.testing.assert_close(outputs[4].tokens[0][0][:3], outputs[8].tokens[0][0][:3], rtol=1e-12, atol=1e-12)
    assert outputs[1].tokens[0][0].shape == (1, 10)


@pytest.mark.parametrize("policy", POLICIES)
def test_sdpa_matches_eager_for_the_whole_module(policy):
    fusion = tiny_fusion(dtype=torch.float32, mask=policy)
    vision, questions = batch(dtype=torch.float32)
    results = {}
    for impl in ("eager", "sdpa"):
        fusion.attn_impl = impl
        fusion.zero_grad()
        out = fusion(vision, questions)
        (out.packed_tokens.square().sum() + out.eos_embed.sum()).backward()
        grads = {name: p.grad.clone() for name, p in fusion.named_parameters() if p.grad is not None}
        results[impl] = (out.packed_tokens.detach(), grads)
    torch.testing.assert_close(results["sdpa"][0], results["eager"][0], rtol=1e-5, atol=1e-5)
    assert results["sdpa"][1].keys() == results["eager"][1].keys()
    assert "layers.0.attn.to_q.weight" in results["eager"][1]
    for name, want in results["eager"][1].items():
        torch.testing.assert_close(results["sdpa"][1][name], want, rtol=1e-4, atol=1e-5)


def test_gradient_checkpointing_gives_the_same_gradients():
    grads = {}
    for flag in (False, True):
        fusion = tiny_fusion(gradient_checkpointing=flag)
        fusion.train()
        vision, questions = batch()
        out = fusion(vision, questions)
        out.packed_tokens.square().sum().backward()
        grads[flag] = {name: p.grad for name, p in fusion.named_parameters() if p.grad is not None}
    assert grads[True].keys() == grads[False].keys()
    for name in grads[False]:
        torch.testing.assert_close(grads[True][name], grads[False][name], rtol=1e-12, atol=1e-12)


def test_no_question_ablation_ignores_question_content():
    fusion = tiny_fusion(use_question=False)
    vision, questions = batch()
    a = fusion(vision, questions)
    other = [[torch.tensor([0]) for _ in qs] for qs in questions]
    b = fusion(vision, other)
    torch.testing.assert_close(a.packed_tokens, b.packed_tokens, rtol=0, atol=0)
    one_group = fusion(vision, None)
    assert [len(s) for s in one_group.tokens] == [1, 1, 1]
    assert a.layout.text_index.numel() == 0


def test_save_load_round_trip_is_bit_exact(tmp_path):
    fusion = tiny_fusion(dtype=torch.float32, mask="grouped")
    fusion.save_pretrained(tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    assert config["format_version"] == 2 and config["mask"] == "grouped"
    assert "attn_impl" not in config and "gradient_checkpointing" not in config  # runtime, not identity
    loaded = QuestionFusion.from_pretrained(tmp_path, attn_impl="eager")
    assert loaded.config == fusion.config
    for (name, p), (name2, p2) in zip(fusion.state_dict().items(), loaded.state_dict().items()):
        assert name == name2 and torch.equal(p, p2)
    vision, questions = batch(dtype=torch.float32)
    assert torch.equal(fusion(vision, questions).packed_tokens, loaded(vision, questions).packed_tokens)


def test_load_rejects_other_format_versions_and_missing_weights(tmp_path):
    fusion = tiny_fusion(dtype=torch.float32)
    fusion.save_pretrained(tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    config["format_version"] = 99
    (tmp_path / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match="format_version"):
        QuestionFusion.from_pretrained(tmp_path)
    config["format_version"] = 1
    (tmp_path / "config.json").write_text(json.dumps(config))
    (tmp_path / "model.safetensors").unlink()
    with pytest.raises(FileNotFoundError, match="model.safetensors"):
        QuestionFusion.from_pretrained(tmp_path)


def test_runtime_settings_are_chosen_at_load_not_saved(tmp_path):
    fusion = tiny_fusion(dtype=torch.float32, attn_impl="sdpa", gradient_checkpointing=True)
    fusion.save_pretrained(tmp_path)
    default = QuestionFusion.from_pretrained(tmp_path)
    assert (default.attn_impl, default.gradient_checkpointing) == ("auto", False)
    chosen = QuestionFusion.from_pretrained(tmp_path, attn_impl="eager", gradient_checkpointing=True)
    assert (chosen.attn_impl, chosen.gradient_checkpointing) == ("eager", True)
    assert chosen.config.architecture_dict() == fusion.config.architecture_dict()
    with pytest.raises(ValueError, match="attn_impl"):
        chosen.attn_impl = "fast"


def test_loading_an_empty_directory_names_the_missing_config(tmp_path):
    with pytest.raises(FileNotFoundError, match="config.json"):
        QuestionFusion.from_pretrained(tmp_path)


def test_host_fields_left_none_must_be_set_to_build_a_module():
    config = tiny_config(vision_dim=None)
    assert config.unresolved() == ["vision_dim"]
    with pytest.raises(ValueError, match="vision_dim is None"):
        QuestionFusion(config)


def test_no_linear_is_named_like_a_llama_projection():
    llama = {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"}
    fusion = tiny_fusion()
    names = [name.rsplit(".", 1)[-1] for name, module in fusion.named_modules() if isinstance(module, torch.nn.Linear)]
    assert names and not llama & set(names)


@pytest.mark.parametrize(
    "make_args, error, match",
    [
        (lambda v, q: (torch.randn(2, 5, 11, dtype=torch.float64), q[:2]), ValueError, "vision_dim=12"),
        (lambda v, q: (torch.randn(5, 12, dtype=torch.float64), q), ValueError, r"\(B, V, vision_dim\)"),
        (lambda v, q: ("pixels", q), TypeError, "vision_tokens"),
        (lambda v, q: (v, q[:2]), ValueError, "one list per sample"),
        (lambda v, q: (v, [q[0], [], q[2]]), ValueError, r"questions\[1\]: expected at least one question"),
        (lambda v, q: (v, [q[0], [torch.tensor([], dtype=torch.long)], q[2]]), ValueError, "empty question"),
        (lambda v, q: (v, [q[0], [torch.tensor([1.0, 2.0])], q[2]]), TypeError, "integer token ids"),
        (lambda v, q: (v, [q[0], [torch.tensor([1, 30])], q[2]]), ValueError, r"ids in \[0, text_vocab_size=30\)"),
        (lambda v, q: (v, [q[0], [torch.tensor([-1])], q[2]]), ValueError, r"questions\[1\]\[0\]"),
        (lambda v, q: (v, [q[0], [torch.tensor([[1, 2]])], q[2]]), ValueError, "1-D"),
        (lambda v, q: (v, [q[0], [[1, 2]], q[2]]), TypeError, "1-D integer tensor"),
        (lambda v, q: ([v[0].half(), v[1], v[2]], q), TypeError, "expected dtype torch.float64"),
        (lambda v, q: ([v[0].to("meta"), v[1], v[2]], q), ValueError, "expected device"),
    ],
)
def test_bad_forward_input_raises_clearly(make_args, error, match):
    fusion = tiny_fusion()
    vision, questions = batch()
    with pytest.raises(error, match=match):
        fusion(*make_args(vision, questions))


@pytest.mark.parametrize("m, n, match", [(0, 1, "m, n: expected 1 <= n <= m"), (11, 2, "codebook_size=10"),
                                         (4, 5, "m, n: expected 1 <= n <= m"), (4, 0, "expected 1 <= n <= m")])
def test_bad_budgets_raise(m, n, match):
    fusion = tiny_fusion()
    vision, questions = batch()
    with pytest.raises(ValueError, match=match):
        fusion(vision, questions, m=m, n=n)
    with pytest.raises(ValueError, match=match):
        fusion.start(vision, m=m, n=n)


def test_ask_rejects_foreign_state_and_bad_ids():
    fusion, other = tiny_fusion(), tiny_fusion(seed=3)
    vision, questions = batch()
    state = other.start(vision)
    with pytest.raises(ValueError, match="state: expected a FusionState returned by this module"):
        fusion.ask(state, [q[0] for q in questions])
    state = fusion.start(vision)
    with pytest.raises(ValueError, match="question_ids: expected a list of 3"):
        fusion.ask(state, [questions[0][0]])
    with pytest.raises(ValueError, match="only None"):
        fusion.ask(state, [None, None, None])
    with pytest.raises(ValueError, match=r"question_ids\[1\]"):
        fusion.ask(state, [questions[0][0], torch.tensor([99]), None])


@pytest.mark.parametrize(
    "overrides, match",
    [
        (dict(num_heads=3), "num_heads: expected a divisor"),
        (dict(m=11), "m, n: expected m <= codebook_size"),
        (dict(n=5), "m, n: expected 1 <= n <= m"),
        (dict(mask="full"), "mask: expected one of"),
        (dict(attn_impl="cuda"), "attn_impl: expected one of"),
        (dict(hidden_size=0), "hidden_size: expected a positive integer"),
        (dict(format_version=3), "format_version"),
    ],
)
def test_config_validation(overrides, match):
    with pytest.raises(ValueError, match=match):
        tiny_config(**overrides)


@pytest.mark.parametrize(
    "overrides, match",
    [
        (dict(use_question="no"), "use_question: expected a bool"),
        (dict(output_mlp=1), "output_mlp: expected a bool"),
        (dict(rms_norm_eps="1e-6"), "rms_norm_eps: expected a finite number"),
        (dict(initializer_range=float("nan")), "initializer_range: expected a finite number"),
        (dict(rope_theta=float("inf")), "rope_theta: expected a finite number"),
        (dict(m=4.0), "m: expected an integer"),
        (dict(hidden_size=True), "hidden_size: expected an integer"),
        (dict(vision_dim="12"), r"vision_dim: expected an integer or None \(from the host\)"),
        (dict(mask=1), "mask: expected a str"),
    ],
)
def test_config_fields_are_type_checked_by_kind(overrides, match):
    with pytest.raises(TypeError, match=match):
        tiny_config(**overrides)


def test_config_is_immutable_and_changes_through_replace():
    config = tiny_config()
    with pytest.raises(AttributeError):
        config.m = 2
    changed = config.replace(m=2, n=1)
    assert (changed.m, changed.n, config.m, config.n) == (2, 1, 4, 2)
    with pytest.raises(ValueError, match="m, n: expected 1 <= n <= m"):
        config.replace(m=1)
    with pytest.raises(ValueError, match="unknown FusionConfig fields"):
        config.replace(hiden_size=3)


def test_config_json_round_trip(tmp_path):
    config = tiny_config(mask="prefix", output_mlp=True)
    config.save_pretrained(tmp_path)
    assert FusionConfig.from_pretrained(tmp_path) == config.replace(attn_impl="auto")  # runtime field not saved
    assert FusionConfig.from_dict(config.to_dict()) == config
    with pytest.raises(ValueError, match="unknown FusionConfig fields"):
        FusionConfig.from_dict({**config.to_dict(), "hiden_size": 3})
    with pytest.raises(FileNotFoundError, match="config.json"):
        FusionConfig.from_pretrained(tmp_path / "nowhere")


def test_configure_changes_only_settings_that_change_no_weight(tmp_path):
    fusion = tiny_fusion(dtype=torch.float32)
    fusion.configure(m=2, n=1, use_question=False)
    assert (fusion.config.m, fusion.config.n, fusion.config.use_question) == (2, 1, False)
    fusion.save_pretrained(tmp_path)
    saved = json.loads((tmp_path / "config.json").read_text())
    assert (saved["m"], saved["n"], saved["use_question"]) == (2, 1, False)
    with pytest.raises(ValueError, match=r"\['hidden_size'\] define the weights"):
        fusion.configure(hidden_size=32)


# ---------------------------------------------------------------------- strict loading and stale states


def saved(tmp_path, **overrides):
    fusion = tiny_fusion(dtype=torch.float32, **overrides)
    fusion.save_pretrained(tmp_path)
    return fusion


@pytest.mark.parametrize("key", ["rope_theta", "num_heads", "rms_norm_eps", "mask", "hidden_size"])
def test_a_config_json_missing_a_key_is_refused_naming_it(tmp_path, key):
    saved(tmp_path, rope_theta=500.0)
    path = tmp_path / "config.json"
    data = json.loads(path.read_text())
    del data[key]
    path.write_text(json.dumps(data))
    with pytest.raises(ValueError, match=rf"config.json: missing FusionConfig fields \['{key}'\]"):
        QuestionFusion.from_pretrained(tmp_path)


def test_a_format_1_config_with_the_old_loss_weights_still_loads(tmp_path):
    fusion = saved(tmp_path)
    path = tmp_path / "config.json"
    data = json.loads(path.read_text())
    path.write_text(json.dumps(dict(data, format_version=1, identity_weight=0.5, identity_scope="batch")))
    loaded = QuestionFusion.from_pretrained(tmp_path, attn_impl="eager")
    assert loaded.config == fusion.config
    vision, questions = batch(dtype=torch.float32)
    assert torch.equal(loaded(vision, questions).packed_tokens, fusion(vision, questions).packed_tokens)


def test_weights_of_mixed_dtypes_are_refused_not_cast(tmp_path):
    from safetensors.torch import load_file, save_file

    saved(tmp_path)
    path = tmp_path / "model.safetensors"
    tensors = load_file(path)
    tensors["eos"] = tensors["eos"].double()
    save_file(tensors, path)
    with pytest.raises(ValueError, match=r"model.safetensors: weights of several dtypes .*\['eos'\]"):
        QuestionFusion.from_pretrained(tmp_path)


def test_a_uniform_bf16_file_loads_in_bf16(tmp_path):
    fusion = tiny_fusion(dtype=torch.bfloat16)
    fusion.save_pretrained(tmp_path)
    loaded = QuestionFusion.from_pretrained(tmp_path)
    assert loaded.dtype == torch.bfloat16
    assert all(torch.equal(a, b) for a, b in zip(loaded.state_dict().values(), fusion.state_dict().values()))


def test_a_truncated_weights_file_is_named(tmp_path):
    saved(tmp_path)
    path = tmp_path / "model.safetensors"
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    with pytest.raises(ValueError, match=r"model.safetensors: not a readable safetensors file .*truncated"):
        QuestionFusion.from_pretrained(tmp_path)


def test_ask_refuses_a_state_computed_before_the_module_changed():
    fusion = tiny_fusion()
    vision, questions = batch()
    state = fusion.start(vision)
    first = [sample[0] for sample in questions]
    fusion.ask(state, first)  # fine while nothing changed
    with torch.no_grad():
        fusion.eos.add_(1.0)  # an optimizer step or a load changes the weights in place
    with pytest.raises(ValueError, match="state: computed before this module's weights"):
        fusion.ask(state, first)
    state = fusion.start(vision)
    fusion.configure(use_question=False)
    with pytest.raises(ValueError, match="state: computed before"):
        fusion.ask(state, first)
    fusion.configure(use_question=True)
    state = fusion.start(vision)
    fusion.float()
    with pytest.raises(ValueError, match="state: computed before"):
        fusion.ask(state, [q.clone() for q in first])


def test_no_question_mode_refuses_an_empty_question_list():
    fusion = tiny_fusion(use_question=False)
    vision, _ = batch()
    with pytest.raises(ValueError, match=r"questions\[1\]: expected at least one question"):
        fusion(vision, [[None], [], [None]])
    assert [len(s) for s in fusion(vision, [[None], [None, None], [None]]).tokens] == [1, 2, 1]
