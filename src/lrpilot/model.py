"""A LLaMA-style decoder in one file: RMSNorm, rotary position embeddings, SwiGLU MLP, causal SDPA attention,
no biases, untied input embedding and lm_head. Shapes come from `lrpilot.config.ModelConfig` (GaLore/CoLA
field names); parameter names and count equal HF `LlamaForCausalLM` with the same fields and untied embeddings
(`hf_state_dict` only adds HF's "model." prefix).

    python -m lrpilot.model --preset llama_60m        # prints the parameter count

Speed notes (benchmarks/throughput.py measures the model against HF on CPU; see benchmarks/README.md):
- RoPE uses HF's rotate_half convention (dimension i pairs with i + head_dim/2), so weights map 1:1. It is a
  small autograd Function: the rotation's gradient is the inverse rotation, 3 tensor passes each way instead of
  the ~10 that autograd records for slice/neg/cat/mul. cos/sin are computed once and kept as buffers.
- RMSNorm is a small autograd Function too, with its gradient written out (half the tensor passes).
- Kept simple on purpose, because they measured no faster on CPU at these sizes: separate q/k/v and gate/up
  projections (fused ones need a concatenated gradient), SDPA's flash kernel (an explicit softmax attention was
  slower), in-place residual adds, and running the batch in cache-sized chunks.
"""

from __future__ import annotations

import argparse
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from lrpilot.config import ModelConfig


class _RMSNorm(torch.autograd.Function):
    """y = weight * x * rstd with rstd = 1 / sqrt(mean(x^2) + eps), statistics in float32 (as HF LlamaRMSNorm).
    Written out because autograd records about twice as many tensor passes for the composite. With
    xhat = x * rstd and gw = g * weight:  dx = rstd * (gw - xhat * mean(gw * xhat)),  dweight = sum(g * xhat).
    """

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
        xf = _upcast(x)  # a no-op in fp32; bf16 activations keep the normalisation's precision
        rstd = torch.rsqrt(xf.pow(2).mean(-1, keepdim=True).add_(eps))
        xhat = (xf * rstd).to(x.dtype)
        ctx.save_for_backward(xhat, rstd, weight)
        return weight * xhat

    @staticmethod
    def backward(ctx: Any, g: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, None]:
        xhat, rstd, weight = ctx.saved_tensors
        dweight = (g * xhat).sum(tuple(range(g.ndim - 1)))
        gw = _upcast(g * weight)
        dx = torch.addcmul(gw, xhat, (gw * xhat).mean(-1, keepdim=True), value=-1).mul_(rstd)
        return dx.to(xhat.dtype), dweight.to(weight.dtype), None


def _upcast(t: torch.Tensor) -> torch.Tensor:
    return t.float() if t.dtype in (torch.float16, torch.bfloat16) else t


class RMSNorm(nn.Module):
    """y = weight * x / rms(x) over the last dimension."""

    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return _RMSNorm.apply(x, self.weight, self.eps)


