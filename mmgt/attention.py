"""Attention processors for every attention layer of the Stage II networks: stateless, per-call inputs as arguments.

The weights of an attention layer live in a diffusers ``Attention`` module (``to_q``, ``to_k``, ``to_v``,
``to_out.0``: the release's key names); the math lives in a *processor* object attached to it. diffusers hands a
block's ``cross_attention_kwargs`` to the processors of that block as keyword arguments, so everything a call needs
arrives with the call and nothing is kept on a module between calls: one network serves any number of threads,
avatars and sessions at once.

* ``AttnProcessor`` -- plain self/cross attention.
* ``ReferenceWriteProcessor`` -- the ReferenceNet's self-attention (attn1). Its input, ``norm1(hidden)`` (the
  ``BasicTransformerBlock`` normalises before calling attn1), is the bank entry of its block: it is put into the
  call's own ``bank_out`` list (made by ``ReferenceNet.forward`` for that call and returned from it).
* ``ReferenceReadProcessor`` -- the denoiser's self-attention (attn1). Its call's ``reference`` (a
  ``ReferenceRead``: the bank entry of its block, the frame count, the CFG layout) adds the reference tokens to the
  keys/values of every frame. Under classifier-free guidance the leading unconditional samples use plain
  self-attention, as the reference implementation does.

Per-call keyword arguments reach both attention layers of a transformer block; each processor takes the ones meant
for attn1 (``reference``, ``bank_out``) in its signature, so diffusers passes them on without a warning, and the
plain processors ignore them.

Math: ``"sdpa"`` uses ``F.scaled_dot_product_attention`` (fused kernels where the device has them); ``"export"``
spells the same math as matmul + softmax + matmul so it traces to plain ONNX (opset 17) and TensorRT ops. The export
math is chosen at build time (``attention_backend=``) or, whatever was built, while ``torch.onnx.export`` traces
(``torch.onnx.is_in_onnx_export()``; torch.compile folds that check to False), so exporting changes no module.
"""
from __future__ import annotations

import logging
from typing import Dict, List, NamedTuple, Optional

import torch
import torch.nn.functional as F
from diffusers.models.attention_processor import Attention

logger = logging.getLogger(__name__)

BACKENDS = ("sdpa", "export")


def check_backend(backend: str) -> str:
    """Return ``backend`` if it is a known attention backend, else raise naming the known ones."""
    if backend not in BACKENDS:
        raise ValueError(f"mmgt.attention: unknown attention backend {backend!r}; known: {', '.join(BACKENDS)}")
    return backend


def attention_math(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, scale: float,
                   backend: str) -> torch.Tensor:
    """softmax(q k^T * scale) v over (N, heads, L, d) tensors, by the chosen backend."""
    if backend == "sdpa" and not torch.onnx.is_in_onnx_export():
        return F.scaled_dot_product_attention(query, key, value, scale=scale)  # (N, H, Lq, d)
    # Explicit form for export: scaling q first keeps fp16 scores in range. A half-precision graph gets its
    # softmax in fp32 (thousands of keys); an fp32 graph gets no Cast nodes, so MatMul-Softmax-MatMul stays a
    # pattern that TensorRT can fuse when it builds the fp16 engine itself. The dtype is static while tracing.
    scores = torch.matmul(query * scale, key.transpose(-1, -2))  # (N, H, Lq, Lk)
    if scores.dtype == torch.float32:
        probs = torch.softmax(scores, dim=-1)  # (N, H, Lq, Lk)
    else:
        probs = torch.softmax(scores.float(), dim=-1).to(value.dtype)  # (N, H, Lq, Lk)
    return torch.matmul(probs, value)  # (N, H, Lq, d)


