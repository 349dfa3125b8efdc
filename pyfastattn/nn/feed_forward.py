"""``FeedForward``: a drop-in FFN module over :mod:`pyfastattn.ffn`.

Parameter names follow the modules it replaces, so that weights load as they
are:

* plain  (``gated=False``): ``fc1`` and ``fc2``, two ``nn.Linear`` (the names
  of timm's ``Mlp`` and many Transformer codebases). From a
  ``nn.Sequential(Linear, act, Linear)``: :meth:`FeedForward.from_sequential`.
* gated  (``gated=True``): ``gate_proj``, ``up_proj``, ``down_proj``, the
  names of Hugging Face's ``LlamaMLP`` (and Mistral, Qwen2, Gemma ...), so
  ``ffn.load_state_dict(llama_mlp.state_dict())`` works directly;
  :meth:`FeedForward.from_llama_mlp` also reads the activation.

The ``nn.Linear`` submodules hold the parameters (initialised as
``nn.Linear`` does) but are never called: ``forward`` passes their weights to
the fused op.
"""

from __future__ import annotations

import torch
import torch.nn as nn

from .. import ffn as _ffn

__all__ = ["FeedForward"]

# Hugging Face config.hidden_act values whose function we compute exactly.
# gelu_new / gelu_fast / gelu_pytorch_tanh are all the tanh approximation.
_HF_ACTIVATIONS = {
    "silu": "silu",
    "swish": "silu",
    "relu": "relu",
    "gelu": "gelu",
    "gelu_python": "gelu",
    "gelu_new": "gelu_tanh",
    "gelu_fast": "gelu_tanh",
    "gelu_pytorch_tanh": "gelu_tanh",
}

# Activation modules by class name (torch.nn and transformers.activations).
_MODULE_ACTIVATIONS = {
    "SiLU": "silu",
    "SiLUActivation": "silu",
    "ReLU": "relu",
    "GELUActivation": "gelu",
    "NewGELUActivation": "gelu_tanh",
    "FastGELUActivation": "gelu_tanh",
    "PytorchGELUTanh": "gelu_tanh",
    "GELUTanh": "gelu_tanh",
}


def activation_of(module: nn.Module) -> str:
    """The pyfastattn activation name computed by an activation module.

    Raises ``ValueError`` for modules whose function the fused op does not
    compute (e.g. ``nn.Tanh``, HF ``QuickGELUActivation``).
    """
    if isinstance(module, nn.GELU):
        return "gelu_tanh" if module.approximate == "tanh" else "gelu"
    name = type(module).__name__
    if name in _MODULE_ACTIVATIONS:
        return _MODULE_ACTIVATIONS[name]
    raise ValueError(
        f"activation module {name} is not supported; supported: nn.GELU (either "
        f"approximation), {sorted(_MODULE_ACTIVATIONS)}"
    )


def _check_linear(m, name: str) -> nn.Linear:
    if not isinstance(m, nn.Linear):
        raise ValueError(f"{name} must be an nn.Linear, got {type(m).__name__}")
    return m


