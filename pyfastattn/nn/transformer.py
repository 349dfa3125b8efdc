"""Drop-in Transformer layers that run attention and the FFN on pyfastattn.

Each class subclasses its ``torch.nn`` namesake and calls the torch
constructor unchanged, so arguments, defaults, parameter initialisation (for
the same seed), attributes and ``state_dict`` keys are torch's. What changes:

* every ``torch.nn.MultiheadAttention`` the constructor builds becomes a
  :class:`pyfastattn.nn.MultiheadAttention` (same object, same parameters);
* the feed-forward block runs as one ``pyfastattn.ffn.feed_forward`` call when
  the activation is relu, gelu (erf or tanh) or silu (as a string, ``F.*``
  function or ``nn.ReLU``/``nn.GELU``/``nn.SiLU`` module), ``linear1`` and
  ``linear2`` are plain ``nn.Linear`` without hooks, and the inner dropout is
  inactive (eval mode or p = 0). Otherwise it runs ``linear2(dropout(act(
  linear1(x))))`` exactly as torch does;
* :class:`TransformerEncoder` never converts to NestedTensor. Torch does so in
  inference with a right-padded ``src_key_padding_mask``; we pass the padding
  to the kernel as per-batch key lengths instead (exact), and reproduce the
  visible effects of torch's path: padded positions come out as 0 before the
  final norm, and a float padding mask marks padding by being nonzero (a key
  with a finite negative value is dropped, as with -inf).

One deliberate difference: torch's fused encoder-layer path (eval mode,
no_grad) treats every nonzero value of a float mask as masked, where its
documented rule, and its other paths, add it; we always add it (the same
result for -inf and for large negative values such as -1e4).

Masks and ``is_causal`` follow torch's rules (bool True = masked, float added,
``is_causal`` a hint that the mask is causal; the encoder and decoder detect a
causal mask when the hint is None).
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .attention import MultiheadAttention, check_mask_type, right_padding_lengths
from .linear import Linear

__all__ = [
    "Transformer",
    "TransformerEncoder",
    "TransformerDecoder",
    "TransformerEncoderLayer",
    "TransformerDecoderLayer",
]


# ---------------------------------------------------------------------------
# helpers
# ---------------------------------------------------------------------------


def _adopt(module: nn.Module, cls: type[nn.Module]) -> None:
    """Turn a module of exactly ``cls``'s torch base class into ``cls`` in place.

    The pyfastattn classes add no state to their torch bases, so changing the
    class keeps every parameter, buffer, hook, device, dtype and training flag,
    and every outside reference to the module sees the new behaviour."""
    module.__class__ = cls


def _convert_children(parent: nn.Module) -> None:
    """Convert the torch attention/Transformer modules directly built by a
    torch constructor (exact types only) to their pyfastattn classes."""
    for m in parent.modules():
        target = _TORCH_TO_OURS.get(type(m))
        if target is not None:
            _adopt(m, target)


try:  # the fused FFN op (pyfastattn.ffn); the layers run unfused without it
    _ffn = importlib.import_module("..ffn", __package__)
except ModuleNotFoundError as e:
    if e.name != "pyfastattn.ffn":
        raise
    _ffn = None


def _ffn_op() -> Callable | None:
    """``pyfastattn.ffn.feed_forward``, looked up at call time, or None."""
    return None if _ffn is None else _ffn.feed_forward


_ACTIVATION_FUNCTIONS: dict[Any, str] = {F.relu: "relu", torch.relu: "relu", F.gelu: "gelu", F.silu: "silu"}


def fused_activation_name(activation: Any) -> str | None:
    """The fused FFN's name for an activation, or None when it has none."""
    if isinstance(activation, str):
        return activation if activation in ("relu", "gelu") else None
    if type(activation) is nn.ReLU:
        return "relu"
    if type(activation) is nn.SiLU:
        return "silu"
    if type(activation) is nn.GELU:
        return "gelu" if activation.approximate == "none" else "gelu_tanh"
    try:
        return _ACTIVATION_FUNCTIONS.get(activation)
    except TypeError:  # unhashable callable
        return None


def _plain_linear(m: Any) -> bool:
    # pyfastattn.nn.Linear (what patch makes of nn.Linear) computes the same
    # product and adds no state.
    return type(m) in (nn.Linear, Linear) and not (m._forward_hooks or m._forward_pre_hooks)


