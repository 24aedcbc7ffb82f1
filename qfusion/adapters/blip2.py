"""BLIP-2 / InstructBLIP hosts: fused tokens go through ``language_projection`` into the LLM input.

Data flow of a patched call (transformers 5 ``Blip2ForConditionalGeneration`` /
``InstructBlipForConditionalGeneration`` with a decoder-only LLM):

    pixel_values ─ vision_model ─> (257, d_vision) per image ─ QuestionFusion(questions) ─>
    m + (G−1)·n tokens of the Q-Former's width ─ language_projection ─> the LLM's placeholders

* ``mode="replace"``: the fused tokens stand instead of the Q-Former's query outputs (the Q-Former
  does not run).
* ``mode="augment"``: the host's own query outputs (for InstructBLIP conditioned on its
  ``qformer_input_ids``) come first, then the fused tokens: the first question's run holds
  ``num_query_tokens + m`` placeholders.

``forward`` hands the tokens to the host's own forward through ``mm_encoder_outputs``. The host's
``generate`` recomputes vision → Q-Former → projection inline, so it is replaced by the same steps
with the fused tokens. These hosts do not check the placeholder count (too few placeholders would
silently misplace features): the adapter checks every sample's placeholder runs itself.
"""

from __future__ import annotations

import torch
from torch import Tensor

from qfusion.adapters.patching import QFusionArguments
from qfusion.adapters.seam import SeamAdapter


def _image_outputs(**fields):
    """The host's image-feature output type (imported on use: transformers' modeling code is heavy)."""
    from transformers.models.blip_2.modeling_blip_2 import BaseModelOutputWithVisionQformerOutputs

    return BaseModelOutputWithVisionQformerOutputs(**fields)