class FeedForward(nn.Module):
    """Fused feed-forward network, plain or gated.

    plain: ``y = fc2(act(fc1(x)))``; gated:
    ``y = down_proj(act(gate_proj(x)) * up_proj(x))``; then dropout on the
    output, in training only. ``x`` [..., d_model] -> [..., d_model].

    Args:
        d_model: input and output features.
        d_ff: hidden features (LLaMA's ``intermediate_size``).
        activation: "gelu" (exact, erf), "gelu_tanh", "relu" or "silu".
        gated: the gated (GLU) form with gate/up/down projections.
        bias: biases on every projection (LLaMA: ``mlp_bias``).
        dropout: probability of the output dropout.
        device, dtype: of the parameters.
        recompute: save only ``x`` for the backward and recompute the first
            GEMM(s) there: less memory, one (gated: two) extra GEMM.
    """

    def __init__(
        self,
        d_model: int,
        d_ff: int,
        activation: str = "gelu",
        gated: bool = False,
        bias: bool = True,
        dropout: float = 0.0,
        device=None,
        dtype=None,
        *,
        recompute: bool = False,
    ) -> None:
        super().__init__()
        if activation not in _ffn.ACTIVATIONS:
            raise ValueError(f"activation must be one of {list(_ffn.ACTIVATIONS)}, got {activation!r}")
        if not 0.0 <= dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {dropout}")
        if d_model <= 0 or d_ff <= 0:
            raise ValueError(f"d_model and d_ff must be positive, got {d_model} and {d_ff}")
        kw = {"device": device, "dtype": dtype}
        self.d_model = d_model
        self.d_ff = d_ff
        self.activation = activation
        self.gated = gated
        self.recompute = recompute
        if gated:
            self.gate_proj = nn.Linear(d_model, d_ff, bias=bias, **kw)
            self.up_proj = nn.Linear(d_model, d_ff, bias=bias, **kw)
            self.down_proj = nn.Linear(d_ff, d_model, bias=bias, **kw)
        else:
            self.fc1 = nn.Linear(d_model, d_ff, bias=bias, **kw)
            self.fc2 = nn.Linear(d_ff, d_model, bias=bias, **kw)
        self.dropout = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.gated:
            y = _ffn.gated_feed_forward(
                x,
                self.gate_proj.weight,
                self.up_proj.weight,
                self.down_proj.weight,
                self.gate_proj.bias,
                self.up_proj.bias,
                self.down_proj.bias,
                activation=self.activation,
                recompute=self.recompute,
            )
        else:
            y = _ffn.feed_forward(
                x,
                self.fc1.weight,
                self.fc1.bias,
                self.fc2.weight,
                self.fc2.bias,
                activation=self.activation,
                recompute=self.recompute,
            )
        if self.dropout.p > 0:
            y = self.dropout(y)  # identity in eval mode
        return y

    def extra_repr(self) -> str:
        return (
            f"d_model={self.d_model}, d_ff={self.d_ff}, activation={self.activation!r}, "
            f"gated={self.gated}, recompute={self.recompute}"
        )

    # ---- conversion helpers ---------------------------------------------

    @classmethod
    def from_sequential(cls, seq: nn.Sequential, *, recompute: bool = False) -> FeedForward:
        """A plain FeedForward with the weights (copied) of a
        ``nn.Sequential(Linear, act, Linear)`` stack.

        Accepted layouts: ``Linear, act, [Dropout(0) | Identity], Linear,
        [Dropout(p)]``; a trailing ``Dropout(p)`` becomes the output dropout.
        ``act`` is ``nn.GELU`` (either approximation), ``nn.ReLU``,
        ``nn.SiLU`` or a Hugging Face activation module of those functions.
        The result has the first Linear's device and dtype and the stack's
        training mode.
        """
        mods = list(seq)
        dropout = 0.0
        if mods and isinstance(mods[-1], nn.Dropout):
            dropout = mods.pop().p
        mods = [m for m in mods if not isinstance(m, nn.Identity)]
        for i, m in enumerate(mods):
            if isinstance(m, nn.Dropout):
                if m.p > 0:
                    raise ValueError(
                        f"from_sequential: FeedForward applies dropout to the output only, "
                        f"got Dropout(p={m.p}) at position {i} inside the stack"
                    )
        mods = [m for m in mods if not isinstance(m, nn.Dropout)]
        if len(mods) != 3:
            raise ValueError(
                "from_sequential expects Linear, activation, Linear (plus optional Dropout/"
                f"Identity), got {[type(m).__name__ for m in seq]}"
            )
        fc1 = _check_linear(mods[0], "seq[0]")
        activation = activation_of(mods[1])
        fc2 = _check_linear(mods[2], "the last Linear of seq")
        if fc2.in_features != fc1.out_features or fc2.out_features != fc1.in_features:
            raise ValueError(
                f"from_sequential: expected Linear({fc1.in_features}, d_ff) then "
                f"Linear(d_ff, {fc1.in_features}), got Linear({fc1.in_features}, "
                f"{fc1.out_features}) then Linear({fc2.in_features}, {fc2.out_features})"
            )
        if (fc1.bias is None) != (fc2.bias is None):
            raise ValueError("from_sequential: both Linears must have a bias, or neither")
        w = fc1.weight
        ffn = cls(
            fc1.in_features,
            fc1.out_features,
            activation,
            gated=False,
            bias=fc1.bias is not None,
            dropout=dropout,
            device=w.device,
            dtype=w.dtype,
            recompute=recompute,
        )
        ffn.fc1.load_state_dict(fc1.state_dict())
        ffn.fc2.load_state_dict(fc2.state_dict())
        return ffn.train(seq.training)

    @classmethod
    def from_llama_mlp(
        cls, mlp: nn.Module, *, activation: str | None = None, recompute: bool = False
    ) -> FeedForward:
        """A gated FeedForward with the weights (copied) of a Hugging Face
        ``LlamaMLP``-style module.

        Reads ``mlp.gate_proj``, ``mlp.up_proj``, ``mlp.down_proj`` (nn.Linear)
        and the activation: ``activation`` if given, else
        ``mlp.config.hidden_act`` (silu, gelu, gelu_pytorch_tanh, gelu_new,
        relu, ...), else the class of ``mlp.act_fn``. Since the parameter names
        are the same, ``ffn.load_state_dict(mlp.state_dict())`` also works.
        """
        gate = _check_linear(getattr(mlp, "gate_proj", None), "mlp.gate_proj")
        up = _check_linear(getattr(mlp, "up_proj", None), "mlp.up_proj")
        down = _check_linear(getattr(mlp, "down_proj", None), "mlp.down_proj")
        if activation is None:
            hidden_act = getattr(getattr(mlp, "config", None), "hidden_act", None)
            if isinstance(hidden_act, str):
                if hidden_act not in _HF_ACTIVATIONS:
                    raise ValueError(
                        f"from_llama_mlp: config.hidden_act {hidden_act!r} is not supported; "
                        f"supported: {sorted(_HF_ACTIVATIONS)}"
                    )
                activation = _HF_ACTIVATIONS[hidden_act]
            elif isinstance(getattr(mlp, "act_fn", None), nn.Module):
                activation = activation_of(mlp.act_fn)
            else:
                raise ValueError(
                    "from_llama_mlp: pass activation=..., the module has neither "
                    "config.hidden_act nor an act_fn module"
                )
        if up.weight.shape != gate.weight.shape:
            raise ValueError(
                f"from_llama_mlp: up_proj.weight must have gate_proj.weight's shape "
                f"{tuple(gate.weight.shape)}, got {tuple(up.weight.shape)}"
            )
        if down.in_features != gate.out_features or down.out_features != gate.in_features:
            raise ValueError(
                f"from_llama_mlp: down_proj must be Linear({gate.out_features}, "
                f"{gate.in_features}), got Linear({down.in_features}, {down.out_features})"
            )
        has_bias = [m.bias is not None for m in (gate, up, down)]
        if len(set(has_bias)) != 1:
            raise ValueError(
                f"from_llama_mlp: gate/up/down_proj must all have a bias or none, got {has_bias}"
            )
        w = gate.weight
        ffn = cls(
            gate.in_features,
            gate.out_features,
            activation,
            gated=True,
            bias=has_bias[0],
            device=w.device,
            dtype=w.dtype,
            recompute=recompute,
        )
        for name in ("gate_proj", "up_proj", "down_proj"):
            getattr(ffn, name).load_state_dict(getattr(mlp, name).state_dict())
        return ffn.train(mlp.training)