def rope_cache(head_dim: int, max_len: int, theta: float) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and sin of shape [max_len, head_dim / 2]: angle(t, i) = t * theta^(-2i / head_dim), as HF computes it."""
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim))
    angles = torch.arange(max_len, dtype=torch.float32)[:, None] * inv_freq[None, :]
    return angles.cos(), angles.sin()


class _Rope(torch.autograd.Function):
    """y = x * cos2 + roll(x, D/2) * sin2, the rotate_half rotation with cos2 = [cos, cos], sin2 = [-sin, sin]
    (roll(x, D/2) = [x2, x1], so roll(x) * sin2 = [-x2, x1] * [sin, sin]). Its gradient is the transposed
    rotation: g * cos2 + roll(g * sin2, D/2)."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, cos2: torch.Tensor, sin2: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(cos2, sin2)
        return torch.mul(x, cos2).addcmul_(x.roll(x.size(-1) // 2, -1), sin2)

    @staticmethod
    def backward(ctx: Any, g: torch.Tensor) -> tuple[torch.Tensor, None, None]:
        cos2, sin2 = ctx.saved_tensors
        return (g * sin2).roll(g.size(-1) // 2, -1).addcmul_(g, cos2), None, None


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate pairs (i, i + D/2) of the last dimension of x by angles with cos/sin [..., D/2] (broadcast to x's
    leading dimensions). Equal to HF's x * cat(cos, cos) + rotate_half(x) * cat(sin, sin)."""
    return _Rope.apply(x, torch.cat((cos, cos), -1), torch.cat((-sin, sin), -1))


class Attention(nn.Module):
    """Multi-head causal self-attention with RoPE on q and k; no biases."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.n_head = cfg.num_attention_heads
        self.head_dim = cfg.hidden_size // cfg.num_attention_heads
        self.q_proj = nn.Linear(cfg.hidden_size, cfg.hidden_size, bias=False)
        self.k_proj = nn.Linear(cfg.hidden_size, cfg.hidden_size, bias=False)
        self.v_proj = nn.Linear(cfg.hidden_size, cfg.hidden_size, bias=False)
        self.o_proj = nn.Linear(cfg.hidden_size, cfg.hidden_size, bias=False)

    def forward(self, x: torch.Tensor, cos2: torch.Tensor, sin2: torch.Tensor) -> torch.Tensor:
        B, T, C = x.shape
        shape = (B, T, self.n_head, self.head_dim)
        # rotate in [B, T, H, D] (cos2/sin2 are [T, 1, D]), then view as [B, H, T, D] for SDPA
        q = _Rope.apply(self.q_proj(x).view(shape), cos2, sin2).transpose(1, 2)
        k = _Rope.apply(self.k_proj(x).view(shape), cos2, sin2).transpose(1, 2)
        v = self.v_proj(x).view(shape).transpose(1, 2)
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        return self.o_proj(y.transpose(1, 2).reshape(B, T, C))


class MLP(nn.Module):
    """SwiGLU: down(silu(gate(x)) * up(x))."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.gate_proj = nn.Linear(cfg.hidden_size, cfg.intermediate_size, bias=False)
        self.up_proj = nn.Linear(cfg.hidden_size, cfg.intermediate_size, bias=False)
        self.down_proj = nn.Linear(cfg.intermediate_size, cfg.hidden_size, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class Block(nn.Module):
    """Pre-norm decoder layer: x + attn(norm(x)), then x + mlp(norm(x))."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.self_attn = Attention(cfg)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.mlp = MLP(cfg)

    def forward(self, x: torch.Tensor, cos2: torch.Tensor, sin2: torch.Tensor) -> torch.Tensor:
        x = x + self.self_attn(self.input_layernorm(x), cos2, sin2)
        return x + self.mlp(self.post_attention_layernorm(x))


class LLaMA(nn.Module):
    """LLaMA decoder: idx [B, T] -> (logits [B, T, vocab], mean cross-entropy against targets or None)."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleList(Block(cfg) for _ in range(cfg.num_hidden_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.lm_head = nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False)
        cos, sin = rope_cache(cfg.hidden_size // cfg.num_attention_heads, cfg.max_sequence_length, cfg.rope_theta)
        # [T, 1, D] for _Rope (broadcast over heads); not persistent: derived from the config, never in checkpoints
        self.register_buffer("rope_cos2", torch.cat((cos, cos), -1)[:, None], persistent=False)
        self.register_buffer("rope_sin2", torch.cat((-sin, sin), -1)[:, None], persistent=False)
        self.apply(self._init_weights)

    def _init_weights(self, module: nn.Module) -> None:
        # HF LlamaPreTrainedModel: every Linear and Embedding ~ N(0, initializer_range); RMSNorm weights stay 1
        if isinstance(module, (nn.Linear, nn.Embedding)):
            nn.init.normal_(module.weight, mean=0.0, std=self.cfg.initializer_range)

    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters())

    def forward(
        self, idx: torch.Tensor, targets: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        T = idx.size(1)
        if self.cfg.max_sequence_length < T:
            raise ValueError(f"sequence length {T} > model.max_sequence_length ({self.cfg.max_sequence_length})")
        x = self.embed_tokens(idx)
        # under bf16 autocast q/k come out in bf16; rotate them in bf16 too instead of promoting to fp32
        dtype = torch.get_autocast_dtype(x.device.type) if torch.is_autocast_enabled(x.device.type) else x.dtype
        cos2, sin2 = self.rope_cos2[:T].to(dtype), self.rope_sin2[:T].to(dtype)
        for layer in self.layers:
            x = layer(x, cos2, sin2)
        logits = self.lm_head(self.norm(x))
        loss = None
        if targets is not None:
            loss = F.cross_entropy(logits.view(-1, logits.size(-1)).float(), targets.reshape(-1))
        return logits, loss


# ------------------------------------------------------------------------- HF transformers interop


def hf_config(cfg: ModelConfig) -> Any:
    """The transformers `LlamaConfig` with the same shape (untied embeddings, no biases)."""
    try:
        from transformers import LlamaConfig
    except ImportError as e:
        raise ImportError("HF interop needs transformers: pip install 'lrpilot[c4]'") from e
    return LlamaConfig(
        vocab_size=cfg.vocab_size,
        hidden_size=cfg.hidden_size,
        intermediate_size=cfg.intermediate_size,
        num_hidden_layers=cfg.num_hidden_layers,
        num_attention_heads=cfg.num_attention_heads,
        num_key_value_heads=cfg.num_attention_heads,
        max_position_embeddings=cfg.max_sequence_length,
        rms_norm_eps=cfg.rms_norm_eps,
        initializer_range=cfg.initializer_range,
        rope_theta=cfg.rope_theta,
        hidden_act="silu",
        tie_word_embeddings=False,
        attention_bias=False,
        mlp_bias=False,
        pad_token_id=None,
    )


def hf_state_dict(model: LLaMA) -> dict[str, torch.Tensor]:
    """This model's weights under transformers LlamaForCausalLM names (the same names under "model.")."""
    return {(k if k == "lm_head.weight" else f"model.{k}"): v for k, v in model.state_dict().items()}


def load_hf_state_dict(model: LLaMA, hf: dict[str, torch.Tensor]) -> None:
    """Load weights saved by transformers LlamaForCausalLM (e.g. a GaLore/CoLA checkpoint) into this model."""
    model.load_state_dict({k.removeprefix("model."): v for k, v in hf.items() if not k.endswith("rotary_emb.inv_freq")})


def main(argv: list[str] | None = None) -> None:
    from lrpilot.config import load_config

    ap = argparse.ArgumentParser(prog="python -m lrpilot.model", description="Print a preset model's size.")
    ap.add_argument("--preset", default="cpu-small")
    ap.add_argument("--set", dest="overrides", action="append", default=[], metavar="SECTION.KEY=VALUE")
    args = ap.parse_args(argv)
    cfg = load_config(args.preset, args.overrides).model
    with torch.device("meta"):
        n = LLaMA(cfg).num_parameters()
    print(
        f"{args.preset}: {n:,} parameters ({n / 1e6:.1f}M), {cfg.num_hidden_layers} layers, d={cfg.hidden_size}, "
        f"heads={cfg.num_attention_heads}, ffn={cfg.intermediate_size}, vocab={cfg.vocab_size}, "
        f"head_dim={cfg.hidden_size // cfg.num_attention_heads}, ~{6 * n / 1e6:.0f} MFLOP/token (6N)"
    )


if __name__ == "__main__":
    main()
