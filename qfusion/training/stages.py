"""StageModel: the module a training stage's Trainer runs, and what it saves.

The Trainer wraps one module (DDP, FSDP, DeepSpeed), so everything that trains runs inside its
``forward``: the attached host (a peft model when it carries the LLM's LoRA) and, in the align stage,
the answer encoder. The forward returns what the stage's loss needs
(:class:`qfusion.training.QFusionTrainer` computes it):

* align: the fusion alone on the host's vision tokens (read through the family's feature hook,
  :meth:`qfusion.adapters.HostAdapter.encode`) -> ⟨eos⟩ embeddings, slot states and the answers'
  embeddings; no LLM forward;
* generate / elastic: the patched host on the visual samples, the host alone on the text-only ones
  -> (logits, labels) of each.

Saving writes what the run owns, never the host: the plugin (through :mod:`qfusion.plugin`), the
LLM's LoRA (``lora/``) and, in checkpoints, the align stage's answer encoder.
"""

from __future__ import annotations

import os
import shutil

import torch
from safetensors.torch import load_file, load_model, save_file
from torch import Tensor, nn

from qfusion.adapters import get_adapter
from qfusion.inputs import VisualPlan, decode_image_counts, decode_questions
from qfusion.model import WEIGHTS_NAME, QuestionFusion, load_weights
from qfusion.plugin import HD_WEIGHTS_NAME, read_plugin, save_plugin
from qfusion.training.host import LORA_DIR, is_peft

ENCODER_NAME = "answer_encoder.safetensors"
"""The align stage's answer encoder in a checkpoint (it trains, so resuming needs it)."""


