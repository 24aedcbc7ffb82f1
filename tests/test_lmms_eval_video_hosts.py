"""integrations/lmms_eval with hosts that take several images and videos (Qwen2.5-VL, LLaVA-OneVision);
skipped without lmms_eval."""

import sys
from pathlib import Path

import pytest
import torch
from conftest_hosts import VideoHostProcessor, fusion_config, hosts, images, videos  # noqa: F401
from PIL import Image

pytest.importorskip("lmms_eval.api.model", reason="lmms-eval is not installed")
pytest.importorskip("lmms_eval.models", reason="lmms-eval's model registry cannot be imported")

import qfusion  # noqa: E402
from qfusion import QFusionProcessor  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "integrations" / "lmms_eval"))

import qfusion_lmms_eval  # noqa: E402
from lmms_eval.api.instance import Instance  # noqa: E402

STAND_INS = {"qwen2_5_vl": VideoHostProcessor.qwen, "llava_onevision": VideoHostProcessor.onevision}


@pytest.mark.parametrize("kind", sorted(STAND_INS))
def test_requests_with_images_and_a_video_generate_like_the_attached_host(hosts, kind, tmp_path, monkeypatch):
    import transformers
    from lmms_eval.models import get_model

    # the hub processors of these hosts need torchvision for their video processors: use the stand-ins
    monkeypatch.setattr(transformers.AutoProcessor, "from_pretrained", staticmethod(STAND_INS[kind]))
    model = hosts.model(kind)
    torch.manual_seed(0)
    adapter = qfusion.attach(model, fusion_config())
    processor = QFusionProcessor(hosts.processor(kind), model)
    adapter.save_pretrained(tmp_path)
    processor.save_pretrained(tmp_path)
    qfusion_lmms_eval.register()
    lm = get_model("qfusion").create_from_arg_string(
        f"pretrained={hosts.directory(kind)},plugin={tmp_path},device=cpu,batch_size=2", {"max_new_tokens": 3})
    docs = [{"visuals": [Image.fromarray(images(1, seed=1)[0]), videos(1, frames=4, seed=2)[0]],
             "question": "what is this ?"},
            {"visuals": [videos(1, frames=4, seed=3)[0]], "question": "how many"}]  # a batch of videos: one frame count
    lm.task_dict = {"toy": {"test": docs}}
    requests = [Instance(request_type="generate_until", idx=0, metadata={"task": "toy", "doc_id": i, "repeats": 1},
                         arguments=(f"<image>{d['question']}", {"max_new_tokens": 3}, lambda doc: doc["visuals"], i,
                                    "toy", "test"))
                for i, d in enumerate(docs)]
    answers = lm.generate_until(requests)
    for doc, answer in zip(docs, answers):
        pictures = [v for v in doc["visuals"] if isinstance(v, Image.Image)]
        clips = [v for v in doc["visuals"] if not isinstance(v, Image.Image)]
        turn = {"role": "user", "content": [{"type": "image"}] * len(pictures) + [{"type": "video"}] * len(clips)
                + [{"type": "text", "text": doc["question"]}]}
        inputs = processor(images=[pictures] if pictures else None, videos=[clips], conversations=[[turn]])
        output = model.generate(**inputs, max_new_tokens=3, do_sample=False)
        expected = processor.tokenizer.decode(output[0, inputs["input_ids"].shape[1]:], skip_special_tokens=True)
        assert answer == expected.strip()
