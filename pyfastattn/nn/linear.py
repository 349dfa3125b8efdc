"""Drop-in :class:`torch.nn.Linear` on :func:`pyfastattn.linear`.

:class:`Linear` subclasses ``torch.nn.Linear`` and adds no state: same
constructor, parameters, initialisation and ``state_dict``; its ``forward`` is
``pyfastattn.linear(input, weight, bias)``, i.e. ``F.linear`` itself except
for fp32 / fp16 CPU products that pyfastattn's own GEMM computes faster (fp32
on AMD CPUs with AVX-512, fp16 on any AVX-512 CPU; ``PYFASTATTN_CPU_FFN_GEMM``).
:func:`pyfastattn.patch` turns a model's ``nn.Linear`` modules into it.
"""

from __future__ import annotations

from torch import Tensor, nn

from .._linear import linear

__all__ = ["Linear"]


class Linear(nn.Linear):
    """``torch.nn.Linear`` whose product runs through :func:`pyfastattn.linear`."""

    def forward(self, input: Tensor) -> Tensor:  # noqa: A002  (torch's argument name)
        return linear(input, self.weight, self.bias)
