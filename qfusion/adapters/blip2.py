"""The BLIP family (BLIP-2, InstructBLIP with a decoder-only LLM): its record and its hooks.

    pixel_values ─ vision_model ─> (257, d_vision) per image ─ QuestionFusion(questions) ─>
    m + (G−1)·n tokens of the Q-Former's width ─ language_projection ─> the LLM's placeholders

* ``mode="replace"``: the fused tokens stand instead of the Q-Former's query outputs (the Q-Former
  does not run).
* ``mode="augment"``: the host's own query outputs (for InstructBLIP conditioned on its
  ``qformer_input_ids``) come first, then the fused tokens: the first question's run holds
  ``num_query_tokens + m`` placeholders.

Where it differs from the shared seam: its fused tokens have the Q-Former's width and go through
the host's ``language_projection`` (the ``outputs`` hook builds the host's own output type), and
its ``generate`` recomputes vision → Q-Former → projection inline, so it is replaced by the same
steps with the fused tokens (the ``generate`` hook). These hosts do not check the placeholder
count themselves; the adapter's check (:mod:`qfusion.inputs`) does.
"""

from __future__ import annotations

import torch

from qfusion.adapters.family import HostFamily, VisionSource, register_family


def _image_outputs(**fields):
    """The host's image-feature output type (imported on use: transformers' modeling code is heavy)."""
    from transformers.models.blip_2.modeling_blip_2 import BaseModelOutputWithVisionQformerOutputs

    return BaseModelOutputWithVisionQformerOutputs(**fields)


def check(model, settings) -> None:
    """Decoder-only LLMs only."""
    config = model.config
    if not config.use_decoder_only_language_model:
        raise NotImplementedError(
            f"model: {settings.model_type} with an encoder-decoder language model ({config.text_config.model_type}, "
            "e.g. flan-T5) is not supported yet; use a decoder-only one (OPT, Llama, Vicuna)"
        )


def vision_features(adapter, kind: str, args: dict):
    """(per image (V, d_vision) vision-model features, the host's image outputs).

    In ``augment`` mode the host's own ``get_image_features`` runs (vision model, Q-Former,
    projection) and its vision features feed the fusion; otherwise only the vision model runs.
    """
    model, pixel_values = adapter.model, args["pixel_values"]
    interpolate = args.get("interpolate_pos_encoding", False)
    if adapter.settings.mode == "augment":
        kwargs = {}
        if adapter.settings.model_type == "instructblip":
            if args.get("qformer_input_ids") is None:
                raise ValueError("qformer_input_ids: required by InstructBLIP in mode='augment' (its Q-Former's text)")
            kwargs = {"qformer_input_ids": args["qformer_input_ids"],
                      "qformer_attention_mask": args.get("qformer_attention_mask")}
        image = model.get_image_features(pixel_values, interpolate_pos_encoding=interpolate, return_dict=True, **kwargs)
        return list(image.last_hidden_state), image
    vision = model.vision_model(pixel_values=pixel_values, interpolate_pos_encoding=interpolate, return_dict=True)
    return list(vision.last_hidden_state), _image_outputs(
        last_hidden_state=vision.last_hidden_state, pooler_output=vision.pooler_output, vision_outputs=vision,
    )


def outputs(adapter, blocks, tokens, host) -> dict:
    """``{"image": outputs}`` of the host's type, whose ``pooler_output`` (total, d_llm) holds every
    sample's projected tokens in placeholder order (augment: after the host's own query outputs)."""
    image = host["image"]
    projection = adapter.model.language_projection
    counts = [sum(t.shape[0] for t in groups) for groups in tokens]
    flat = torch.cat([t for groups in tokens for t in groups])
    fused = projection(flat.to(device=projection.weight.device, dtype=projection.weight.dtype))
    per_sample = list(fused.split(counts))
    if adapter.settings.mode == "augment":
        per_sample = [torch.cat([query.to(f), f]) for query, f in zip(image.pooler_output, per_sample)]
    return {"image": _image_outputs(
        last_hidden_state=image.last_hidden_state, pooler_output=torch.cat(per_sample),
        vision_outputs=image.vision_outputs, qformer_outputs=image.qformer_outputs,
    )}


def generate(adapter, args: dict):
    """The host's generate after its inline feature computation, with the fused tokens instead."""
    model = adapter.model
    input_ids, attention_mask = args.get("input_ids"), args.get("attention_mask")
    with torch.no_grad():
        if hasattr(model, "hf_device_map"):
            model._preprocess_accelerate()
        inputs_embeds = model.get_input_embeddings()(input_ids)
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        features = args["mm_encoder_outputs"]["image"].pooler_output.to(inputs_embeds.device, inputs_embeds.dtype)
        placeholders = (input_ids == adapter.image_token_id).unsqueeze(-1).to(inputs_embeds.device)
        inputs_embeds = inputs_embeds.masked_scatter(placeholders, features)
    own = {"mm_encoder_outputs", "pixel_values", "input_ids", "attention_mask", "inputs_embeds", "interpolate_pos_encoding",
           "qformer_input_ids", "qformer_attention_mask"}
    generate_kwargs = {k: v for k, v in args.items() if k not in own}
    return model.language_model.generate(inputs_embeds=inputs_embeds, attention_mask=attention_mask,
                                         input_ids=input_ids, **generate_kwargs)


def processor_inputs(host_processor, kinds, questions, data: dict) -> dict:
    """InstructBLIP's Q-Former reads text too: each sample's first question."""
    qformer_tokenizer = getattr(host_processor, "qformer_tokenizer", None)
    if qformer_tokenizer is None:
        return {}
    qformer = qformer_tokenizer([sample[0] for sample in questions], padding=True, return_tensors="pt")
    return {"qformer_input_ids": qformer["input_ids"], "qformer_attention_mask": qformer["attention_mask"]}


BLIP2 = register_family(HostFamily(
    name="blip2",
    model_types=("blip-2", "instructblip"),
    sources=(VisionSource("tower", lambda config, settings=None: config.vision_config.hidden_size, vision_features,
                          "the vision model's last hidden state"),),
    vision_tower=("vision_model",),
    projector=("qformer", "query_tokens", "language_projection"),
    llm=("language_model",),
    llm_name="language_model",
    multi_image=False,
    modes=("replace", "augment"),
    check=check,
    output_dim=lambda config, settings=None: config.qformer_config.hidden_size,
    prefix=lambda config, settings: config.num_query_tokens if settings.mode == "augment" else 0,
    outputs=outputs,
    generate=generate,
    processor_inputs=processor_inputs,
    notes="decoder-only LLMs (OPT, Llama, Vicuna); flan-T5 (encoder-decoder) is refused",
))
"""BLIP-2 and InstructBLIP with a decoder-only LLM (one image per prompt)."""
