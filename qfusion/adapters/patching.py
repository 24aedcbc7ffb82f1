"""Reversible patching of one host model instance, with patched methods derived from the host's own.

A patched ``forward`` / ``generate`` has the host class's signature (read with ``inspect`` at attach
time, so a new transformers release fits without a change here) plus the keyword-only qfusion
parameters; ``__signature__`` is set, so transformers' ``generate`` (which inspects ``forward``)
sees exactly the host's parameters. A call binds its arguments to that signature and hands the
host arguments *the caller gave* — nothing filled in from defaults, so no deprecated argument is
ever passed on — and the qfusion ones to a handler.

:class:`InstancePatch` records every change made to the instance (attributes, submodules,
``requires_grad`` flags) and undoes it exactly.
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass
from types import MethodType
from typing import Any, Callable

from torch import Tensor, nn

QFUSION_PARAMETERS = ("qfusion_input_ids", "qfusion_attention_mask", "qfusion_cache", "qfusion_budget",
                      "qfusion_image_counts")
"""The parameters a patched method adds to the host's (keyword-only, default None)."""

QFUSION_DOC = """
With a qfusion plugin attached, it also takes (keyword-only):

qfusion_input_ids / qfusion_attention_mask: (B, G_max, L_max) question ids, right-padded; an all-zero
    mask row is an empty slot. input_ids must hold m image placeholders before a sample's first
    question and n before each later one (build them with qfusion.QFusionProcessor).
qfusion_budget: (m, n) fused tokens for the first / every later question of this call (default: the
    plugin's configured m, n).
qfusion_cache: a qfusion.adapters.FusionCache reused across the turns of a conversation (optional).
qfusion_image_counts: (B, G_max) new images each question brings, for several images per prompt
    (default: one image, before the first question).
"""


@dataclass(frozen=True)
class QFusionArguments:
    """The qfusion parameters of one patched call."""

    input_ids: Tensor | None = None
    attention_mask: Tensor | None = None
    cache: Any = None
    budget: Any = None
    image_counts: Any = None

    @property
    def given(self) -> bool:
        return self.input_ids is not None


def patched_signature(host_function: Callable) -> inspect.Signature:
    """The host function's signature with the qfusion parameters added before its ``**kwargs``."""
    signature = inspect.signature(host_function)
    clash = sorted(set(QFUSION_PARAMETERS) & set(signature.parameters))
    if clash:
        raise TypeError(f"model: {host_function.__qualname__} already has parameters {clash}")
    params = list(signature.parameters.values())
    var_keyword = [p for p in params if p.kind is inspect.Parameter.VAR_KEYWORD]
    others = [p for p in params if p.kind is not inspect.Parameter.VAR_KEYWORD]
    added = [inspect.Parameter(name, inspect.Parameter.KEYWORD_ONLY, default=None) for name in QFUSION_PARAMETERS]
    return signature.replace(parameters=others + added + var_keyword)


def derive_method(host_function: Callable, handler: Callable[[nn.Module, dict, QFusionArguments], Any]) -> Callable:
    """A function(self, ...) with the host function's signature plus the qfusion parameters.

    handler(model, host_arguments, qfusion): ``host_arguments`` maps the names of the host parameters
    the caller passed (``**kwargs`` flattened in) to their values.
    """
    signature = patched_signature(host_function)
    params = list(signature.parameters.values())
    self_name = params[0].name
    var_keyword = next((p.name for p in params if p.kind is inspect.Parameter.VAR_KEYWORD), None)
    var_positional = next((p.name for p in params if p.kind is inspect.Parameter.VAR_POSITIONAL), None)

    def method(*args, **kwargs):
        bound = signature.bind(*args, **kwargs)
        arguments = dict(bound.arguments)
        model = arguments.pop(self_name)
        if var_positional is not None and arguments.pop(var_positional, ()):
            raise TypeError(f"{host_function.__name__}: extra positional arguments are not supported with qfusion")
        if var_keyword is not None:
            extra = arguments.pop(var_keyword, {})
            unknown = sorted(name for name in extra if name.startswith("qfusion_"))
            if unknown:
                raise TypeError(
                    f"{host_function.__name__}: unknown qfusion keyword {unknown[0]!r}; the qfusion parameters are "
                    f"{list(QFUSION_PARAMETERS)}"
                )
            arguments.update(extra)
        qfusion = QFusionArguments(*(arguments.pop(name, None) for name in QFUSION_PARAMETERS))
        return handler(model, arguments, qfusion)

    method.__signature__ = signature
    method.__name__ = host_function.__name__
    method.__qualname__ = f"qfusion.{host_function.__qualname__}"
    method.__doc__ = (inspect.getdoc(host_function) or "").rstrip() + "\n" + QFUSION_DOC
    method._qfusion_patch = True  # lets revert tell its own patch from a later one
    return method