class StageModel(nn.Module):
    """The trained module of one stage: ``host`` (attached, maybe peft-wrapped) and, for align, the
    ``answer_encoder``.

    Parts of the fusion the stage's loss never reaches are frozen (align: the output projection;
    the generation stages: the contrastive head and temperature; without questions: the question
    embedding), so that every trainable parameter gets a gradient.
    """

    def __init__(self, host: nn.Module, stage: str, answer_encoder: nn.Module | None = None):
        super().__init__()
        if (stage == "align") != (answer_encoder is not None):
            raise ValueError(f"answer_encoder: the align stage needs one and only it, got stage {stage!r} with "
                             f"{type(answer_encoder).__name__}")
        self.host = host
        self.answer_encoder = answer_encoder
        self.stage = stage
        fusion = self.adapter.fusion
        unused = [fusion.output_projection] if stage == "align" else [fusion.contrastive_head]
        if not fusion.config.use_question:
            unused.append(fusion.text_embed)
        for module in unused:
            module.requires_grad_(False)
        if stage != "align":
            fusion.logit_scale.requires_grad_(False)
        # FSDP's transformer auto-wrap reads the layer classes from the module it wraps
        self._no_split_modules = list(getattr(host, "_no_split_modules", None) or []) + ["DecoderLayer"]

    @property
    def adapter(self):
        """The host's qfusion adapter (its fusion is the one that trains, peft's copy under LoRA)."""
        return get_adapter(self.host)

    def forward(self, budget, visual=None, text=None, answers=None) -> dict:
        """The stage's loss inputs for one collated micro-batch (:class:`qfusion.training.Collator`)."""
        if self.stage == "align":
            return self._align(budget, visual, answers)
        parts = []
        for inputs in (visual, text):
            if inputs is not None:
                arguments = {k: v for k, v in inputs.items() if k != "labels"}
                parts.append((self.host(**arguments).logits, inputs["labels"]))
        if not any(logits.requires_grad for logits, _ in parts):  # only text-only records, no trained LLM weight
            return {"parts": parts, "empty": self._zero()}
        return {"parts": parts}

    def _zero(self) -> Tensor:
        """A zero loss term that reaches the plugin, for a micro-batch that reaches no trained weight: its
        backward still runs, and under DDP it runs through this forward's outputs, as DDP requires."""
        return self.adapter.fusion.eos.sum() * 0.0

    def _align(self, budget, visual, answers) -> dict:
        fusion = self.adapter.fusion
        if visual is None:  # only text-only records: nothing to align, but the (empty) groups for a gather
            zero = self._zero()
            none = fusion.eos.new_zeros(0, fusion.contrastive_head.out_features) * zero
            return {"empty": zero, "eos_embed": none, "answer_embed": none, "answer_ids": [],
                    "slot_states": [], "logit_scale": fusion.logit_scale.clone()}
        host_inputs = {k: v for k, v in visual.items() if k != "labels"}
        questions = decode_questions(host_inputs["qfusion_input_ids"], host_inputs["qfusion_attention_mask"],
                                     host_inputs["input_ids"].shape[0])
        plan = VisualPlan.of(questions, decode_image_counts(host_inputs.get("qfusion_image_counts"), questions))
        features = [f.to(fusion.dtype) for f in self.adapter.encode(host_inputs)]
        out = fusion(features, [[q.to(fusion.device) for q in group] for group in plan.questions], budget=budget)
        # the fusion's groups run visual input by visual input; the answers are question by question
        first = [0]
        for sample in questions:
            first.append(first[-1] + len(sample))
        order = torch.tensor([first[b] + g for b, groups in plan.owners for g in groups])
        ids, mask = answers["input_ids"][order], answers["attention_mask"][order]
        # the scale leaves through an operation: a bare parameter among the outputs is invisible to DDP's
        # search for the parameters a forward used, which then marks its gradient ready twice
        return {"eos_embed": out.eos_embed, "slot_states": out.slot_states, "logit_scale": fusion.logit_scale.clone(),
                "answer_embed": self.answer_encoder(ids, mask), "answer_ids": [i[m.bool()] for i, m in zip(ids, mask)]}

    # ------------------------------------------------------------------ saving and loading

    def _part_states(self, state_dict: dict) -> dict[str, dict]:
        """The state of each saved part (fusion, HD front-end, peft model, answer encoder) from a state
        dict of this module (the live one, or one an engine gathered)."""
        adapter = self.adapter
        names = {id(module): name for name, module in self.named_modules()}
        parts = {"fusion": adapter.fusion, "hd": adapter.hd, "host": self.host, "encoder": self.answer_encoder}
        states = {}
        for part, module in parts.items():
            if module is None:
                continue
            prefix = names[id(module)] + "."
            states[part] = {k[len(prefix):]: v for k, v in state_dict.items() if k.startswith(prefix)}
        return states

    def save(self, directory: str, *, processor, card: str, state_dict: dict | None = None,
             with_encoder: bool = False) -> None:
        """Write what the run owns into ``directory``: the plugin (with ``processor``'s settings and the
        ``card``), the LoRA in ``lora/`` when the host carries one, and ``with_encoder`` the answer
        encoder. state_dict: this module's weights as an engine gathered them (default: its own)."""
        states = self._part_states(state_dict if state_dict is not None else self.state_dict())
        adapter = self.adapter
        fusion = QuestionFusion(adapter.fusion.config)
        fusion.to(dtype=adapter.fusion.dtype).load_state_dict(states["fusion"])
        hd = None
        if adapter.hd is not None:
            hd = type(adapter.hd)(adapter.hd.vision_dim, adapter.hd.grid, merge=adapter.settings.hd_merge,
                                  out_dim=adapter.hd.out_dim).to(dtype=adapter.hd.dtype)
            hd.load_state_dict(states["hd"])
        if is_peft(self.host):
            staging = os.path.join(directory, f".{LORA_DIR}.staging")
            shutil.rmtree(staging, ignore_errors=True)
            self.host.save_pretrained(staging, state_dict=states["host"])
            shutil.rmtree(os.path.join(directory, LORA_DIR), ignore_errors=True)
            os.replace(staging, os.path.join(directory, LORA_DIR))
        if with_encoder and self.answer_encoder is not None:
            save_file({k: v.contiguous() for k, v in states["encoder"].items()}, os.path.join(directory, ENCODER_NAME))
        save_plugin(directory, fusion, adapter.settings, hd, processor=processor.settings(),
                    question_tokenizer=processor.question_tokenizer, card=card)

    def load(self, directory: str) -> None:
        """Load the weights :meth:`save` wrote into this module (resuming a checkpoint); a checkpoint
        that lacks a part this module has is an error naming the file."""
        plugin = read_plugin(directory)
        adapter = self.adapter
        load_weights(adapter.fusion, os.path.join(directory, WEIGHTS_NAME), device=adapter.fusion.device)
        if adapter.hd is not None:
            load_model(adapter.hd, plugin.path(HD_WEIGHTS_NAME), strict=True, device=str(adapter.hd.device))
        if is_peft(self.host):
            from peft import set_peft_model_state_dict

            path = os.path.join(directory, LORA_DIR, "adapter_model.safetensors")
            if not os.path.isfile(path):
                raise FileNotFoundError(f"checkpoint: {directory!r} lacks {LORA_DIR}/adapter_model.safetensors")
            set_peft_model_state_dict(self.host, load_file(path, device=str(adapter.fusion.device)))
        if self.answer_encoder is not None:
            path = os.path.join(directory, ENCODER_NAME)
            if not os.path.isfile(path):
                raise FileNotFoundError(f"checkpoint: {directory!r} lacks {ENCODER_NAME}")
            self.answer_encoder.load_state_dict(load_file(path, device=str(adapter.fusion.device)))
