"""integrations/lmms_eval: the qfusion model registered in lmms-eval, on a tiny LLaVA (skipped without lmms_eval)."""

import sys
from pathlib import Path

import pytest
import torch
from conftest_hosts import fusion_config, hosts, images  # noqa: F401
from PIL import Image

pytest.importorskip("lmms_eval.api.model", reason="lmms-eval is not installed")
pytest.importorskip("lmms_eval.models", reason="lmms-eval's model registry cannot be imported")

import qfusion  # noqa: E402
from qfusion import QFusionProcessor  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "integrations" / "lmms_eval"))

import qfusion_lmms_eval  # noqa: E402
from lmms_eval.api.instance import Instance  # noqa: E402


@pytest.fixture(scope="module")
def evaluated(hosts, tmp_path_factory):
    """(lmms-eval model, the reference attached host and processor, the toy task's docs)."""
    from lmms_eval.models import get_model

    model = hosts.model("llava")
    torch.manual_seed(0)
    adapter = qfusion.attach(model, fusion_config())
    processor = QFusionProcessor(hosts.processor("llava"), model)
    plugin = tmp_path_factory.mktemp("plugin")
    adapter.save_pretrained(plugin)
    processor.save_pretrained(plugin)

    qfusion_lmms_eval.register()
    cls = get_model("qfusion")
    lm = cls.create_from_arg_string(f"pretrained={hosts.directory('llava')},plugin={plugin},device=cpu,batch_size=2",
                                    {"max_new_tokens": 4})
    docs = [{"image": Image.fromarray(image), "question": question}
            for image, question in zip(images(3, seed=4), ["what is this ?", "how many", "what color is it ?"])]
    lm.task_dict = {"toy": {"test": docs}}
    return lm, model, processor, docs, f"pretrained={hosts.directory('llava')},plugin={plugin},device=cpu"


def request(kind, arguments, doc_id):
    return Instance(request_type=kind, arguments=arguments, idx=0,
                    metadata={"task": "toy", "doc_id": doc_id, "repeats": 1})


def doc_to_visual(doc):
    return [doc["image"]]


def test_registered_model_generates_like_the_attached_host(evaluated):
    lm, model, processor, docs, _ = evaluated
    assert lm.adapter.settings == qfusion.adapters.get_adapter(model).settings
    settings = {"max_new_tokens": 4, "until": ["\n\n"]}
    requests = [request("generate_until",
                        (f"<image>\n{d['question']}", dict(settings), doc_to_visual, i, "toy", "test"), i)
                for i, d in enumerate(docs)]
    answers = lm.generate_until(requests)
    assert len(answers) == 3 and all(isinstance(a, str) for a in answers)
    for doc, answer in zip(docs, answers):
        inputs = processor(images=[doc["image"]], conversations=[[{"role": "user", "content": doc["question"]}]])
        output = model.generate(**inputs, max_new_tokens=4, do_sample=False)
        expected = processor.tokenizer.decode(output[0, inputs["input_ids"].shape[1]:], skip_special_tokens=True)
        assert answer == expected.strip()


def test_loglikelihood_scores_the_continuation(evaluated):
    lm, model, processor, docs, _ = evaluated
    requests = [request("loglikelihood", (d["question"], "a cat .", doc_to_visual, i, "toy", "test"), i)
                for i, d in enumerate(docs[:2])]
    scores = lm.loglikelihood(requests)
    assert len(scores) == 2
    for (logprob, greedy), doc in zip(scores, docs):
        assert logprob < 0 and isinstance(greedy, bool)
        batch = processor(images=[doc["image"]], return_labels=True, conversations=[[
            {"role": "user", "content": doc["question"]}, {"role": "assistant", "content": "a cat ."}]])
        labels = batch.pop("labels")
        labels[labels == processor.tokenizer.eos_token_id] = -100
        with torch.no_grad():
            loss = model(**batch, labels=labels).loss
        assert logprob == pytest.approx(-loss.item() * int((labels != -100).sum()), rel=1e-4)


def test_multi_round_reuses_the_cached_vision_prefix(evaluated):
    lm, _, _, docs, _ = evaluated
    calls = []
    handle = lm.model.model.vision_tower.register_forward_hook(lambda *args: calls.append(1))

    def doc_to_text(doc, previous_output, round_idx, previous_round_info):
        return None, "what color is it ?", round_idx >= 2, previous_output, previous_round_info

    requests = [request("generate_until_multi_round",
                        (docs[0]["question"], {"max_new_tokens": 3}, doc_to_visual, doc_to_text, 0, "toy", "test"), 0)]
    (rounds,) = lm.generate_until_multi_round(requests)
    handle.remove()
    assert len(rounds) == 2 and len(calls) == 1


def test_budget_model_arguments_set_the_processor_budget(evaluated):
    from lmms_eval.models import get_model

    lm, *_, arguments = evaluated
    assert lm.processor.budget == (4, 2)  # the plugin's own
    smaller = get_model("qfusion").create_from_arg_string(f"{arguments},m=2,n=1")
    assert smaller.processor.budget == (2, 1)
    with pytest.raises(ValueError, match="m: expected a whole number of fused tokens, got 'two'"):
        get_model("qfusion").create_from_arg_string(f"{arguments},m=two")