def ffn_unfused_reason(layer: nn.Module) -> str | None:
    """Why a layer's feed-forward block can't be one fused call (None when it can)."""
    if _ffn_op() is None:
        return "the fused FFN op (pyfastattn.ffn) is not available"
    if fused_activation_name(layer.activation) is None:
        return f"activation {layer.activation!r} is not relu, gelu, gelu-tanh or silu"
    if not (_plain_linear(layer.linear1) and _plain_linear(layer.linear2)):
        return "linear1/linear2 are not plain nn.Linear modules without hooks"
    return None


def _feed_forward(layer: nn.Module, x: Tensor) -> Tensor:
    """``linear2(dropout(activation(linear1(x))))``, fused where possible."""
    drop = layer.dropout
    unfused = (
        not isinstance(drop, nn.Dropout)
        or (drop.training and drop.p > 0)  # the inner dropout sits between the two GEMMs
        or torch.is_autocast_enabled(x.device.type)  # autocast chooses the GEMM dtypes
        or ffn_unfused_reason(layer) is not None
    )
    fn = None if unfused else _ffn_op()
    if fn is None:
        return layer.linear2(drop(layer.activation(layer.linear1(x))))
    l1, l2 = layer.linear1, layer.linear2
    return fn(x, l1.weight, l1.bias, l2.weight, l2.bias, activation=fused_activation_name(layer.activation))


def _get_seq_len(src: Tensor, batch_first: bool) -> int | None:
    if src.is_nested:
        return None
    if src.dim() == 2:  # unbatched (S, E)
        return src.shape[0]
    return src.shape[1 if batch_first else 0]


def _detect_is_causal_mask(mask: Tensor | None, is_causal: bool | None, size: int | None) -> bool:
    """torch's rule: a given hint wins; with None, check whether ``mask`` is the
    square causal mask of ``size`` (float -inf above the diagonal, or bool
    True above it)."""
    if is_causal is not None or mask is None:
        return is_causal is True
    sz = size if size is not None else mask.shape[-2]
    if tuple(mask.shape) != (sz, sz):
        return False
    upper = torch.ones(sz, sz, dtype=torch.bool, device=mask.device).triu(1)
    if mask.dtype == torch.bool:
        return bool((mask == upper).all())
    causal = torch.zeros(sz, sz, dtype=mask.dtype, device=mask.device).masked_fill(upper, float("-inf"))
    return bool((mask == causal).all())


def _left_aligned(src: Tensor, kpm: Tensor) -> bool:
    """torch's ``mask_check``: every row of ``kpm.logical_not()`` is a prefix of True."""
    if right_padding_lengths(kpm) is not None:  # cached; the common case
        return True
    return bool(torch._nested_tensor_from_mask_left_aligned(src, kpm.logical_not()))


def _canonical_mask(
    mask: Tensor | None, name: str, other: Tensor | None, other_name: str, dtype: torch.dtype
) -> Tensor | None:
    """torch's ``F._canonical_mask``: checks, then bool -> additive float (-inf = masked)."""
    check_mask_type(mask, name, other, other_name)
    if mask is None or mask.dtype != torch.bool:
        return mask
    return torch.zeros(mask.shape, dtype=dtype, device=mask.device).masked_fill_(mask, float("-inf"))


# ---------------------------------------------------------------------------
# layers
# ---------------------------------------------------------------------------


def _check_heads(d_model: int, nhead: int) -> None:
    """torch raises AssertionError here (from MultiheadAttention); same class,
    clearer message, before any parameter is allocated."""
    if d_model > 0 and nhead > 0 and d_model % nhead != 0:
        raise AssertionError(
            f"embed_dim must be divisible by num_heads, got d_model={d_model} and nhead={nhead}"
        )


