"""The backend rule, written once.

* ``auto`` (default): the fused kernel where it supports the call (on CUDA:
  once verified on that GPU), otherwise torch's own
  ``scaled_dot_product_attention`` where it expresses the call exactly,
  otherwise the reference path; each distinct reason is warned about once.
  The rule itself is ``pyfastattn.functional.decide_path``.
* ``kernel``: the fused kernel or a ``RuntimeError`` that says why not.
* ``reference``: always the pure-PyTorch reference.

Set it with ``PYFASTATTN_BACKEND``, :func:`set_backend`, or the
:func:`backend` context manager.
"""

from __future__ import annotations

import contextlib
import os
import warnings
from collections.abc import Iterator

BACKENDS = ("auto", "kernel", "reference")


def _validate(name: str, source: str) -> str:
    name = str(name).strip().lower()
    if name not in BACKENDS:
        raise ValueError(f"{source} must be one of {BACKENDS}, got {name!r}")
    return name


# A plain module-level dict: torch.compile guards on it, so switching backends
# recompiles instead of silently reusing a graph built for another backend.
_state = {"backend": _validate(os.environ.get("PYFASTATTN_BACKEND", "auto"), "PYFASTATTN_BACKEND")}
_warned: set[tuple[str, str]] = set()


def get_backend() -> str:
    """The current backend: ``"auto"``, ``"kernel"`` or ``"reference"``."""
    return _state["backend"]


def set_backend(name: str) -> None:
    """Set the backend for every later call (see the module docstring)."""
    _state["backend"] = _validate(name, "backend")


@contextlib.contextmanager
def backend(name: str) -> Iterator[None]:
    """``with pyfastattn.backend("reference"): ...`` sets the backend inside the block."""
    new = _validate(name, "backend")
    old = _state["backend"]
    _state["backend"] = new
    try:
        yield
    finally:
        _state["backend"] = old


def note_fallback(reason: str, target: str = "the reference path (slower)") -> None:
    """Warn once per distinct (target, reason) that ``auto`` did not run the
    fused kernel: it ran ``target`` instead (torch's own SDPA, or the reference)."""
    if (target, reason) in _warned:
        return
    _warned.add((target, reason))
    warnings.warn(
        f"pyfastattn: using {target} because {reason}. "
        "(Shown once per reason; pyfastattn.set_backend('kernel') makes it an error.)",
        stacklevel=4,
    )
