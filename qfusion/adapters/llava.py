"""LLaVA / LLaVA-NeXT hosts: N fused tokens stand where the host's vision tokens stood.

Data flow of a patched call (transformers 5 ``LlavaForConditionalGeneration`` /
``LlavaNextForConditionalGeneration``; ``model.model`` holds ``vision_tower``,
``multi_modal_projector``, ``language_model``):

    pixel_values ─ host vision features ─> (V, d) per image ─ QuestionFusion(questions) ─>
    m + (G−1)·n fused tokens per image ─ mm_encoder_outputs ─> the host's own forward, which
    fills the ``<image>`` placeholders with them (``masked_scatter``)

The host features are its own: ``vision_feature_layer`` and ``vision_feature_select_strategy``
select the tower's hidden states exactly as the host does; ``vision_source="projector"`` (default)
also applies the host's multimodal projector (and, for LLaVA-NeXT, its any-resolution packing with
``image_newline``), ``"tower"`` stops before it. The fused tokens enter through ``mm_encoder_outputs``,
the seam the host's ``forward`` and ``generate`` offer for precomputed image embeddings, so the
host's code runs unchanged after that. With ``hd`` the images come as HD views
(:func:`qfusion.vision.hd_views`, built by :class:`qfusion.QFusionProcessor`): every view goes through
the tower on its own and :class:`qfusion.vision.HDFrontEnd` merges them (plain LLaVA only).
"""

from __future__ import annotations

from typing import Callable

import torch
from torch import Tensor

from qfusion.adapters.base import HostAdapter