class TransformerEncoderLayer(nn.TransformerEncoderLayer):
    """Drop-in for :class:`torch.nn.TransformerEncoderLayer` on pyfastattn
    attention and FFN (see the module docstring)."""

    def __init__(
        self,
        d_model: int,
        nhead: int,
        dim_feedforward: int = 2048,
        dropout: float = 0.1,
        activation: str | Callable[[Tensor], Tensor] = F.relu,
        layer_norm_eps: float = 1e-5,
        batch_first: bool = False,
        norm_first: bool = False,
        bias: bool = True,
        device=None,
        dtype=None,
    ) -> None:
        _check_heads(d_model, nhead)
        super().__init__(
            d_model,
            nhead,
            dim_feedforward,
            dropout,
            activation,
            layer_norm_eps,
            batch_first,
            norm_first,
            bias,
            device=device,
            dtype=dtype,
        )
        _convert_children(self)

    def forward(
        self,
        src: Tensor,
        src_mask: Tensor | None = None,
        src_key_padding_mask: Tensor | None = None,
        is_causal: bool = False,
    ) -> Tensor:
        """``src`` (S, N, E), (N, S, E) with ``batch_first``, or (S, E);
        ``src_mask`` (S, S) or (N*nhead, S, S); ``src_key_padding_mask`` (N, S)
        or (S,). Bool masks: True = masked; float masks are added."""
        if src.is_nested:  # torch's NestedTensor fast path
            return super().forward(src, src_mask, src_key_padding_mask, is_causal)
        kpm = _canonical_mask(src_key_padding_mask, "src_key_padding_mask", src_mask, "src_mask", src.dtype)
        src_mask = _canonical_mask(src_mask, "src_mask", None, "", src.dtype)
        x = src
        if self.norm_first:
            x = x + self._sa_block(self.norm1(x), src_mask, kpm, is_causal=is_causal)
            x = x + self._ff_block(self.norm2(x))
        else:
            x = self.norm1(x + self._sa_block(x, src_mask, kpm, is_causal=is_causal))
            x = self.norm2(x + self._ff_block(x))
        return x

    def _ff_block(self, x: Tensor) -> Tensor:
        return self.dropout2(_feed_forward(self, x))


class TransformerDecoderLayer(nn.TransformerDecoderLayer):
    """Drop-in for :class:`torch.nn.TransformerDecoderLayer` on pyfastattn
    attention and FFN (see the module docstring)."""

    def __init__(
        self,
        d_model: int,
        nhead: int,
        dim_feedforward: int = 2048,
        dropout: float = 0.1,
        activation: str | Callable[[Tensor], Tensor] = F.relu,
        layer_norm_eps: float = 1e-5,
        batch_first: bool = False,
        norm_first: bool = False,
        bias: bool = True,
        device=None,
        dtype=None,
    ) -> None:
        _check_heads(d_model, nhead)
        super().__init__(
            d_model,
            nhead,
            dim_feedforward,
            dropout,
            activation,
            layer_norm_eps,
            batch_first,
            norm_first,
            bias,
            device=device,
            dtype=dtype,
        )
        _convert_children(self)

    # forward, _sa_block and _mha_block are torch's (no fast path to avoid).

    def _ff_block(self, x: Tensor) -> Tensor:
        return self.dropout3(_feed_forward(self, x))


# ---------------------------------------------------------------------------
# stacks
# ---------------------------------------------------------------------------


class TransformerEncoder(nn.TransformerEncoder):
    """Drop-in for :class:`torch.nn.TransformerEncoder`. Copies of a given
    ``torch.nn.TransformerEncoderLayer`` (exact type) are converted to
    :class:`TransformerEncoderLayer`; other layer types are used as given."""

    def __init__(
        self,
        encoder_layer: nn.Module,
        num_layers: int,
        norm: nn.Module | None = None,
        enable_nested_tensor: bool = True,
        mask_check: bool = True,
    ) -> None:
        super().__init__(encoder_layer, num_layers, norm, enable_nested_tensor, mask_check)
        for layer in self.layers:
            if type(layer) in _TORCH_TO_OURS:  # a torch layer (and its attention), not a custom one
                _convert_children(layer)

    def forward(
        self,
        src: Tensor,
        mask: Tensor | None = None,
        src_key_padding_mask: Tensor | None = None,
        is_causal: bool | None = None,
    ) -> Tensor:
        """Same as :meth:`torch.nn.TransformerEncoder.forward`: ``src`` (S, N,
        E) / (N, S, E) / (S, E), ``mask`` (S, S) or (N*nhead, S, S),
        ``src_key_padding_mask`` (N, S) or (S,), ``is_causal`` a hint (None:
        detect a causal ``mask``)."""
        if src.is_nested:
            return super().forward(src, mask, src_key_padding_mask, is_causal)
        kpm = _canonical_mask(src_key_padding_mask, "src_key_padding_mask", mask, "mask", src.dtype)
        mask = _canonical_mask(mask, "mask", None, "", src.dtype)
        first = self.layers[0]
        batch_first = first.self_attn.batch_first
        is_causal = _detect_is_causal_mask(mask, is_causal, _get_seq_len(src, batch_first))
        zero_padded = self._torch_would_use_nested(src, mask, kpm)
        if zero_padded and kpm is not None and kpm.dtype != torch.bool:
            # torch's NestedTensor keeps the keys where the mask is 0 and drops
            # the rest: a finite negative float (-1e4, -2) is padding there too
            kpm = kpm != 0
        output = src
        for layer in self.layers:
            output = layer(output, src_mask=mask, is_causal=is_causal, src_key_padding_mask=kpm)
        if zero_padded:
            output = output.masked_fill((kpm != 0).unsqueeze(-1), 0.0)
        if self.norm is not None:
            output = self.norm(output)
        return output

    def _torch_would_use_nested(self, src: Tensor, mask: Tensor | None, kpm: Tensor | None) -> bool:
        """Whether torch's encoder would run on NestedTensor here (its
        'sparsity fast path'), whose visible effect is 0 at padded positions."""
        first = self.layers[0]
        if (
            kpm is None
            or mask is not None
            or src.dim() != 3
            or not getattr(self, "use_nested_tensor", False)
            or first.training
            or not torch.backends.mha.get_fastpath_enabled()
            or torch.is_autocast_enabled()
            or torch.compiler.is_compiling()
        ):
            return False
        if getattr(self, "mask_check", True) and not _left_aligned(src, kpm):
            return False
        try:
            args = (
                src,
                first.self_attn.in_proj_weight,
                first.self_attn.in_proj_bias,
                first.self_attn.out_proj.weight,
                first.self_attn.out_proj.bias,
                first.norm1.weight,
                first.norm1.bias,
                first.norm2.weight,
                first.norm2.bias,
                first.linear1.weight,
                first.linear1.bias,
                first.linear2.weight,
                first.linear2.bias,
            )
        except AttributeError:
            return False
        if src.device.type not in ("cpu", "cuda", "xpu"):
            return False
        return not (torch.is_grad_enabled() and any(a is not None and a.requires_grad for a in args))


