"""Capacity planner, the model side: a served model's footprint and the GPU memory it needs.

gpunode/planner.py compares it with a node's GPUs at config load.

GPU memory a served model needs, in bytes::

    weights  = parameters x bits_per_weight(dtype) / 8
    kv_cache = 2 (K and V) x layers x kv_heads x head_dim x context_length x batch
               x bytes_per_element(kv_dtype)
    overhead = overhead_fraction x (weights + kv_cache) + overhead_gib_per_gpu x GPUs
    need per GPU = (weights + kv_cache) x (1 + overhead_fraction) / GPUs + overhead_gib_per_gpu

The KV cache formula is the one in NVIDIA's "Mastering LLM Techniques: Inference
Optimization" (size of KV cache per token = 2 x num_layers x (num_heads x dim_head)
x precision_in_bytes): Llama-2-7B (32 layers, 32 KV heads of 128) at 4096 tokens in
fp16 is 2 x 32 x 32 x 128 x 4096 x 2 B = 2 GiB per sequence.

Without ``layers``/``kv_heads``/``head_dim`` the planner assumes a dense transformer
with multi-head attention shaped like Llama-2 7B/13B (d_model = 128 x layers, so
parameters ~= 12 x layers x d_model^2): that gives Llama-2-7B's and -13B's real shapes
back, and over-estimates the KV cache of grouped-query models (Llama-3, Mistral)
several times. Declare the three numbers (the model's config.json: num_hidden_layers,
num_key_value_heads, hidden_size / num_attention_heads) for a tight estimate.

The overhead margins (CUDA context and runtime per GPU, activations and allocator
slack as a fraction) are gpunode's defaults, not measurements: change them per model
in its footprint.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Annotated, Any

from pydantic import BeforeValidator, Field, model_validator

from gpunode.schema.types import Model, one_of

GIB = 2**30


@dataclass(frozen=True)
class Dtype:
    bits: float  # bits per weight (or per KV-cache element), scales included
    kv: bool = False  # usable as a KV-cache type


# Bits per weight. Plain floats/ints: their width. ggml block formats (llama.cpp
# ggml-common.h): q4_0 = fp16 scale + 32 x 4 bit = 18 B / 32 weights = 4.5; q4_1 adds an
# fp16 min (20 B / 32 = 5.0); q5_0 22 B / 32 = 5.5; q5_1 24 B / 32 = 6.0; q8_0 fp16 scale
# + 32 x 8 bit = 34 B / 32 = 8.5. k-quant mixes (q*_k_*): whole-model averages llama.cpp
# publishes for Llama 2 7B (tools/quantize/README.md: Q2_K 3.35, Q3_K_M 3.91, Q4_K_S 4.58,
# Q4_K_M 4.84, Q5_K_S 5.52, Q5_K_M 5.68, Q6_K 6.56). AWQ and GPTQ 4-bit with their default
# group size 128: 4 bits + an fp16 scale and a 4-bit zero point per 128 weights
# = 4 + 20/128 = 4.156 (embeddings kept in fp16 are not counted).
DTYPES: dict[str, Dtype] = {
    "fp32": Dtype(32, kv=True),
    "fp16": Dtype(16, kv=True),
    "bf16": Dtype(16, kv=True),
    "fp8": Dtype(8, kv=True),
    "int8": Dtype(8, kv=True),
    "q8_0": Dtype(8.5, kv=True),
    "q5_1": Dtype(6.0, kv=True),
    "q5_0": Dtype(5.5, kv=True),
    "q4_1": Dtype(5.0, kv=True),
    "q4_0": Dtype(4.5, kv=True),
    "q6_k": Dtype(6.56),
    "q5_k_m": Dtype(5.68),
    "q5_k_s": Dtype(5.52),
    "q4_k_m": Dtype(4.84),
    "q4_k_s": Dtype(4.58),
    "q3_k_m": Dtype(3.91),
    "q2_k": Dtype(3.35),
    "awq": Dtype(4 + 20 / 128),
    "gptq": Dtype(4 + 20 / 128),
    "int4": Dtype(4.0),
}
KV_DTYPES = tuple(name for name, dtype in DTYPES.items() if dtype.kv)
SUFFIXES = {"": 1, "k": 10**3, "m": 10**6, "b": 10**9, "t": 10**12}
ASPECT = 128  # d_model / layers assumed without an architecture (Llama-2 7B: 4096 / 32)


def parse_parameters(value: Any) -> Any:
    """7000000000, 7e9, "7B", "6.74b", "135M" -> an int count; anything else is left for
    pydantic to refuse."""
    if isinstance(value, str):
        match = re.fullmatch(r"\s*([0-9]+(?:\.[0-9]+)?)\s*([kKmMbBtT]?)\s*", value)
        if not match:
            raise ValueError(
                f"{value!r} is not a parameter count (allowed: a number such as 7000000000, "
                "or 7B, 6.74B, 135M)"
            )
        return round(float(match[1]) * SUFFIXES[match[2].lower()])
    if isinstance(value, float):
        return round(value)
    return value


@dataclass(frozen=True)
class Estimate:
    weights: int
    kv_cache: int
    overhead: int
    gpus: int
    per_gpu: int  # what each of the gpus must hold

    @property
    def total(self) -> int:
        return self.weights + self.kv_cache + self.overhead


def estimate(
    parameters: int,
    dtype: str,
    context_length: int,
    batch: int = 1,
    layers: int | None = None,
    kv_heads: int | None = None,
    head_dim: int | None = None,
    kv_dtype: str = "fp16",
    gpus: int = 1,
    overhead_fraction: float = 0.10,
    overhead_gib_per_gpu: float = 1.0,
) -> Estimate:
    """GPU memory to serve a model, split into weights, KV cache and overhead (bytes).

    >>> estimate(7_000_000_000, "fp16", 4096).weights
    14000000000
    """
    weights = round(parameters * DTYPES[dtype].bits / 8)
    if layers is None or kv_heads is None or head_dim is None:
        layers, width = assumed_shape(parameters)
    else:
        width = kv_heads * head_dim
    kv_cache = round(2 * layers * width * context_length * batch * DTYPES[kv_dtype].bits / 8)
    scaled = (weights + kv_cache) * overhead_fraction
    fixed = overhead_gib_per_gpu * GIB
    per_gpu = round((weights + kv_cache + scaled) / gpus + fixed)
    return Estimate(weights, kv_cache, round(scaled + fixed * gpus), gpus, per_gpu)


def assumed_shape(parameters: int) -> tuple[int, int]:
    """(layers, d_model) of a dense multi-head-attention transformer of this size with
    d_model = ASPECT x layers (parameters ~= 12 x layers x d_model^2)."""
    layers = max(1, round((parameters / (12 * ASPECT**2)) ** (1 / 3)))
    return layers, ASPECT * layers


class ModelFootprint(Model):
    """How big a served model is, for the planner (embedded in an inference service's
    model config). Defaults here are the planner's defaults."""

    parameters: Annotated[int, BeforeValidator(parse_parameters), Field(ge=1)]
    """The parameter count: "7B" or 7e9."""
    dtype: Annotated[str, one_of(tuple(DTYPES), "a weight dtype or quantization")]
    """Weight precision or quantization (a key of planner.DTYPES)."""
    context_length: Annotated[int, Field(ge=1, le=10_000_000)] = 4096
    """Tokens per sequence (a service's own `context_length` replaces it)."""
    batch: Annotated[int, Field(ge=1, le=65_536)] = 1
    """Sequences held at full context at once."""
    layers: Annotated[int, Field(ge=1, le=1024)] | None = None
    """Architecture: layers (config.json num_hidden_layers). All three of layers, kv_heads
    and head_dim or none: without them a Llama-2-shaped multi-head model is assumed (an
    upper bound)."""
    kv_heads: Annotated[int, Field(ge=1, le=1024)] | None = None
    """Architecture: KV heads (config.json num_key_value_heads); with layers and head_dim."""
    head_dim: Annotated[int, Field(ge=1, le=4096)] | None = None
    """Architecture: dimension per head (config.json head_dim, or hidden_size /
    num_attention_heads); with layers and kv_heads."""
    kv_dtype: Annotated[str, one_of(KV_DTYPES, "a KV-cache dtype")] = "fp16"
    """KV-cache element type (vLLM kv_cache_dtype, llama.cpp -ctk)."""
    overhead_fraction: Annotated[float, Field(ge=0, le=1)] = 0.10
    """Activations, allocator slack: this fraction of weights + KV cache on top."""
    overhead_gib_per_gpu: Annotated[float, Field(ge=0, le=64)] = 1.0
    """CUDA context, runtime: GiB per GPU on top."""

    @model_validator(mode="after")
    def _architecture_all_or_none(self) -> ModelFootprint:
        given = [f for f in ("layers", "kv_heads", "head_dim") if getattr(self, f) is not None]
        if given and len(given) != 3:
            missing = sorted({"layers", "kv_heads", "head_dim"} - set(given))
            raise ValueError(
                f"{', '.join(given)} without {', '.join(missing)} (allowed: all three of "
                "layers, kv_heads, head_dim, or none)"
            )
        return self

    def estimate(self, gpus: int = 1) -> Estimate:
        return estimate(
            self.parameters,
            self.dtype,
            self.context_length,
            self.batch,
            self.layers,
            self.kv_heads,
            self.head_dim,
            self.kv_dtype,
            gpus,
            self.overhead_fraction,
            self.overhead_gib_per_gpu,
        )
