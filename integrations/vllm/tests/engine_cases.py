"""Run request rounds through one offline vLLM engine and write each request's greedy tokens as JSON.

    python engine_cases.py CASES.json OUT.json

CASES.json: {"model": dir, "hf_overrides": {...}, "steps": int, "rounds": [[request, ...], ...]} with
requests as ``tiny.Request`` dicts. Each round is one ``LLM.generate`` call (one continuous batch);
rounds run one after another on the same engine, so later rounds meet the caches earlier ones
filled. vLLM's engine spawns worker processes, hence a script of its own.
"""

from __future__ import annotations

import json
import sys

KV_CACHE_BYTES = 1 << 28  # a fixed KV cache: on CPU the default is a fraction of the NUMA node's memory


def main(cases_path: str, out_path: str) -> None:
    from PIL import Image
    from vllm import LLM, SamplingParams

    with open(cases_path) as f:
        cases = json.load(f)
    llm = LLM(model=cases["model"], hf_overrides=cases["hf_overrides"], dtype="float32", max_model_len=512,
              enforce_eager=True, seed=0, limit_mm_per_prompt={"image": 2}, kv_cache_memory_bytes=KV_CACHE_BYTES,
              **cases.get("engine", {}))
    params = SamplingParams(temperature=0.0, max_tokens=cases["steps"], ignore_eos=True)
    results = {}
    for round_ in cases["rounds"]:
        prompts = []
        for request in round_:
            prompt = {"prompt": request["prompt"],
                      "multi_modal_data": {"image": Image.open(request["image"]).convert("RGB")}}
            if request.get("mm_processor_kwargs"):
                prompt["mm_processor_kwargs"] = request["mm_processor_kwargs"]
            prompts.append(prompt)
        for request, output in zip(round_, llm.generate(prompts, params, use_tqdm=False)):
            results[request["name"]] = {"tokens": list(output.outputs[0].token_ids),
                                        "prompt_tokens": len(output.prompt_token_ids)}
    with open(out_path, "w") as f:
        json.dump(results, f)


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
