"""The capacity planner against published figures.

Sources of the expected numbers:
- 7B parameters in fp16 = 2 bytes each = 14 GB of weights (issue 3; any fp16 checkpoint).
- Llama-2-7B has 6,738,415,616 parameters, 32 layers, 32 KV heads of 128 (Meta's
  config.json: num_hidden_layers 32, num_key_value_heads 32, hidden_size 4096 / 32 heads).
- Its GGUF files (TheBloke/Llama-2-7B-GGUF model card): Q2_K 2.83 GB, Q4_0 3.83 GB,
  Q4_K_M 4.08 GB, Q6_K 5.53 GB, Q8_0 7.16 GB.
- KV cache: 2 x 32 layers x 32 heads x 128 x 4096 tokens x 2 bytes = 2 GiB per sequence
  (NVIDIA's "Mastering LLM Techniques: Inference Optimization": ~2 GB for Llama 2 7B, batch 1).
- Llama-3-8B: 32 layers, 8 KV heads of 128 (grouped-query attention): 0.5 GiB at 8192 tokens.
"""

from __future__ import annotations

import pytest
from pydantic import ValidationError

from gpunode.planner import check_placement
from gpunode.schema.planner import GIB, ModelFootprint, assumed_shape, estimate, parse_parameters

LLAMA2_7B = 6_738_415_616
LLAMA2_7B_ARCH = {"layers": 32, "kv_heads": 32, "head_dim": 128}


def test_7b_fp16_weights_are_14_gb() -> None:
    assert estimate(7_000_000_000, "fp16", 4096).weights == 14_000_000_000
    assert estimate(7_000_000_000, "bf16", 4096).weights == 14_000_000_000
    assert estimate(7_000_000_000, "fp32", 4096).weights == 28_000_000_000


@pytest.mark.parametrize("dtype", ["q4_0", "q4_k_m", "awq", "gptq", "int4"])
def test_7b_4bit_weights_are_3_5_to_4_3_gb(dtype: str) -> None:
    weights = estimate(7_000_000_000, dtype, 4096).weights
    assert 3.5e9 <= weights <= 4.25e9, (dtype, weights)


@pytest.mark.parametrize(
    ("dtype", "published_gb"),
    [("q2_k", 2.83), ("q4_0", 3.83), ("q4_k_m", 4.08), ("q6_k", 5.53), ("q8_0", 7.16)],
)
def test_llama2_7b_gguf_file_sizes(dtype: str, published_gb: float) -> None:
    weights = estimate(LLAMA2_7B, dtype, 4096).weights
    assert weights / 1e9 == pytest.approx(published_gb, rel=0.02)


def test_kv_cache_llama2_7b_4096_fp16_is_2_gib_per_sequence() -> None:
    one = estimate(LLAMA2_7B, "fp16", 4096, batch=1, **LLAMA2_7B_ARCH)
    assert one.kv_cache == 2 * GIB
    eight = estimate(LLAMA2_7B, "fp16", 4096, batch=8, **LLAMA2_7B_ARCH)
    assert eight.kv_cache == 16 * GIB
    fp8 = estimate(LLAMA2_7B, "fp16", 4096, kv_dtype="fp8", **LLAMA2_7B_ARCH)
    assert fp8.kv_cache == 1 * GIB


def test_kv_cache_grouped_query_llama3_8b() -> None:
    est = estimate(8_030_261_248, "bf16", 8192, layers=32, kv_heads=8, head_dim=128)
    assert est.kv_cache == GIB  # 2 x 32 x 8 x 128 x 8192 x 2 B


def test_assumed_shape_gives_llama2_shapes_back() -> None:
    assert assumed_shape(LLAMA2_7B) == (32, 4096)
    assert assumed_shape(13_015_864_320) == (40, 5120)  # Llama-2-13B: 40 layers, 5120 wide
    # without an architecture the KV cache is Llama-2-7B's own
    assert estimate(LLAMA2_7B, "fp16", 4096).kv_cache == 2 * GIB


