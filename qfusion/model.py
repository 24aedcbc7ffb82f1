"""QuestionFusion: a small Llama-style transformer that compresses vision tokens given a question.

One packed sequence per batch: [vision | question 1, m slots | question 2, n slots | ...] per sample
(see :mod:`qfusion.layout`). The final hidden states at the slots, projected to the LLM width, are
the fused vision tokens; the last slot of every group is the shared ⟨eos⟩.
"""

from __future__ import annotations

import math
import os
import weakref
from dataclasses import dataclass
from typing import Sequence

import torch
import torch.nn.functional as F
from einops import rearrange
from huggingface_hub import PyTorchModelHubMixin, hf_hub_download
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from qfusion.budget import Budget
from qfusion.config import CONFIG_NAME, FusionConfig
from qfusion.layout import (AttentionMeta, PackedLayout, StepCursor, keys_to_keep, merge_keys, pack, pack_step,
                            pack_vision)
from qfusion.ops.attention import IMPLEMENTATIONS, fusion_attention

WEIGHTS_NAME = "model.safetensors"


def rotary_tables(positions: Tensor, head_dim: int, theta: float, dtype: torch.dtype) -> tuple[Tensor, Tensor]:
    """cos, sin of shape (T, head_dim) for integer positions (T,); computed in float32 or float64."""
    work = torch.float64 if dtype == torch.float64 else torch.float32
    inv_freq = theta ** (-torch.arange(0, head_dim, 2, device=positions.device, dtype=work) / head_dim)
    angles = positions.to(work)[:, None] * inv_freq[None, :]
    angles = torch.cat([angles, angles], dim=-1)
    return angles.cos().to(dtype), angles.sin().to(dtype)


