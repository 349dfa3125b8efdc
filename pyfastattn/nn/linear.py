"""Drop-in :class:`torch.nn.Linear` on :func:`pyfastattn.linear`.

:class:`Linear` subclasses ``torch.nn.Linear`` and adds no state: same
constructor, parameters, initialisation and ``state_dict``; its ``forward`` is
``pyfastattn.linear(input, weight, bias)``, i.e. ``F.linear`` itself except
for fp32 / fp16 CPU products that pyfastattn's own GEMM computes faster (fp32
on AMD CPUs with AVX-512, fp16 on any AVX-512 CPU; ``PYFASTATTN_CPU_FFN_GEMM``).
:func:`pyfastattn.patch` turns a model's ``nn.Linear`` modules into it.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .._linear import linear

__all__ = ["Linear"]


class Linear(nn.Linear):
    """``torch.nn.Linear`` whose product runs through :func:`pyfastattn.linear`.
    Under TorchScript (``torch.jit.script`` / ``trace``) and ``torch.fx``
    symbolic tracing it is ``F.linear``, so a patched model still scripts,
    traces and exports."""

    def forward(self, input: Tensor) -> Tensor:  # noqa: A002  (torch's argument name)
        if torch.jit.is_scripting() or torch.jit.is_tracing():
            return F.linear(input, self.weight, self.bias)
        return self._pfa_linear(input)

    @torch.jit.unused
    def _pfa_linear(self, input: Tensor) -> Tensor:  # noqa: A002
        if _fx_symbolic_tracing():
            return F.linear(input, self.weight, self.bias)
        return linear(input, self.weight, self.bias)


def _fx_symbolic_tracing() -> bool:
    """Whether torch.fx.symbolic_trace is tracing. ``is_fx_symbolic_tracing``
    where torch has it: its older ``is_fx_tracing`` logs a deprecation warning
    (on a patched model's first call); torch.export and torch.compile are
    F.linear in pyfastattn.linear anyway."""
    st = torch.fx._symbolic_trace
    fn = getattr(st, "is_fx_symbolic_tracing", None)
    return fn() if fn is not None else st.is_fx_tracing()