def test_overhead_and_split_over_gpus() -> None:
    one = estimate(LLAMA2_7B, "fp16", 4096, **LLAMA2_7B_ARCH)
    assert one.overhead == round((one.weights + one.kv_cache) * 0.10 + GIB)
    assert one.per_gpu == one.total
    two = estimate(LLAMA2_7B, "fp16", 4096, gpus=2, **LLAMA2_7B_ARCH)
    assert two.per_gpu == round((two.weights + two.kv_cache) * 1.1 / 2 + GIB)
    assert two.overhead == one.overhead + GIB  # one more CUDA context


@pytest.mark.parametrize(
    ("raw", "count"),
    [("7B", 7 * 10**9), ("6.74b", 6_740_000_000), ("135M", 135 * 10**6), (7e9, 7 * 10**9)],
)
def test_parameter_counts(raw: object, count: int) -> None:
    assert parse_parameters(raw) == count
    assert ModelFootprint(parameters=raw, dtype="fp16").parameters == count


def test_footprint_refuses_bad_input_naming_what_is_allowed() -> None:
    with pytest.raises(ValidationError, match="allowed: a number such as 7000000000, or 7B"):
        ModelFootprint(parameters="seven billion", dtype="fp16")
    with pytest.raises(ValidationError, match="'fp4' is not a weight dtype.*allowed: fp32, fp16"):
        ModelFootprint(parameters="7B", dtype="fp4")
    with pytest.raises(ValidationError, match="'q4_k_m' is not a KV-cache dtype"):
        ModelFootprint(parameters="7B", dtype="fp16", kv_dtype="q4_k_m")
    with pytest.raises(ValidationError, match="layers without head_dim, kv_heads"):
        ModelFootprint(parameters="7B", dtype="fp16", layers=32)
    with pytest.raises(ValidationError, match="extra"):
        ModelFootprint(parameters="7B", dtype="fp16", quant="q4")
    assert ModelFootprint(parameters="7B", dtype="Q4_K_M").dtype == "q4_k_m"


H100 = 80 * GIB


def test_placement_that_fits_has_no_problem() -> None:
    fp = ModelFootprint(parameters=LLAMA2_7B, dtype="fp16", context_length=4096, batch=8)
    assert check_placement("host gpu-01", "gpu-01", "inference.services.chat", fp, H100, 1) == []


def test_placement_that_does_not_fit_names_model_node_need_and_have() -> None:
    fp = ModelFootprint(parameters="70B", dtype="fp16", context_length=4096)
    problems = check_placement(
        "host gpu-01", "gpu-01", "inference.services.chat", fp, H100, 1, model="llama-2-70b"
    )
    assert len(problems) == 1
    message = problems[0]
    assert message.startswith("host gpu-01: inference.services.chat: model llama-2-70b ")
    assert "does not fit node gpu-01" in message
    assert "needs 155.3 GiB per GPU (130.4 GiB weights (70B parameters in fp16)" in message
    assert "the node has 80.0 GiB per GPU x 1" in message
    assert "allowed: a smaller dtype or quantization" in message


def test_placement_split_over_enough_gpus_fits() -> None:
    fp = ModelFootprint(parameters="70B", dtype="fp16", context_length=4096)
    assert check_placement("h", "gpu-01", "svc", fp, H100, 2) == []
    assert check_placement("h", "gpu-01", "svc", fp, H100, 0) != []


def test_quantization_makes_a_model_fit() -> None:
    llama2_70b = {"layers": 80, "kv_heads": 8, "head_dim": 128}  # Meta's config.json
    big = ModelFootprint(parameters="70B", dtype="fp16", **llama2_70b)
    small = ModelFootprint(parameters="70B", dtype="awq", **llama2_70b)
    assert check_placement("h", "gpu-01", "svc", big, H100, 1) != []
    assert check_placement("h", "gpu-01", "svc", small, H100, 1) == []
