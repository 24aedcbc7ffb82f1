"""Run request rounds through one offline vLLM engine and write each request's outputs as JSON.

    python engine_cases.py CASES.json OUT.json

CASES.json: {"model": dir, "hf_overrides": {...}, "steps": int, "suppress": [token ids never to generate],
"rounds": [[request, ...], ...]} with
requests as {"name", "prompt", "images": [paths], "mm_processor_kwargs"}. Each round is one
``LLM.generate`` call (one continuous batch); rounds run one after another on the same engine, so
later rounds meet the caches earlier ones filled. Per request OUT.json holds its greedy tokens,
prompt ids and prefix-cached tokens; under "_rounds", per round, the multimodal cache's queries and
hits (items) during it. vLLM's engine spawns worker processes, hence a script of its own.
"""

from __future__ import annotations

import json
import sys

KV_CACHE_BYTES = 1 << 28  # a fixed KV cache: on CPU the default is a fraction of the NUMA node's memory
BLOCK_SIZE = 32  # small blocks (the CPU attention needs multiples of 32), so that the tests' short prompts fill some


def counters(llm) -> dict[str, int]:
    """The multimodal cache's counters so far."""
    names = ("vllm:mm_cache_queries", "vllm:mm_cache_hits")
    return {name: sum(m.value for m in llm.get_metrics() if m.name == name) for name in names}


def main(cases_path: str, out_path: str) -> None:
    from PIL import Image
    from vllm import LLM, SamplingParams

    with open(cases_path) as f:
        cases = json.load(f)
    llm = LLM(model=cases["model"], hf_overrides=cases["hf_overrides"], dtype="float32", max_model_len=512,
              enforce_eager=True, seed=0, limit_mm_per_prompt={"image": 2}, kv_cache_memory_bytes=KV_CACHE_BYTES,
              block_size=BLOCK_SIZE, enable_prefix_caching=True, disable_log_stats=False)
    vocab = llm.llm_engine.model_config.get_vocab_size()
    allowed = [t for t in range(vocab) if t not in set(cases["suppress"])]
    params = SamplingParams(temperature=0.0, max_tokens=cases["steps"], ignore_eos=True, allowed_token_ids=allowed)
    results = {"_rounds": []}
    for round_ in cases["rounds"]:
        before = counters(llm)
        prompts = []
        for request in round_:
            prompt = {"prompt": request["prompt"]}
            if request["images"]:
                prompt["multi_modal_data"] = {"image": [Image.open(p).convert("RGB") for p in request["images"]]}
            if request.get("mm_processor_kwargs"):
                prompt["mm_processor_kwargs"] = request["mm_processor_kwargs"]
            prompts.append(prompt)
        for request, output in zip(round_, llm.generate(prompts, params, use_tqdm=False)):
            results[request["name"]] = {"tokens": list(output.outputs[0].token_ids),
                                        "prompt": list(output.prompt_token_ids),
                                        "cached_tokens": output.num_cached_tokens}
        after = counters(llm)
        results["_rounds"].append({name: after[name] - before[name] for name in after})
    with open(out_path, "w") as f:
        json.dump(results, f)


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