def active_module(module: nn.Module) -> nn.Module:
    """The module that actually runs: peft's ``modules_to_save`` wrapper stands for its active copy."""
    while hasattr(module, "original_module") and hasattr(module, "modules_to_save"):
        active = getattr(module, "active_adapters", None)
        if active is None:  # peft releases that keep one active adapter name
            active = [module.active_adapter] if getattr(module, "active_adapter", None) else []
        if module.disable_adapters or not active:
            module = module.original_module
        else:
            module = module.modules_to_save[active[0]]
    return module


def unwrap_model(model: nn.Module) -> nn.Module:
    """The transformers host inside a peft model (or the model itself)."""
    get_base = getattr(model, "get_base_model", None)
    return get_base() if callable(get_base) else model


class _Missing:
    """Marks an instance attribute the host did not have before the patch (survives copy.deepcopy)."""

    def __deepcopy__(self, memo):
        return self

    def __repr__(self) -> str:
        return "<missing>"


_MISSING = _Missing()


class SaveExclusion:
    """The keys a host's ``save_pretrained`` skips: its own list plus everything under some submodules.

    Computed at save time, so it follows the modules (also when peft wraps them). It holds the model
    itself (not a weak reference) so that ``copy.deepcopy`` of the host points the copy at the copy.
    """

    def __init__(self, model: nn.Module, original, names: tuple[str, ...]):
        self._model = model
        self._original = set(original or ())
        self._names = names

    def _keys(self) -> set[str]:
        keys = set(self._original)
        for name in self._names:
            module = self._model._modules.get(name)
            if module is not None:
                keys.update(f"{name}.{k}" for k in module.state_dict())
        return keys

    def __iter__(self):
        return iter(sorted(self._keys()))

    def __len__(self) -> int:
        return len(self._keys())

    def __contains__(self, key) -> bool:
        return key in self._keys()


class InstancePatch:
    """Every change made to one model instance, recorded so that :meth:`revert` undoes it exactly."""

    def __init__(self, model: nn.Module):
        self.model = model
        self._attributes: dict[str, Any] = {}
        self._methods: list[str] = []
        self._modules: list[str] = []
        self._requires_grad = {name: p.requires_grad for name, p in model.named_parameters()}

    def set_requires_grad(self, parts: dict[str, bool]) -> None:
        """Freeze the whole model, then set ``requires_grad`` of each dotted module/parameter name."""
        model = self.model
        model.requires_grad_(False)
        for name, flag in parts.items():
            try:
                part = model.get_submodule(name)
            except AttributeError:
                part = model.get_parameter(name)
            part.requires_grad_(flag)

    def set_attribute(self, name: str, value) -> None:
        self._attributes.setdefault(name, self.model.__dict__.get(name, _MISSING))
        self.model.__dict__[name] = value

    def add_module(self, name: str, module: nn.Module) -> None:
        if name in self.model.__dict__ or name in self.model._modules:
            raise ValueError(f"model: already has {name!r}; qfusion.detach(model) first")
        self.model.add_module(name, module)
        self._modules.append(name)

    def exclude_from_save(self, names: tuple[str, ...]) -> None:
        """Make the host's own ``save_pretrained`` leave these submodules out."""
        original = getattr(self.model, "_keys_to_ignore_on_save", None)
        self.set_attribute("_keys_to_ignore_on_save", SaveExclusion(self.model, original, names))

    def patch_method(self, name: str, handler: Callable) -> None:
        """Replace the instance's ``name`` by a method derived from the class's own (see derive_method)."""
        method = derive_method(getattr(type(self.model), name), handler)
        self.set_attribute(name, MethodType(method, self.model))
        self._methods.append(name)

    def host_method(self, name: str) -> Callable:
        """The instance's ``name`` as it was before the patch, bound."""
        saved = self._attributes.get(name, _MISSING)
        return getattr(type(self.model), name).__get__(self.model) if saved is _MISSING else saved

    def check_revertible(self) -> None:
        for name in self._methods:
            current = self.model.__dict__.get(name)
            if not (getattr(current, "__self__", None) is self.model
                    and getattr(getattr(current, "__func__", None), "_qfusion_patch", False)):
                raise RuntimeError(
                    f"model.{name}: was replaced after qfusion.attach (e.g. by another library); undo that first"
                )

    def revert(self) -> None:
        """Undo every recorded change (attributes, methods, submodules, requires_grad flags)."""
        self.check_revertible()
        model = self.model
        for name, value in self._attributes.items():
            if value is _MISSING:
                model.__dict__.pop(name, None)
            else:
                model.__dict__[name] = value
        for name in self._modules:
            model._modules.pop(name, None)
        for name, p in model.named_parameters():
            if name in self._requires_grad:
                p.requires_grad_(self._requires_grad[name])