class LlavaAdapter(HostAdapter):
    """Adapter for ``llava`` and ``llava_next`` hosts (see the module docstring)."""

    family = "llava"
    model_types = ("llava", "llava_next")
    modes = ("replace",)
    vision_sources = ("projector", "tower")
    supports_hd = True
    llm_name = "model.language_model"

    def _check_host(self) -> None:
        base = getattr(self.model, "model", None)
        for part in ("vision_tower", "multi_modal_projector", "language_model"):
            if not hasattr(base, part):
                raise TypeError(
                    f"model: expected a transformers 5 {self.settings.model_type} model with model.model.{part}, "
                    f"got {type(self.model).__name__}"
                )
        if self.settings.hd_grid is not None and self.settings.model_type != "llava":
            raise ValueError(
                f"hd: the HD front-end is for plain LLaVA hosts; {self.settings.model_type!r} brings its own "
                "any-resolution views"
            )

    # ------------------------------------------------------------------ host facts

    @property
    def is_next(self) -> bool:
        return self.settings.model_type == "llava_next"

    @property
    def tower_dim(self) -> int:
        """Width of the selected vision-tower features (times the number of feature layers)."""
        config = self.model.config
        layers = 1 if isinstance(config.vision_feature_layer, int) else len(config.vision_feature_layer)
        return config.vision_config.hidden_size * layers

    @property
    def feature_dim(self) -> int:
        if self.settings.vision_source == "projector":
            return self.model.config.text_config.hidden_size
        return self.tower_dim

    @property
    def fusion_output_dim(self) -> int:
        return self.model.config.text_config.hidden_size

    def _module_groups(self) -> dict[str, list[str]]:
        projector = ["model.multi_modal_projector"] + (["model.image_newline"] if self.is_next else [])
        return {"vision_tower": ["model.vision_tower"], "projector": projector,
                "llm": ["model.language_model", "lm_head"]}

    # ------------------------------------------------------------------ vision features

    def _tower(self, pixels: Tensor, layer, strategy: str) -> Tensor:
        """(N, T, tower_dim): the tower's hidden states at ``layer``, selected as the host does."""
        hidden = self.model.model.vision_tower(pixels, output_hidden_states=True, return_dict=True).hidden_states
        pool = [hidden[layer]] if isinstance(layer, int) else [hidden[i] for i in layer]
        if strategy == "default":  # the host drops the class token
            pool = [h[:, 1:] for h in pool]
        return torch.cat(pool, dim=-1)

    def _next_patches(self, pixel_values: Tensor, image_sizes) -> tuple[Tensor, list[int]]:
        """LLaVA-NeXT any-resolution patches of all images, stacked, and how many belong to each."""
        from transformers.models.llava_next.modeling_llava_next import image_size_to_num_patches

        if image_sizes is None:
            raise ValueError("image_sizes: required by a LLaVA-NeXT host (the image processor returns it)")
        config = self.model.config
        counts = [image_size_to_num_patches(image_size=size, grid_pinpoints=config.image_grid_pinpoints,
                                            patch_size=config.vision_config.image_size) for size in image_sizes]
        if pixel_values.dim() == 5:
            pixel_values = torch.cat([pv[:count] for pv, count in zip(pixel_values, counts)])
        return pixel_values, counts

    def encode(self, pixel_values: Tensor, image_sizes=None, layer=None, strategy=None) -> list[Tensor]:
        """The host's vision features per image, (V_b, vision_dim), as the fusion reads them."""
        config = self.model.config
        layer = config.vision_feature_layer if layer is None else layer
        strategy = config.vision_feature_select_strategy if strategy is None else strategy
        if self.settings.hd_grid is not None:
            return self._encode_hd(pixel_values, layer, strategy)
        if self.settings.vision_source == "projector":
            kwargs = {"image_sizes": image_sizes} if self.is_next else {}
            features = self.model.model.get_image_features(
                pixel_values=pixel_values, vision_feature_layer=layer, vision_feature_select_strategy=strategy,
                return_dict=True, **kwargs,
            ).pooler_output
            return list(features)
        if self.is_next:
            pixels, counts = self._next_patches(pixel_values, image_sizes)
        else:
            pixels, counts = pixel_values, [1] * pixel_values.shape[0]
        return [f.flatten(0, 1) for f in self._tower(pixels, layer, strategy).split(counts)]

    def _encode_hd(self, pixel_values: Tensor, layer, strategy: str) -> list[Tensor]:
        hd = self.hd
        if pixel_values.dim() != 5 or pixel_values.shape[1] != hd.num_views:
            raise ValueError(
                f"pixel_values: expected (batch, {hd.num_views}, C, H, W) HD views (1 global + "
                f"{hd.num_views - 1} local, grid {hd.grid}) as qfusion.QFusionProcessor builds them, "
                f"got shape {tuple(pixel_values.shape)}"
            )
        batch, views = pixel_values.shape[:2]
        features = self._tower(pixel_values.flatten(0, 1), layer, strategy)  # (batch·views, T, tower_dim)
        if self.settings.vision_source == "projector":
            features = self.model.model.multi_modal_projector(features)
        features = features.to(device=hd.device, dtype=hd.dtype).unflatten(0, (batch, views))
        return hd(list(features.unbind(0)))

    # ------------------------------------------------------------------ the patched calls

    def encoder_outputs(self, *, input_ids, inputs_embeds, pixel_values, image_sizes, vision_feature_layer,
                        vision_feature_select_strategy, mm_encoder_outputs, qfusion_input_ids,
                        qfusion_attention_mask, qfusion_cache):
        """``mm_encoder_outputs`` holding the fused tokens of this call (or the caller's own when no
        image or question is given: text-only calls, decoding steps, precomputed embeddings)."""
        if pixel_values is None and qfusion_input_ids is None:
            return mm_encoder_outputs
        if mm_encoder_outputs is not None:
            raise ValueError(
                "mm_encoder_outputs: pass either precomputed image embeddings or pixel_values with "
                "qfusion_input_ids, not both"
            )
        if inputs_embeds is not None:
            raise ValueError("inputs_embeds: not supported with qfusion inputs; pass input_ids")
        if pixel_values is None and (qfusion_cache is None or qfusion_cache.is_empty):
            raise ValueError(
                "pixel_values: required with qfusion_input_ids (unless a filled qfusion_cache holds the images)"
            )
        questions = self._questions(qfusion_input_ids, qfusion_attention_mask, input_ids)
        self._check_images(pixel_values, input_ids.shape[0])

        def encode():
            return self.encode(pixel_values, image_sizes, vision_feature_layer, vision_feature_select_strategy), None

        tokens, _ = self.fused_tokens(encode, pixel_values, questions, qfusion_cache)
        from transformers.modeling_outputs import BaseModelOutputWithPooling

        embed = self.model.get_input_embeddings().weight
        per_sample = [torch.cat(groups).to(device=embed.device, dtype=embed.dtype) for groups in tokens]
        return {"image": BaseModelOutputWithPooling(pooler_output=per_sample)}

    def _run_forward(self, inputs: dict, qfusion_input_ids, qfusion_attention_mask, qfusion_cache, kwargs):
        mm_encoder_outputs = self.encoder_outputs(
            input_ids=inputs["input_ids"], inputs_embeds=inputs["inputs_embeds"],
            pixel_values=inputs["pixel_values"], image_sizes=inputs["image_sizes"],
            vision_feature_layer=inputs["vision_feature_layer"],
            vision_feature_select_strategy=inputs["vision_feature_select_strategy"],
            mm_encoder_outputs=inputs["mm_encoder_outputs"], qfusion_input_ids=qfusion_input_ids,
            qfusion_attention_mask=qfusion_attention_mask, qfusion_cache=qfusion_cache,
        )
        inputs = dict(inputs, pixel_values=None, mm_encoder_outputs=mm_encoder_outputs)
        return self.host_method("forward")(**inputs, **kwargs)

    def _run_generate(self, input_ids, attention_mask, pixel_values, image_sizes, vision_feature_layer,
                      vision_feature_select_strategy, mm_encoder_outputs, qfusion_input_ids, qfusion_attention_mask,
                      qfusion_cache, generate_kwargs):
        host_generate = self.host_method("generate")
        if pixel_values is None and qfusion_input_ids is None:
            host_kwargs = {"image_sizes": image_sizes, "vision_feature_layer": vision_feature_layer,
                           "vision_feature_select_strategy": vision_feature_select_strategy,
                           "mm_encoder_outputs": mm_encoder_outputs}
            generate_kwargs.update({k: v for k, v in host_kwargs.items() if v is not None})
            return host_generate(input_ids=input_ids, attention_mask=attention_mask, **generate_kwargs)
        mm_encoder_outputs = self.encoder_outputs(
            input_ids=input_ids, inputs_embeds=generate_kwargs.get("inputs_embeds"), pixel_values=pixel_values,
            image_sizes=image_sizes, vision_feature_layer=vision_feature_layer,
            vision_feature_select_strategy=vision_feature_select_strategy, mm_encoder_outputs=mm_encoder_outputs,
            qfusion_input_ids=qfusion_input_ids, qfusion_attention_mask=qfusion_attention_mask,
            qfusion_cache=qfusion_cache,
        )
        return host_generate(input_ids=input_ids, attention_mask=attention_mask, mm_encoder_outputs=mm_encoder_outputs,
                             **generate_kwargs)

    def _patched_methods(self) -> dict[str, Callable]:
        """The instance's new forward/generate: explicit signatures (the host's, plus the qfusion inputs)
        that find their adapter on the model at call time."""
        if self.is_next:  # the host's positional order
            def forward(self, input_ids=None, pixel_values=None, image_sizes=None, attention_mask=None,
                        position_ids=None, past_key_values=None, inputs_embeds=None, vision_feature_layer=None,
                        vision_feature_select_strategy=None, labels=None, logits_to_keep=0, mm_encoder_outputs=None,
                        qfusion_input_ids=None, qfusion_attention_mask=None, qfusion_cache=None, **kwargs):
                """The host's forward, with the images compressed by the attached qfusion plugin.

                qfusion_input_ids / qfusion_attention_mask: (B, G_max, L_max) question ids, right-padded;
                    an all-zero mask row is an empty slot. input_ids must hold m image placeholders before
                    a sample's first question and n before each later one.
                qfusion_cache: a FusionCache reused across the turns of a conversation (optional).
                """
                inputs = dict(input_ids=input_ids, pixel_values=pixel_values, image_sizes=image_sizes,
                              attention_mask=attention_mask, position_ids=position_ids, past_key_values=past_key_values,
                              inputs_embeds=inputs_embeds, vision_feature_layer=vision_feature_layer,
                              vision_feature_select_strategy=vision_feature_select_strategy, labels=labels,
                              logits_to_keep=logits_to_keep, mm_encoder_outputs=mm_encoder_outputs)
                return HostAdapter.of(self)._run_forward(inputs, qfusion_input_ids, qfusion_attention_mask,
                                                         qfusion_cache, kwargs)
        else:
            def forward(self, input_ids=None, pixel_values=None, attention_mask=None, position_ids=None,
                        past_key_values=None, inputs_embeds=None, vision_feature_layer=None,
                        vision_feature_select_strategy=None, labels=None, logits_to_keep=0, image_sizes=None,
                        mm_encoder_outputs=None, qfusion_input_ids=None, qfusion_attention_mask=None,
                        qfusion_cache=None, **kwargs):
                """The host's forward, with the images compressed by the attached qfusion plugin.

                qfusion_input_ids / qfusion_attention_mask: (B, G_max, L_max) question ids, right-padded;
                    an all-zero mask row is an empty slot. input_ids must hold m image placeholders before
                    a sample's first question and n before each later one.
                qfusion_cache: a FusionCache reused across the turns of a conversation (optional).
                """
                inputs = dict(input_ids=input_ids, pixel_values=pixel_values, attention_mask=attention_mask,
                              position_ids=position_ids, past_key_values=past_key_values, inputs_embeds=inputs_embeds,
                              vision_feature_layer=vision_feature_layer,
                              vision_feature_select_strategy=vision_feature_select_strategy, labels=labels,
                              logits_to_keep=logits_to_keep, image_sizes=image_sizes,
                              mm_encoder_outputs=mm_encoder_outputs)
                return HostAdapter.of(self)._run_forward(inputs, qfusion_input_ids, qfusion_attention_mask,
                                                         qfusion_cache, kwargs)

        @torch.no_grad()
        def generate(self, input_ids=None, pixel_values=None, attention_mask=None, image_sizes=None,
                     vision_feature_layer=None, vision_feature_select_strategy=None, mm_encoder_outputs=None,
                     qfusion_input_ids=None, qfusion_attention_mask=None, qfusion_cache=None, **generate_kwargs):
            """The host's generate, with the images compressed by the attached qfusion plugin.

            Takes what ``forward`` takes (see there) plus the usual generation arguments.
            """
            return HostAdapter.of(self)._run_generate(
                input_ids, attention_mask, pixel_values, image_sizes, vision_feature_layer,
                vision_feature_select_strategy, mm_encoder_outputs, qfusion_input_ids, qfusion_attention_mask,
                qfusion_cache, generate_kwargs)

        return {"forward": forward, "generate": generate}
