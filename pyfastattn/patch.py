"""``pyfastattn.patch(model)``: convert an existing model to pyfastattn in place.

Every module whose type is exactly ``torch.nn.MultiheadAttention``,
``TransformerEncoderLayer``, ``TransformerDecoderLayer``,
``TransformerEncoder``, ``TransformerDecoder`` or ``Transformer`` becomes its
:mod:`pyfastattn.nn` counterpart. The pyfastattn classes subclass the torch
ones and add no state, so the conversion changes only the module's class: the
module object, its parameters (and so any optimizer holding them), buffers,
hooks, device, dtype and training flag all stay as they were, and ``isinstance(
m, torch.nn.MultiheadAttention)`` stays true.

Left alone, each with the reason in the report: subclasses of those torch
classes (they carry their own code) and TorchScript-compiled modules. Hugging
Face models are listed too, with the way in that fits them
(``attn_implementation="pyfastattn"``, see
:mod:`pyfastattn.integrations.transformers`); torch modules inside them are
still converted.

    model = pyfastattn.patch(model)                          # the model, patched
    model, report = pyfastattn.patch(model, return_report=True)
    print(report)                                            # what changed and why not

The report is also logged at INFO level on the ``pyfastattn`` logger.
"""

from __future__ import annotations

import dataclasses
import logging

import torch
from torch import nn

from .nn.transformer import _TORCH_TO_OURS, ffn_unfused_reason

__all__ = ["patch", "PatchReport"]

_log = logging.getLogger("pyfastattn")


@dataclasses.dataclass
class PatchReport:
    """What :func:`patch` did. ``replaced``: (qualified name, torch class,
    pyfastattn class, note) per converted module, the note saying what still
    runs in plain torch ("" when nothing). ``left_alone``: (qualified name,
    class, reason). The root module's name is ``""``."""

    replaced: list[tuple[str, str, str, str]] = dataclasses.field(default_factory=list)
    left_alone: list[tuple[str, str, str]] = dataclasses.field(default_factory=list)

    def __str__(self) -> str:
        lines = [
            f"pyfastattn.patch: replaced {len(self.replaced)} module(s), left {len(self.left_alone)} alone"
        ]
        for name, old, new, note in self.replaced:
            lines.append(f"  replaced   {name or '<root>'}: {old} -> {new}" + (f" ({note})" if note else ""))
        for name, cls, why in self.left_alone:
            lines.append(f"  left alone {name or '<root>'}: {cls}: {why}")
        return "\n".join(lines)


def _qualname(cls: type) -> str:
    return f"{cls.__module__}.{cls.__qualname__}"


def _under(name: str, prefix: str) -> bool:
    """Whether module ``name`` is ``prefix`` or inside it ("" is the root)."""
    return prefix == "" or name == prefix or name.startswith(prefix + ".")


def _is_hf_model(m: nn.Module) -> bool:
    return hasattr(m, "set_attn_implementation") and hasattr(
        getattr(m, "config", None), "_attn_implementation"
    )


def patch(model: nn.Module, *, return_report: bool = False):
    """Convert ``model``'s torch attention and Transformer modules to
    pyfastattn in place (see the module docstring).

    Returns ``model``, or ``(model, report)`` with ``return_report=True``
    (a :class:`PatchReport`; ``str(report)`` is a readable summary).
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"patch expects a torch.nn.Module, got {type(model).__name__}")
    report = PatchReport()
    ours = tuple(_TORCH_TO_OURS.values())
    torch_bases = tuple(_TORCH_TO_OURS)
    torch_names = {c.__name__ for c in torch_bases}
    skipped_prefixes: list[str] = []
    hf_models: list[str] = []
    for name, m in model.named_modules():
        if any(_under(name, p) for p in skipped_prefixes):
            continue
        cls = type(m)
        target = _TORCH_TO_OURS.get(cls)
        if target is not None:
            m.__class__ = target
            note = ""
            if hasattr(m, "linear1") and hasattr(m, "activation"):
                why = ffn_unfused_reason(m)
                note = f"FFN runs unfused in torch: {why}" if why else ""
            report.replaced.append((name, _qualname(cls), _qualname(target), note))
        elif isinstance(m, ours):
            report.left_alone.append((name, _qualname(cls), "already a pyfastattn module"))
        elif isinstance(m, torch_bases):
            report.left_alone.append(
                (
                    name,
                    _qualname(cls),
                    "a subclass of a torch class with its own code; converting it could change what it computes",
                )
            )
        elif isinstance(m, torch.jit.ScriptModule) and getattr(m, "original_name", None) in torch_names:
            report.left_alone.append(
                (name, _qualname(cls), "TorchScript-compiled module; it can't be converted")
            )
            skipped_prefixes.append(name)
        elif _is_hf_model(m) and not any(_under(name, p) for p in hf_models):
            hf_models.append(name)
            report.left_alone.append(
                (
                    name,
                    _qualname(cls),
                    "a Hugging Face model: call pyfastattn.integrations.transformers.register(), then "
                    "model.set_attn_implementation('pyfastattn') or from_pretrained(..., "
                    "attn_implementation='pyfastattn')",
                )
            )
    _log.info("%s", report)
    return (model, report) if return_report else model