class TransformerDecoder(nn.TransformerDecoder):
    """Drop-in for :class:`torch.nn.TransformerDecoder`. Copies of a given
    ``torch.nn.TransformerDecoderLayer`` (exact type) are converted to
    :class:`TransformerDecoderLayer`; other layer types are used as given.
    ``forward`` is torch's (it has no fast path to replace)."""

    def __init__(self, decoder_layer: nn.Module, num_layers: int, norm: nn.Module | None = None) -> None:
        super().__init__(decoder_layer, num_layers, norm)
        for layer in self.layers:
            if type(layer) in _TORCH_TO_OURS:  # a torch layer (and its attention), not a custom one
                _convert_children(layer)


class Transformer(nn.Transformer):
    """Drop-in for :class:`torch.nn.Transformer`: torch's constructor (same
    arguments, initialisation and ``state_dict``), with the encoder and
    decoder it builds converted to pyfastattn. A ``custom_encoder`` or
    ``custom_decoder`` is used as given. ``forward`` and
    ``generate_square_subsequent_mask`` are torch's."""

    def __init__(
        self,
        d_model: int = 512,
        nhead: int = 8,
        num_encoder_layers: int = 6,
        num_decoder_layers: int = 6,
        dim_feedforward: int = 2048,
        dropout: float = 0.1,
        activation: str | Callable[[Tensor], Tensor] = F.relu,
        custom_encoder: Any | None = None,
        custom_decoder: Any | None = None,
        layer_norm_eps: float = 1e-5,
        batch_first: bool = False,
        norm_first: bool = False,
        bias: bool = True,
        device=None,
        dtype=None,
    ) -> None:
        _check_heads(d_model, nhead)
        super().__init__(
            d_model,
            nhead,
            num_encoder_layers,
            num_decoder_layers,
            dim_feedforward,
            dropout,
            activation,
            custom_encoder,
            custom_decoder,
            layer_norm_eps,
            batch_first,
            norm_first,
            bias,
            device=device,
            dtype=dtype,
        )
        if custom_encoder is None:
            _convert_children(self.encoder)
        if custom_decoder is None:
            _convert_children(self.decoder)


_TORCH_TO_OURS: dict[type[nn.Module], type[nn.Module]] = {
    nn.MultiheadAttention: MultiheadAttention,
    nn.TransformerEncoderLayer: TransformerEncoderLayer,
    nn.TransformerDecoderLayer: TransformerDecoderLayer,
    nn.TransformerEncoder: TransformerEncoder,
    nn.TransformerDecoder: TransformerDecoder,
    nn.Transformer: Transformer,
}