class Blip2Adapter(SeamAdapter):
    """Adapter for ``blip-2`` and ``instructblip`` hosts (see the module docstring)."""

    family = "blip2"
    model_types = ("blip-2", "instructblip")
    modes = ("replace", "augment")
    vision_sources = ("tower",)
    llm_name = "language_model"

    def check_host(self) -> None:
        config = self.model.config
        if not config.use_decoder_only_language_model:
            raise NotImplementedError(
                f"model: {self.settings.model_type} with an encoder-decoder language model "
                f"({config.text_config.model_type}, e.g. flan-T5) is not supported yet; use a decoder-only "
                "one (OPT, Llama, Vicuna)"
            )
        for part in ("vision_model", "qformer", "query_tokens", "language_projection", "language_model"):
            if not hasattr(self.model, part):
                raise TypeError(
                    f"model: expected a transformers 5 {self.settings.model_type} model with .{part}, "
                    f"got {type(self.model).__name__}"
                )
        if getattr(config, "image_token_id", None) is None:
            raise ValueError(
                "model.config.image_token_id: not set; qfusion needs the host's image placeholder token "
                "(set it to the tokenizer's '<image>' id)"
            )

    # ------------------------------------------------------------------ host facts

    @property
    def is_instruct(self) -> bool:
        return self.settings.model_type == "instructblip"

    @property
    def feature_dim(self) -> int:
        return self.model.config.vision_config.hidden_size

    @property
    def fusion_output_dim(self) -> int:
        return self.model.config.qformer_config.hidden_size

    @property
    def image_prefix(self) -> int:
        return self.model.config.num_query_tokens if self.settings.mode == "augment" else 0

    def module_groups(self) -> dict[str, list[str]]:
        return {"vision_tower": ["vision_model"], "projector": ["qformer", "query_tokens", "language_projection"],
                "llm": ["language_model"]}

    # ------------------------------------------------------------------ vision features

    def encode(self, pixel_values: Tensor, interpolate_pos_encoding: bool = False, qformer_input_ids=None,
               qformer_attention_mask=None):
        """(per image (V, d_vision) vision-model features, the host's image outputs).

        In ``augment`` mode the host's own ``get_image_features`` runs (vision model, Q-Former,
        projection) and its vision features feed the fusion; otherwise only the vision model runs.
        """
        if self.settings.mode == "augment":
            kwargs = {}
            if self.is_instruct:
                if qformer_input_ids is None:
                    raise ValueError(
                        "qformer_input_ids: required by InstructBLIP in mode='augment' (its Q-Former's text)"
                    )
                kwargs = {"qformer_input_ids": qformer_input_ids, "qformer_attention_mask": qformer_attention_mask}
            image = self.model.get_image_features(pixel_values, interpolate_pos_encoding=interpolate_pos_encoding,
                                                  return_dict=True, **kwargs)
            return list(image.last_hidden_state), image
        vision = self.model.vision_model(pixel_values=pixel_values, interpolate_pos_encoding=interpolate_pos_encoding,
                                         return_dict=True)
        return list(vision.last_hidden_state), _image_outputs(
            last_hidden_state=vision.last_hidden_state, pooler_output=vision.pooler_output, vision_outputs=vision,
        )

    def encoder_outputs(self, args: dict, qfusion: QFusionArguments):
        """``{"image": outputs}`` whose ``pooler_output`` (total, d_llm) holds every sample's tokens in
        placeholder order, for a call with images or questions (:meth:`is_visual_call`)."""
        pixel_values = args.get("pixel_values")
        budget = self.call_budget(qfusion)
        questions, image_counts = self.questions(qfusion, args.get("input_ids"), budget)
        augment = self.settings.mode == "augment"
        qformer_ids, qformer_mask = args.get("qformer_input_ids"), args.get("qformer_attention_mask")

        def encode():
            return self.encode(pixel_values, args.get("interpolate_pos_encoding", False), qformer_ids, qformer_mask)

        context = qformer_ids if augment and self.is_instruct else None
        tokens, image = self.fused_tokens(encode, pixel_values, questions, qfusion.cache, budget, context, image_counts,
                                          None if pixel_values is None else pixel_values.shape[0])
        projection = self.model.language_projection
        weight = projection.weight
        counts = [sum(t.shape[0] for t in groups) for groups in tokens]
        flat = torch.cat([t for groups in tokens for t in groups])
        fused = projection(flat.to(device=weight.device, dtype=weight.dtype))
        per_sample = list(fused.split(counts))
        if augment:
            per_sample = [torch.cat([host.to(f), f]) for host, f in zip(image.pooler_output, per_sample)]
        outputs = _image_outputs(
            last_hidden_state=image.last_hidden_state, pooler_output=torch.cat(per_sample),
            vision_outputs=image.vision_outputs, qformer_outputs=image.qformer_outputs,
        )
        return {"image": outputs}

    # ------------------------------------------------------------------ the patched calls

    def with_fused_tokens(self, args: dict, qfusion: QFusionArguments) -> dict:
        """The host's forward arguments with the fused tokens as ``mm_encoder_outputs`` instead of the pixels."""
        return dict(args, pixel_values=None, mm_encoder_outputs=self.encoder_outputs(args, qfusion))

    def patched_generate(self, args: dict, qfusion: QFusionArguments):
        """The host's generate after its inline feature computation, with the fused tokens instead."""
        if not self.is_visual_call(args, qfusion):
            return self.host_method("generate")(**args)
        input_ids, attention_mask = args.get("input_ids"), args.get("attention_mask")
        self.check_generation_inputs(input_ids, attention_mask)
        with torch.no_grad():
            fused = self.encoder_outputs(args, qfusion)
            model = self.model
            if hasattr(model, "hf_device_map"):
                model._preprocess_accelerate()
            inputs_embeds = model.get_input_embeddings()(input_ids)
            if attention_mask is None:
                attention_mask = torch.ones_like(input_ids)
            features = fused["image"].pooler_output.to(inputs_embeds.device, inputs_embeds.dtype)
            placeholders = (input_ids == self.image_token_id).unsqueeze(-1).to(inputs_embeds.device)
            inputs_embeds = inputs_embeds.masked_scatter(placeholders, features)
        own = {"pixel_values", "input_ids", "attention_mask", "inputs_embeds", "interpolate_pos_encoding",
               "qformer_input_ids", "qformer_attention_mask"}
        generate_kwargs = {k: v for k, v in args.items() if k not in own}
        return model.language_model.generate(inputs_embeds=inputs_embeds, attention_mask=attention_mask,
                                             input_ids=input_ids, **generate_kwargs)
