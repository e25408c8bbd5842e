"""Per-GPU memory estimate for a quantized LoRA fine-tune.

The estimate adds up, in bytes:

* frozen base weights: the transformer blocks' linear layers at the scheme's effective bits (plus
  the scheme's scale overhead), everything else (embeddings, untied LM head, norms) in bf16, or
  in float32 on a quantized base that peft's `prepare_model_for_kbit_training` upcasts (the
  trainer prepares every quantized base so, as Safe Synthesizer does; torchao's nvfp4 is left
  as loaded);
* LoRA parameters: fp32 weights + fp32 gradients + AdamW's two fp32 moments = 16 bytes each;
* activations, with gradient checkpointing: one bf16 hidden state per layer per token kept, one
  layer recomputed at a time (~34 hidden-size tensors per token), and the fp32 logits of the LM
  head and their gradient (batch x sequence x vocabulary x 8 bytes);
* a fixed 1 GiB for the CUDA context, kernels and allocator slack;

and divides the sum by `max_vram_fraction`: that is the GPU memory a node must offer. Every GPU
holds a full replica (multi-GPU pods train data-parallel), so the figure is per GPU.

Model shapes come from a table of common models, or are approximated from
`spec.model.parametersBillions` for other models. Without either, there is no estimate and no
memory affinity.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from finetune_api.resource import FineTuneJobSpec
from finetune_api.training import QuantizationScheme

MIB = 1024 * 1024
FRAMEWORK_OVERHEAD_MIB = 1024
LORA_BYTES_PER_PARAM = 16  # fp32 weight + fp32 grad + AdamW exp_avg + exp_avg_sq
ACTIVATION_TENSORS_PER_LAYER = 34  # bf16 hidden-size tensors for the layer being recomputed

# Storage bits per quantized weight, including block scales (NF4 with double quantization,
# int8 with per-row scales, FP8 with 128x128 block scales, NVFP4 with an FP8 scale per 16 values,
# MXFP4 with an 8-bit scale per 32 values).
STORAGE_BITS: dict[QuantizationScheme | None, float] = {
    QuantizationScheme.BNB_4BIT: 4.127,
    QuantizationScheme.BNB_8BIT: 8.06,
    QuantizationScheme.FP8: 8.002,
    QuantizationScheme.NVFP4: 4.5,
    QuantizationScheme.MXFP4: 4.25,
    None: 16.0,  # LoRA on a bf16 base
}


@dataclass(frozen=True)
class ModelShape:
    """What the estimate needs to know about a decoder-only transformer."""

    parameters_billions: float
    layers: int
    hidden: int
    intermediate: int
    heads: int
    kv_heads: int
    vocab: int
    tied_embeddings: bool

    @property
    def head_dim(self) -> int:
        return self.hidden // self.heads

    def projection_shapes(self) -> dict[str, tuple[int, int]]:
        """(in, out) features of each linear layer in one block, by module name."""
        kv = self.kv_heads * self.head_dim
        return {
            "q_proj": (self.hidden, self.heads * self.head_dim),
            "k_proj": (self.hidden, kv),
            "v_proj": (self.hidden, kv),
            "o_proj": (self.heads * self.head_dim, self.hidden),
            "gate_proj": (self.hidden, self.intermediate),
            "up_proj": (self.hidden, self.intermediate),
            "down_proj": (self.intermediate, self.hidden),
        }

    @property
    def non_block_parameters(self) -> int:
        """Embeddings and an untied LM head: no scheme quantizes them (see non_block_bytes)."""
        return self.vocab * self.hidden * (1 if self.tied_embeddings else 2)


# Published configurations of common base models (sizes rounded to 10M parameters).
KNOWN_MODELS: dict[str, ModelShape] = {
    "HuggingFaceTB/SmolLM3-3B": ModelShape(3.08, 36, 2048, 11008, 16, 4, 128256, True),
    "HuggingFaceTB/SmolLM2-1.7B": ModelShape(1.71, 24, 2048, 8192, 32, 32, 49152, True),
    "meta-llama/Llama-3.2-1B": ModelShape(1.24, 16, 2048, 8192, 32, 8, 128256, True),
    "meta-llama/Llama-3.2-3B": ModelShape(3.21, 28, 3072, 8192, 24, 8, 128256, True),
    "meta-llama/Llama-3.1-8B": ModelShape(8.03, 32, 4096, 14336, 32, 8, 128256, False),
    "meta-llama/Llama-3.1-70B": ModelShape(70.6, 80, 8192, 28672, 64, 8, 128256, False),
    "mistralai/Mistral-7B-v0.3": ModelShape(7.25, 32, 4096, 14336, 32, 8, 32768, False),
    "Qwen/Qwen2.5-1.5B": ModelShape(1.54, 28, 1536, 8960, 12, 2, 151936, True),
    "Qwen/Qwen2.5-7B": ModelShape(7.62, 28, 3584, 18944, 28, 4, 152064, False),
    "TinyLlama/TinyLlama-1.1B-Chat-v1.0": ModelShape(1.10, 22, 2048, 5632, 32, 4, 32000, False),
}


def approximate_shape(parameters_billions: float) -> ModelShape:
    """A Llama-like shape with about this many parameters (hidden size grows with the square
    root of the size, 32k-token vocabulary): good enough for a memory estimate."""
    params = parameters_billions * 1e9
    layers = max(8, round(8 * math.log2(max(params / 1e8, 2))))
    # Llama-style block: 4 h^2 (attention) + 3 * h * (8/3 h) (MLP) = 12 h^2 parameters.
    hidden = max(256, int(math.sqrt(params / (12 * layers)) // 128 * 128))
    heads = max(1, hidden // 128)
    return ModelShape(
        parameters_billions=parameters_billions,
        layers=layers,
        hidden=hidden,
        intermediate=hidden * 8 // 3,
        heads=heads,
        kv_heads=heads,
        vocab=32000,
        tied_embeddings=False,
    )


def model_shape(spec: FineTuneJobSpec) -> ModelShape | None:
    """The model's shape from the table, else approximated from spec.model.parametersBillions."""
    known = KNOWN_MODELS.get(spec.model_name)
    if known is not None:
        return known
    if spec.model.parameters_billions is not None:
        return approximate_shape(spec.model.parameters_billions)
    return None


