"""``pyfastattn.patch(model)``: convert an existing model to pyfastattn in place.

Every module whose type is exactly ``torch.nn.MultiheadAttention``,
``TransformerEncoderLayer``, ``TransformerDecoderLayer``,
``TransformerEncoder``, ``TransformerDecoder`` or ``Transformer`` becomes its
:mod:`pyfastattn.nn` counterpart. The pyfastattn classes subclass the torch
ones and add no state, so the conversion changes only the module's class: the
module object, its parameters (and so any optimizer holding them), buffers,
hooks, device, dtype and training flag all stay as they were, and ``isinstance(
m, torch.nn.MultiheadAttention)`` stays true.

With ``linear=True`` (the default) every module whose type is exactly
``torch.nn.Linear`` becomes :class:`pyfastattn.nn.Linear` the same way (its
product through :func:`pyfastattn.linear`: pyfastattn's own CPU GEMM for
fp32 on AMD and fp16 on AVX-512 CPUs, ``F.linear`` everywhere else), Hugging
Face models' layers included; the report counts them in one line. Pass
``linear=False`` to keep them torch's (e.g. for tools that match
``type(m) is nn.Linear``, such as ``torch.ao.quantization.quantize_dynamic``).

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

from . import functional as _functional
from .nn.linear import Linear
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
    linears: int = 0
    """How many ``torch.nn.Linear`` modules became ``pyfastattn.nn.Linear``."""
    unfused: list[str] = dataclasses.field(default_factory=list)
    """What the converted modules still run outside the fused kernels, and why
    (one entry per distinct cause; empty when everything runs fused)."""

    def __str__(self) -> str:
        lines = [
            f"pyfastattn.patch: replaced {len(self.replaced)} module(s), left {len(self.left_alone)} alone"
        ]
        for name, old, new, note in self.replaced:
            lines.append(f"  replaced   {name or '<root>'}: {old} -> {new}" + (f" ({note})" if note else ""))
        for name, cls, why in self.left_alone:
            lines.append(f"  left alone {name or '<root>'}: {cls}: {why}")
        if self.linears:
            lines.append(
                f"  replaced   {self.linears} torch.nn.Linear -> pyfastattn.nn.Linear "
                "(fp32 / fp16 CPU products on pyfastattn's GEMM where it is the faster one)"
            )
        if not self.replaced:
            lines.append(
                "still unfused: everything (no attention or Transformer module was converted)"
                if self.linears
                else "still unfused: everything (no module was converted)"
            )
        elif self.unfused:
            lines.append("still unfused: " + "; ".join(self.unfused))
        else:
            lines.append("still unfused: nothing (attention and FFN of every converted module run fused)")
        return "\n".join(lines)


def _unfused_causes(model: nn.Module, converted: list[nn.Module]) -> list[str]:
    """What the converted modules still run outside the fused kernels, and why."""
    causes: list[str] = []

    def add(cause: str) -> None:
        if cause not in causes:
            causes.append(cause)

    layer_attn = {
        id(getattr(m, n)) for m in converted for n in ("self_attn", "multihead_attn") if hasattr(m, n)
    }
    for m in converted:
        if isinstance(m, nn.MultiheadAttention):
            # Attention dropout runs inside the kernel (issue 17): not a cause.
            if id(m) not in layer_attn:
                add(
                    "MultiheadAttention called with need_weights=True (torch's default for a bare "
                    "MultiheadAttention) computes the weights explicitly; pass need_weights=False"
                )
        if hasattr(m, "linear1") and hasattr(m, "activation"):
            why = ffn_unfused_reason(m)
            if why:
                add(f"FFN: {why}")
            if isinstance(m.dropout, nn.Dropout) and m.dropout.p > 0:
                add(f"FFN dropout (p={m.dropout.p:g}) while training: the FFN runs as separate torch ops")
    devices = {(p.device.type, p.dtype) for p in model.parameters() if p.is_floating_point()}
    for dev, dtype in sorted(devices, key=str):
        if dev == "meta":
            continue
        path, why = _functional.auto_path(dev, dtype)
        if path != "kernel":
            add(f"attention on {dev} in {dtype} runs {_functional.describe_path(path, why)}")
    return causes


def _qualname(cls: type) -> str:
    return f"{cls.__module__}.{cls.__qualname__}"


def _under(name: str, prefix: str) -> bool:
    """Whether module ``name`` is ``prefix`` or inside it ("" is the root)."""
    return prefix == "" or name == prefix or name.startswith(prefix + ".")


def _is_hf_model(m: nn.Module) -> bool:
    return hasattr(m, "set_attn_implementation") and hasattr(
        getattr(m, "config", None), "_attn_implementation"
    )


def patch(model: nn.Module, *, return_report: bool = False, linear: bool = True):
    """Convert ``model``'s torch attention and Transformer modules (and, with
    ``linear``, its ``nn.Linear`` modules) to pyfastattn in place (see the
    module docstring).

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
    converted: list[nn.Module] = []
    for name, m in model.named_modules():
        if any(_under(name, p) for p in skipped_prefixes):
            continue
        cls = type(m)
        target = _TORCH_TO_OURS.get(cls)
        if linear and cls is nn.Linear:
            m.__class__ = Linear
            report.linears += 1
        elif target is not None:
            m.__class__ = target
            converted.append(m)
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
    report.unfused = _unfused_causes(model, converted)
    _log.info("%s", report)
    return (model, report) if return_report else model