def apply_rotary(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """Rotate x: (T, H, D) by the tables cos, sin: (T, D)."""
    x1, x2 = x.chunk(2, dim=-1)
    rotated = torch.cat([-x2, x1], dim=-1)
    return x * cos[:, None] + rotated * sin[:, None]


class FusionAttention(nn.Module):
    """Multi-head self-attention over the packed sequence (names avoid Llama's q_proj/k_proj/...)."""

    def __init__(self, config: FusionConfig):
        super().__init__()
        self.config = config
        hidden = config.hidden_size
        self.to_q = nn.Linear(hidden, hidden, bias=False)
        self.to_kv = nn.Linear(hidden, 2 * hidden, bias=False)
        self.to_out = nn.Linear(hidden, hidden, bias=False)

    def forward(self, x: Tensor, rope: tuple[Tensor, Tensor], meta_q: AttentionMeta, meta_k: AttentionMeta,
                past: tuple[Tensor, Tensor] | None = None, merge: Tensor | None = None, impl: str = "auto"):
        """x: (T, hidden). With ``past`` (cached (Tk', H, D) keys/values), the new keys are merged in by
        the gather index ``merge``; ``impl`` is the attention implementation. Returns (T, hidden) and
        the (k, v) the queries attended to."""
        heads = self.config.num_heads
        q = rearrange(self.to_q(x), "t (h d) -> t h d", h=heads)
        k, v = rearrange(self.to_kv(x), "t (two h d) -> two t h d", two=2, h=heads)
        q, k = apply_rotary(q, *rope), apply_rotary(k, *rope)
        if past is not None:
            k = torch.cat([past[0], k])[merge]
            v = torch.cat([past[1], v])[merge]
        out = fusion_attention(q, k, v, meta_q, meta_k, policy=self.config.mask, impl=impl)
        return self.to_out(rearrange(out, "t h d -> t (h d)")), (k, v)


class SwiGLU(nn.Module):
    """The Llama MLP: w_out(silu(w_gate x) * w_in x)."""

    def __init__(self, hidden: int, intermediate: int):
        super().__init__()
        self.w_gate = nn.Linear(hidden, intermediate, bias=False)
        self.w_in = nn.Linear(hidden, intermediate, bias=False)
        self.w_out = nn.Linear(intermediate, hidden, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        return self.w_out(F.silu(self.w_gate(x)) * self.w_in(x))


class DecoderLayer(nn.Module):
    """Pre-norm Llama block: x + attn(norm(x)), then x + mlp(norm(x))."""

    def __init__(self, config: FusionConfig):
        super().__init__()
        self.attn_norm = nn.RMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.attn = FusionAttention(config)
        self.mlp_norm = nn.RMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.mlp = SwiGLU(config.hidden_size, config.intermediate_size)

    def forward(self, h, rope, meta_q, meta_k, past=None, merge=None, impl="auto"):
        attended, kv = self.attn(self.attn_norm(h), rope, meta_q, meta_k, past, merge, impl)
        h = h + attended
        return h + self.mlp(self.mlp_norm(h)), kv


@dataclass
class FusionOutput:
    """What a QuestionFusion forward produces.

    tokens: per sample, per question, a (k, output_dim) tensor of fused tokens (k = m for the first
        question, n after); the last row is the ⟨eos⟩ slot.
    eos_embed: (K, contrastive_dim) L2-normalised ⟨eos⟩ embeddings, one per question in batch order.
    slot_states: per question (batch order), the (k, hidden_size) final hidden states of its slots
        before the output projection (for the identity loss).
    packed_tokens: (Q, output_dim) all fused tokens, groups in batch order (``layout.query_cu``).
    packed_slot_states: (Q, hidden_size) the same before projection.
    layout: the packed layout the forward ran on.
    """

    tokens: list[list[Tensor]]
    eos_embed: Tensor
    slot_states: list[Tensor]
    packed_tokens: Tensor
    packed_slot_states: Tensor
    layout: PackedLayout


@dataclass
class FusionState:
    """The cached vision prefix (and question groups) of an incremental ``start``/``ask`` session.

    Immutable from the caller's side: ``ask`` returns a new state, so one state can be asked several
    different follow-ups.
    """

    owner: "weakref.ref[QuestionFusion]"
    budget: Budget  # (m, n) of every ask on this state, fixed at start
    kv: list[tuple[Tensor, Tensor]]  # per layer, cached (Tk, H, D) keys and values
    meta_k: AttentionMeta
    cursor: StepCursor  # per sample: groups asked so far, next order and position
    version: tuple  # the module's version() when the state was computed

    @property
    def batch_size(self) -> int:
        return len(self.cursor.groups)

    @property
    def m(self) -> int:
        return self.budget.m

    @property
    def n(self) -> int:
        return self.budget.n


class QuestionFusion(nn.Module, PyTorchModelHubMixin, library_name="qfusion",
                     tags=["qfusion", "vision-token-compression"]):
    """Question-aware compressor of a VLM's vision tokens into m (then n) fused tokens per question.

    >>> import torch
    >>> from qfusion import FusionConfig, QuestionFusion
    >>> cfg = FusionConfig(vision_dim=32, hidden_size=64, num_layers=2, num_heads=4,
    ...                    intermediate_size=128, codebook_size=16, m=8, n=2, output_dim=48,
    ...                    text_vocab_size=100)
    >>> fusion = QuestionFusion(cfg)
    >>> out = fusion(torch.randn(1, 50, 32), [[torch.tensor([5, 6, 7]), torch.tensor([9])]])
    >>> [t.shape[0] for t in out.tokens[0]]
    [8, 2]
    """

    def __init__(self, config: FusionConfig | dict, *, attn_impl: str | None = None,
                 gradient_checkpointing: bool | None = None):
        super().__init__()
        if isinstance(config, dict):
            config = FusionConfig.from_dict(config)
        if not isinstance(config, FusionConfig):
            raise TypeError(f"config: expected a FusionConfig or a dict, got {type(config).__name__}")
        missing = config.unresolved()
        if missing:
            raise ValueError(
                f"config: {missing[0]} is None (= from the host); set it, or let qfusion.attach fill it from "
                f"the host model (unresolved: {missing})"
            )
        runtime = {k: v for k, v in (("attn_impl", attn_impl), ("gradient_checkpointing", gradient_checkpointing))
                   if v is not None}
        self.config = config.replace(**runtime) if runtime else config
        self._hub_mixin_config = self.config.architecture_dict()  # what save_pretrained writes as config.json
        hidden = config.hidden_size
        self.vision_proj = (
            nn.Identity() if config.vision_dim == hidden else nn.Linear(config.vision_dim, hidden)
        )
        self.text_embed = nn.Embedding(config.text_vocab_size, hidden)
        self.codebook = nn.Embedding(config.codebook_size - 1, hidden)
        self.eos = nn.Parameter(torch.empty(hidden))
        self.layers = nn.ModuleList(DecoderLayer(config) for _ in range(config.num_layers))
        self.norm = nn.RMSNorm(hidden, eps=config.rms_norm_eps)
        if config.output_mlp:
            self.output_projection = nn.Sequential(
                nn.Linear(hidden, config.output_dim), nn.GELU(), nn.Linear(config.output_dim, config.output_dim)
            )
        else:
            self.output_projection = nn.Linear(hidden, config.output_dim)
        self.contrastive_head = nn.Linear(hidden, config.contrastive_dim, bias=False)
        # log(1/τ) of the contrastive loss, learned and saved with the module (CLIP's initial τ = 0.07).
        self.logit_scale = nn.Parameter(torch.tensor(math.log(1 / 0.07)))
        self.reset_parameters()

    def reset_parameters(self) -> None:
        std = self.config.initializer_range
        for module in self.modules():
            if isinstance(module, (nn.Linear, nn.Embedding)):
                nn.init.normal_(module.weight, std=std)
                if getattr(module, "bias", None) is not None:
                    nn.init.zeros_(module.bias)
            elif isinstance(module, nn.RMSNorm):
                nn.init.ones_(module.weight)
        nn.init.normal_(self.eos, std=std)
        with torch.no_grad():
            self.logit_scale.fill_(math.log(1 / 0.07))

    @property
    def dtype(self) -> torch.dtype:
        return self.eos.dtype

    RECONFIGURABLE = ("m", "n", "use_question", "attn_impl", "gradient_checkpointing")
    """Settings that change no weight: the default budget, the no-question ablation, runtime choices."""

    def configure(self, **changes) -> None:
        """Change settings that change no weight (:attr:`RECONFIGURABLE`), e.g. the default budget a
        fine-tuned plugin is saved with; the config is replaced, never edited in place."""
        fixed = sorted(set(changes) - set(self.RECONFIGURABLE))
        if fixed:
            raise ValueError(
                f"changes: {fixed} define the weights and cannot change on a built module; "
                f"reconfigurable: {list(self.RECONFIGURABLE)}"
            )
        self.config = self.config.replace(**changes)
        self._hub_mixin_config = self.config.architecture_dict()

    @property
    def attn_impl(self) -> str:
        """The attention implementation this module runs with (a runtime choice, not saved)."""
        return self.config.attn_impl

    @attn_impl.setter
    def attn_impl(self, value: str) -> None:
        if value not in IMPLEMENTATIONS:
            raise ValueError(f"attn_impl: expected one of {IMPLEMENTATIONS}, got {value!r}")
        self.configure(attn_impl=value)

    @property
    def gradient_checkpointing(self) -> bool:
        """Whether decoder layers are recomputed in backward (a runtime choice, not saved)."""
        return self.config.gradient_checkpointing

    @gradient_checkpointing.setter
    def gradient_checkpointing(self, value: bool) -> None:
        self.configure(gradient_checkpointing=value)

    @property
    def device(self) -> torch.device:
        return self.eos.device

    def version(self) -> tuple:
        """What the module's outputs depend on beside its inputs: every weight (its identity and
        in-place version, which an optimizer step or a load bumps), dtype, device and
        ``use_question``. Incremental states and caches computed under another version are stale."""
        return (self.config.use_question, self.dtype, self.device,
                tuple((id(p), p._version) for p in self.parameters()))

    # ------------------------------------------------------------------ input checks

    def _budget(self, m: int | None, n: int | None, budget) -> Budget:
        """The budget of a call: ``budget`` (a Budget or (m, n)), or ``m`` / ``n`` over the configured
        default (:meth:`qfusion.Budget.resolve`), checked against the codebook."""
        codebook = self.config.codebook_size
        if budget is None:
            return Budget.resolve(m, n, default=self.config.budget, codebook_size=codebook)
        if m is not None or n is not None:
            raise ValueError(f"budget: pass either budget or m / n, got budget={budget!r}, m={m!r}, n={n!r}")
        return Budget.of(budget, name="budget", codebook_size=codebook)

    def _check_vision(self, vision_tokens) -> list[Tensor]:
        if isinstance(vision_tokens, Tensor):
            if vision_tokens.dim() != 3:
                raise ValueError(
                    "vision_tokens: expected a (B, V, vision_dim) tensor or a list of (V_i, vision_dim) "
                    f"tensors, got a tensor of shape {tuple(vision_tokens.shape)}"
                )
            vision = list(vision_tokens.unbind(0))
        elif isinstance(vision_tokens, (list, tuple)) and all(isinstance(v, Tensor) for v in vision_tokens):
            vision = list(vision_tokens)
        else:
            raise TypeError(
                "vision_tokens: expected a (B, V, vision_dim) tensor or a list of (V_i, vision_dim) tensors, "
                f"got {type(vision_tokens).__name__}"
            )
        if not vision:
            raise ValueError("vision_tokens: expected at least one sample, got an empty batch")
        for i, v in enumerate(vision):
            if v.dim() != 2:
                raise ValueError(f"vision_tokens[{i}]: expected (V, vision_dim), got shape {tuple(v.shape)}")
            if v.shape[-1] != self.config.vision_dim:
                raise ValueError(
                    f"vision_tokens[{i}]: expected last dim vision_dim={self.config.vision_dim}, got {v.shape[-1]}"
                )
            if v.dtype != self.dtype:
                raise TypeError(
                    f"vision_tokens[{i}]: expected dtype {self.dtype} (the module's), got {v.dtype}; "
                    "cast explicitly with .to(fusion.dtype)"
                )
            if v.device != self.device:
                raise ValueError(
                    f"vision_tokens[{i}]: expected device {self.device} (the module's), got {v.device}"
                )
        return vision

    def _check_ids(self, ids, name: str) -> Tensor:
        if not isinstance(ids, Tensor):
            raise TypeError(f"{name}: expected a 1-D integer tensor of token ids, got {type(ids).__name__}")
        if ids.dim() != 1:
            raise ValueError(f"{name}: expected a 1-D tensor of token ids, got shape {tuple(ids.shape)}")
        if ids.dtype not in (torch.int64, torch.int32, torch.int16, torch.int8, torch.uint8):
            raise TypeError(f"{name}: expected integer token ids, got dtype {ids.dtype}")
        if ids.numel() == 0:
            raise ValueError(f"{name}: expected at least one token, got an empty question")
        if ids.device != self.device:
            raise ValueError(f"{name}: expected device {self.device} (the module's), got {ids.device}")
        low, high = int(ids.min()), int(ids.max())
        if low < 0 or high >= self.config.text_vocab_size:
            raise ValueError(
                f"{name}: expected ids in [0, text_vocab_size={self.config.text_vocab_size}), "
                f"got values in [{low}, {high}]"
            )
        return ids.long()

    def _check_questions(self, questions, batch_size: int) -> list[list[Tensor | None]]:
        """Validated questions; with use_question=False each entry only counts a group (None = ids unused)."""
        if questions is None and not self.config.use_question:
            return [[None] for _ in range(batch_size)]
        if not isinstance(questions, (list, tuple)):
            raise TypeError(
                f"questions: expected a list of {batch_size} lists of 1-D LongTensors, got {type(questions).__name__}"
            )
        if len(questions) != batch_size:
            raise ValueError(
                f"questions: expected one list per sample ({batch_size} samples in vision_tokens), "
                f"got {len(questions)}"
            )
        checked = []
        for b, sample in enumerate(questions):
            if not isinstance(sample, (list, tuple)):
                raise TypeError(f"questions[{b}]: expected a list of 1-D LongTensors, got {type(sample).__name__}")
            if len(sample) == 0:
                raise ValueError(f"questions[{b}]: expected at least one question, got an empty list")
            if not self.config.use_question:
                checked.append([None] * len(sample))  # the ids go unused: each entry makes one group
                continue
            checked.append([self._check_ids(q, f"questions[{b}][{g}]") for g, q in enumerate(sample)])
        return checked

    # ------------------------------------------------------------------ the forward pass

    def _slot_embeddings(self, slot: Tensor, is_eos: Tensor) -> Tensor:
        """(Q, hidden): codebook row ``slot`` for every slot but the last of a group, which is ⟨eos⟩."""
        rows = (~is_eos).nonzero().squeeze(-1)
        eos = self.eos.expand(slot.numel(), -1)
        return eos.index_put((rows,), self.codebook(slot[rows]))

    def _embed(self, vision: list[Tensor], ids: list[Tensor], text_index, query_index, vision_index,
               slot, is_eos, num_tokens: int) -> Tensor:
        h = self.eos.new_zeros(num_tokens, self.config.hidden_size)
        if vision_index.numel():
            h = h.index_put((vision_index,), self.vision_proj(torch.cat(vision)))
        if text_index.numel():
            h = h.index_put((text_index,), self.text_embed(torch.cat(ids)))
        return h.index_put((query_index,), self._slot_embeddings(slot, is_eos))

    def _run_layers(self, h, positions, meta_q, meta_k, past=None, merge=None):
        rope = rotary_tables(positions, self.config.head_dim, self.config.rope_theta, h.dtype)
        impl = self.attn_impl
        kv = []
        for i, layer in enumerate(self.layers):
            layer_past = None if past is None else past[i]
            if self.gradient_checkpointing and self.training and torch.is_grad_enabled():
                h, layer_kv = checkpoint(layer, h, rope, meta_q, meta_k, layer_past, merge, impl, use_reentrant=False)
            else:
                h, layer_kv = layer(h, rope, meta_q, meta_k, layer_past, merge, impl)
            kv.append(layer_kv)
        return h, kv

    def forward(self, vision_tokens, questions, *, m: int | None = None, n: int | None = None,
                budget: Budget | tuple[int, int] | None = None) -> FusionOutput:
        """Fuse each sample's vision tokens with each of its questions.

        vision_tokens: (B, V, vision_dim) or a list of B tensors (V_b, vision_dim), in the module's
            dtype and device.
        questions: B lists of 1-D integer tensors (token ids of the fusion's text vocabulary), one
            per question; G_b >= 1 questions per sample. With ``use_question=False`` the ids are not
            used (only their count); ``None`` then means one group per sample.
        m, n: slots of the first / every later question, overriding the config for this call
            (1 <= n <= m <= codebook_size; n alone defaults to min(config n, m)). Budgets nest: the
            slots of a smaller m are a prefix.
        budget: instead of m / n, a :class:`qfusion.Budget` or (m, n).
        """
        vision = self._check_vision(vision_tokens)
        checked = self._check_questions(questions, len(vision))
        budget = self._budget(m, n, budget)
        ids = [q for sample in checked for q in sample if q is not None]
        layout = pack(
            [v.shape[0] for v in vision],
            [[0 if q is None else q.numel() for q in sample] for sample in checked],
            budget=budget, policy=self.config.mask, device=self.device,
        )
        h = self._embed(vision, ids, layout.text_index, layout.query_index, layout.vision_index,
                        layout.slot, layout.is_eos_slot(), layout.num_tokens)
        h, _ = self._run_layers(h, layout.position, layout.meta, layout.meta)
        slot_states = self.norm(h[layout.query_index])  # (Q, hidden)
        return self._outputs(slot_states, layout.group_sizes(), layout.group_sample.tolist(), layout)

    def _outputs(self, slot_states: Tensor, sizes: list[int], group_sample: list[int], layout) -> FusionOutput:
        tokens = self.output_projection(slot_states)
        ends = torch.tensor(sizes, device=slot_states.device).cumsum(0) - 1
        eos_embed = F.normalize(self.contrastive_head(slot_states[ends]), dim=-1)
        per_group = list(tokens.split(sizes))
        nested: list[list[Tensor]] = [[] for _ in range(max(group_sample, default=-1) + 1)]
        for b, t in zip(group_sample, per_group):
            nested[b].append(t)
        return FusionOutput(nested, eos_embed, list(slot_states.split(sizes)), tokens, slot_states, layout)

    # ------------------------------------------------------------------ incremental use

    def start(self, vision_tokens, *, m: int | None = None, n: int | None = None,
              budget: Budget | tuple[int, int] | None = None) -> FusionState:
        """Run the vision prefix once and keep its keys/values for later ``ask`` calls.

        vision_tokens: as in ``forward``. m, n (or budget): the budget of every later ``ask``, fixed
            here, as in ``forward``.
        """
        vision = self._check_vision(vision_tokens)
        budget = self._budget(m, n, budget)
        meta, positions, cursor = pack_vision([v.shape[0] for v in vision], self.device)
        h = self.vision_proj(torch.cat(vision))
        _, kv = self._run_layers(h, positions, meta, meta)
        return FusionState(weakref.ref(self), budget, kv, meta, cursor, self.version())

    def ask(self, state: FusionState, question_ids: Sequence[Tensor | None]):
        """Append one question group per sample to a started state; returns (tokens, new_state).

        question_ids: one entry per sample: a 1-D integer tensor, or None for a sample with nothing
            to ask this time (with ``use_question=False`` any non-None entry asks, its ids unused).
        tokens: per sample, a (k, output_dim) tensor (k = m for its first question, n after) or None.

        Equals the packed ``forward`` over all questions at once, under every mask policy.
        """
        if not isinstance(state, FusionState) or state.owner() is not self:
            raise ValueError("state: expected a FusionState returned by this module's start() or ask()")
        if state.version != self.version():
            raise ValueError(
                "state: computed before this module's weights, dtype, device or use_question changed; "
                "start() again (a stale state would give tokens of the old module)"
            )
        if not isinstance(question_ids, (list, tuple)) or len(question_ids) != state.batch_size:
            raise ValueError(
                f"question_ids: expected a list of {state.batch_size} entries (tensor or None), "
                f"got {type(question_ids).__name__} of length {len(question_ids) if hasattr(question_ids, '__len__') else '?'}"
            )
        if all(q is None for q in question_ids):
            raise ValueError("question_ids: expected at least one question, got only None")
        ids: list[Tensor] = []
        text_lengths: list[int | None] = []
        for b, q in enumerate(question_ids):
            if q is not None and self.config.use_question:
                ids.append(self._check_ids(q, f"question_ids[{b}]"))
            text_lengths.append(None if q is None else ids[-1].numel() if self.config.use_question else 0)
        step = pack_step(state.cursor, text_lengths, budget=state.budget, policy=self.config.mask,
                         device=self.device)
        h = self._embed([], ids, step.text_index, step.query_index, step.query_index.new_empty(0), step.slot,
                        step.is_eos, step.meta.num_tokens)
        meta_k, merge, from_new = merge_keys(state.meta_k, step.meta)
        h, kv = self._run_layers(h, step.position, step.meta, meta_k, state.kv, merge)
        out = self._outputs(self.norm(h[step.query_index]), step.group_sizes, list(range(len(step.asked))), None)
        tokens: list[Tensor | None] = [None] * state.batch_size
        for b, t in zip(step.asked, out.tokens):
            tokens[b] = t[0]
        keep, kept_meta = keys_to_keep(self.config.mask, meta_k, from_new, step.cursor)
        new_state = FusionState(state.owner, state.budget, [(k[keep], v[keep]) for k, v in kv], kept_meta,
                                step.cursor, state.version)
        return tokens, new_state

    # ------------------------------------------------------------------ persistence

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path, *, attn_impl: str = "auto",
                        gradient_checkpointing: bool = False, **kwargs) -> "QuestionFusion":
        """Load a module saved with ``save_pretrained`` (a directory or a hub id).

        attn_impl, gradient_checkpointing: runtime choices for this session (not part of the saved
            weights' identity). Other keyword arguments go to huggingface_hub (revision, token, ...).
        """
        return super().from_pretrained(pretrained_model_name_or_path, attn_impl=attn_impl,
                                       gradient_checkpointing=gradient_checkpointing, **kwargs)

    @classmethod
    def _from_pretrained(cls, *, model_id: str, revision, cache_dir, force_download, local_files_only, token,
                         map_location: str = "cpu", strict: bool = True, **model_kwargs):
        """Load config.json + model.safetensors strictly: every key of the config and every weight
        present, nothing unknown, one dtype for all weights (the module is built in it)."""
        if "config" not in model_kwargs:
            raise FileNotFoundError(
                f"model_id: no {CONFIG_NAME} found for {model_id!r}; not a saved QuestionFusion (save_pretrained "
                f"writes {CONFIG_NAME} and {WEIGHTS_NAME})"
            )
        if os.path.isdir(model_id):
            path = os.path.join(model_id, WEIGHTS_NAME)
            if not os.path.isfile(path):
                raise FileNotFoundError(f"model_id: no {WEIGHTS_NAME} in directory {model_id!r}")
        else:
            path = hf_hub_download(repo_id=model_id, filename=WEIGHTS_NAME, revision=revision,
                                   cache_dir=cache_dir, force_download=force_download, token=token,
                                   local_files_only=local_files_only)
        config = model_kwargs.pop("config")
        if isinstance(config, dict):
            config = FusionConfig.from_dict(config, source=os.path.join(os.path.dirname(path), CONFIG_NAME))
        model = cls(config, **model_kwargs)
        load_weights(model, path, device=map_location)
        return model


def load_weights(module: nn.Module, path: str, device="cpu") -> None:
    """Load a safetensors file into ``module`` strictly; errors name the file and the tensors.

    Every parameter must be in the file with its shape, nothing else may be; the file's floating
    tensors must share one dtype, in which the module is then held (a mixed file is refused rather
    than cast).
    """
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(path, framework="pt", device=str(device)) as f:
            tensors = {name: f.get_tensor(name) for name in f.keys()}
    except (SafetensorError, OSError, ValueError) as error:
        raise ValueError(f"{path}: not a readable safetensors file ({error}); the file is damaged or truncated") from None
    expected = module.state_dict()
    missing, unknown = sorted(set(expected) - set(tensors)), sorted(set(tensors) - set(expected))
    if missing or unknown:
        raise ValueError(f"{path}: weights do not fit the module: missing {missing}, unexpected {unknown}")
    for name, tensor in tensors.items():
        if tensor.shape != expected[name].shape:
            raise ValueError(f"{path}: {name!r} has shape {tuple(tensor.shape)}, the module needs "
                             f"{tuple(expected[name].shape)}")
    by_dtype: dict[torch.dtype, list[str]] = {}
    for name, tensor in tensors.items():
        if tensor.is_floating_point():
            by_dtype.setdefault(tensor.dtype, []).append(name)
    if len(by_dtype) > 1:
        fewest = min(by_dtype.values(), key=len)
        raise ValueError(
            f"{path}: weights of several dtypes ({', '.join(f'{d}: {len(n)}' for d, n in by_dtype.items())}; e.g. "
            f"{sorted(fewest)[:3]}); a saved module holds one dtype, a mixed file is refused rather than cast"
        )
    if by_dtype:
        module.to(dtype=next(iter(by_dtype)))
    module.load_state_dict(tensors, strict=True)