@dataclass(frozen=True)
class MemoryEstimate:
    """Estimated per-GPU memory in MiB, by component."""

    base_weights_mib: int
    lora_mib: int
    activations_mib: int
    overhead_mib: int
    max_vram_fraction: float

    @property
    def used_mib(self) -> int:
        return self.base_weights_mib + self.lora_mib + self.activations_mib + self.overhead_mib

    @property
    def required_mib(self) -> int:
        """GPU memory a node must offer: the estimate divided by max_vram_fraction."""
        return math.ceil(self.used_mib / self.max_vram_fraction)


def non_block_bytes(scheme: QuantizationScheme | None) -> int:
    """Bytes per embedding / LM head parameter: bf16 as loaded, float32 once
    prepare_model_for_kbit_training has upcast them (every quantized base but torchao's)."""
    return 2 if scheme in (None, QuantizationScheme.NVFP4) else 4


def estimate_memory(spec: FineTuneJobSpec, shape: ModelShape) -> MemoryEstimate | None:
    """The per-GPU estimate, or None when max_vram_fraction is 0 (no budget to divide)."""
    training = spec.training
    if training.max_vram_fraction <= 0:
        return None
    scheme = training.resolved_quantization_scheme
    total_params = shape.parameters_billions * 1e9
    non_block = shape.non_block_parameters
    block_linear = max(total_params - non_block, 0.0)
    base_bytes = block_linear * STORAGE_BITS[scheme] / 8 + non_block * non_block_bytes(scheme)

    shapes = shape.projection_shapes()
    fallback = (shape.hidden, shape.hidden)
    per_layer = sum(
        training.lora_r * sum(shapes.get(name, fallback)) for name in training.lora_target_modules
    )
    lora_bytes = per_layer * shape.layers * LORA_BYTES_PER_PARAM

    tokens = training.batch_size * spec.dataset.max_sequence_length
    hidden_bytes = tokens * shape.hidden * 2
    activation_bytes = (
        hidden_bytes * (shape.layers + ACTIVATION_TENSORS_PER_LAYER) + tokens * shape.vocab * 8
    )
    return MemoryEstimate(
        base_weights_mib=math.ceil(base_bytes / MIB),
        lora_mib=math.ceil(lora_bytes / MIB),
        activations_mib=math.ceil(activation_bytes / MIB),
        overhead_mib=FRAMEWORK_OVERHEAD_MIB,
        max_vram_fraction=training.max_vram_fraction,
    )
