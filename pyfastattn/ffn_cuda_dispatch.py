"""Dispatch table of the CUDA feed-forward network: generated, do not edit.

Written by ``python benchmarks/ffn_bench.py --device cuda --write-dispatch``
from timings of both CUDA paths in the same run: ``fused`` (our tensor-core
GEMMs with the bias/activation/gate step in their epilogues) and ``cublas``
(cuBLAS GEMMs plus our fused elementwise kernel). ``TABLE`` maps a device name
(``torch.cuda.get_device_name()``) to rules; the first rule matching a call's
``gated``, ``tokens <= max_tokens`` and ``d_model <= max_d_model`` (-1: no
bound) gives the path of its forward (``fwd``) and backward (``bwd``). Each
rule keeps the measurement it came from. A device with no entry gets the
default, ``fused`` everywhere, which is unmeasured.
"""

TABLE: dict = {}