def _split_heads(x: torch.Tensor, heads: int) -> torch.Tensor:
    n, length, width = x.shape
    return x.reshape(n, length, heads, width // heads).transpose(1, 2)  # (N, H, L, d)


def _merge_heads(x: torch.Tensor) -> torch.Tensor:
    n, heads, length, dim = x.shape
    return x.transpose(1, 2).reshape(n, length, heads * dim)  # (N, L, H*d)


class ReferenceRead(NamedTuple):
    """What one denoiser self-attention reads of the reference in one call (``cross_attention_kwargs["reference"]``).

    Rows of the folded batch are (sample, frame) pairs, sample-major: the first ``uncond_rows * frames`` rows are the
    CFG unconditional samples (no reference), the rest read ``tokens``.
    """

    tokens: torch.Tensor  # (1 or conditional samples, Lr, C): this block's bank entry, one row per sample or shared
    frames: int  # F: frames per sample in the folded batch
    uncond_rows: int  # leading samples that are the CFG unconditional half


class AttnProcessor:
    """Plain attention: queries from ``hidden_states``, keys/values from ``encoder_hidden_states`` (or itself).

    Covers the attention layers of the SD1.5 UNet family as configured here: no attention mask, no group/cross
    norms, no residual inside the layer (the blocks add their own residuals). ``reference`` and ``bank_out`` are the
    per-call inputs of the block's self-attention; they reach every processor of the block and are ignored here.
    """

    def __init__(self, backend: str = "sdpa"):
        self.backend = check_backend(backend)

    def __call__(self, attn: Attention, hidden_states: torch.Tensor,
                 encoder_hidden_states: Optional[torch.Tensor] = None,
                 attention_mask: Optional[torch.Tensor] = None, reference: Optional[ReferenceRead] = None,
                 bank_out: Optional[List[Optional[torch.Tensor]]] = None) -> torch.Tensor:
        if attention_mask is not None:
            raise ValueError(f"{type(self).__name__}: attention masks are not used by the MMGT networks")
        context = hidden_states if encoder_hidden_states is None else encoder_hidden_states
        return self.attend(attn, hidden_states, attn.to_k(context), attn.to_v(context))

    def attend(self, attn: Attention, hidden_states: torch.Tensor, key: torch.Tensor,
               value: torch.Tensor) -> torch.Tensor:
        """Attention of ``hidden_states`` (N, Lq, C) over already projected ``key``/``value`` (N, Lk, C)."""
        if hidden_states.ndim != 3:
            raise ValueError(f"{type(self).__name__}: expected (N, L, C) tokens, "
                             f"got shape {tuple(hidden_states.shape)}")
        query = _split_heads(attn.to_q(hidden_states), attn.heads)  # (N, H, Lq, d)
        key = _split_heads(key, attn.heads)  # (N, H, Lk, d)
        value = _split_heads(value, attn.heads)  # (N, H, Lk, d)
        out = _merge_heads(attention_math(query, key, value, attn.scale, self.backend))  # (N, Lq, C)
        out = attn.to_out[0](out)  # output projection
        return attn.to_out[1](out)  # dropout (identity in eval)


class ReferenceWriteProcessor(AttnProcessor):
    """ReferenceNet attn1: put the input tokens (= norm1(hidden)) into the call's ``bank_out[index]``, then
    self-attend (the ReferenceNet's own later blocks need the normal result)."""

    def __init__(self, index: int, backend: str = "sdpa"):
        super().__init__(backend)
        self.index = index  # position of this block's entry in the bank (reference_bank_layout order)

    def __call__(self, attn: Attention, hidden_states: torch.Tensor,
                 encoder_hidden_states: Optional[torch.Tensor] = None,
                 attention_mask: Optional[torch.Tensor] = None, reference: Optional[ReferenceRead] = None,
                 bank_out: Optional[List[Optional[torch.Tensor]]] = None) -> torch.Tensor:
        if bank_out is not None:
            bank_out[self.index] = hidden_states  # (B, h*w, C)
        return super().__call__(attn, hidden_states, encoder_hidden_states, attention_mask)


class ReferenceReadProcessor(AttnProcessor):
    """Denoiser attn1: keys/values = cat(own frame tokens, the call's reference tokens repeated over frames).

    Without a ``reference`` (no reference image) it is plain self-attention everywhere.
    """

    def __call__(self, attn: Attention, hidden_states: torch.Tensor,
                 encoder_hidden_states: Optional[torch.Tensor] = None,
                 attention_mask: Optional[torch.Tensor] = None, reference: Optional[ReferenceRead] = None,
                 bank_out: Optional[List[Optional[torch.Tensor]]] = None) -> torch.Tensor:
        if reference is None:
            return super().__call__(attn, hidden_states, encoder_hidden_states, attention_mask)
        if encoder_hidden_states is not None or attention_mask is not None:
            raise ValueError("ReferenceReadProcessor: attn1 is self-attention; got encoder states or a mask")
        frames = reference.frames
        rows = hidden_states.shape[0]
        uncond = reference.uncond_rows * frames  # folded rows of the unconditional half
        key_self = attn.to_k(hidden_states)  # (N, L, C)
        value_self = attn.to_v(hidden_states)  # (N, L, C)
        outputs = []
        # 1. Unconditional rows: plain self-attention, the reference image must not leak into them
        if uncond > 0:
            outputs.append(self.attend(attn, hidden_states[:uncond], key_self[:uncond], value_self[:uncond]))
        # 2. Conditional rows: own tokens + reference tokens; the reference is projected once per sample, not per frame
        if rows > uncond:
            cond_samples = (rows - uncond) // frames
            bank = reference.tokens.to(hidden_states.dtype)  # (Bb, Lr, C)
            if bank.ndim != 3 or bank.shape[0] not in (1, cond_samples) or bank.shape[2] != hidden_states.shape[2]:
                raise ValueError(
                    f"ReferenceReadProcessor: reference tokens have shape {tuple(bank.shape)}; expected "
                    f"(1 or {cond_samples} conditional samples, tokens, {hidden_states.shape[2]})")
            key_ref = self._over_frames(attn.to_k(bank), cond_samples, frames)  # (Nc, Lr, C)
            value_ref = self._over_frames(attn.to_v(bank), cond_samples, frames)  # (Nc, Lr, C)
            key = torch.cat([key_self[uncond:], key_ref], dim=1)  # (Nc, L + Lr, C)
            value = torch.cat([value_self[uncond:], value_ref], dim=1)  # (Nc, L + Lr, C)
            outputs.append(self.attend(attn, hidden_states[uncond:], key, value))
        return outputs[0] if len(outputs) == 1 else torch.cat(outputs, dim=0)  # (N, L, C)

    @staticmethod
    def _over_frames(x: torch.Tensor, samples: int, frames: int) -> torch.Tensor:
        """(Bb, L, C) -> (samples * frames, L, C), sample-major like the folded batch; Bb = 1 broadcasts."""
        bb, length, width = x.shape
        x = x.unsqueeze(1).expand(samples if bb == 1 else bb, frames, length, width)  # (S, F, L, C)
        return x.reshape(samples * frames, length, width)


def attention_modules(module: torch.nn.Module) -> Dict[str, Attention]:
    """Every diffusers ``Attention`` under ``module`` by qualified name."""
    return {name: m for name, m in module.named_modules() if isinstance(m, Attention)}


def set_attention_backend(module: torch.nn.Module, backend: str) -> int:
    """Build-time setting: every attention layer under ``module`` computes with ``backend`` ("sdpa" or "export");
    returns the count. Networks call it from their constructor; tests use it to compare the two maths.

    Our processors keep their role (plain / bank write / bank read) and only change their math; any other
    processor (e.g. the diffusers default a fresh module comes with) is replaced by a plain ``AttnProcessor``.
    """
    check_backend(backend)
    layers = attention_modules(module)
    for layer in layers.values():
        if isinstance(layer.processor, AttnProcessor):
            layer.processor.backend = backend
        else:
            layer.set_processor(AttnProcessor(backend))
    logger.debug("attention backend %s set on %d layers", backend, len(layers))
    return len(layers)


__all__ = [
    "BACKENDS", "check_backend", "attention_math", "ReferenceRead", "AttnProcessor", "ReferenceWriteProcessor",
    "ReferenceReadProcessor", "attention_modules", "set_attention_backend",
]
