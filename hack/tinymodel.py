"""A tiny Llama and a tokenizer trained on the spot: no download, real loading code.

Used by the training tests and by `make demo` (nothing can be downloaded here, and a real
fine-tune on CPU needs a model small enough to train in seconds).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

# A small, repetitive corpus: a tiny model learns it within a few dozen steps.
SENTENCES = [
    "the cat sat on the mat and looked at the door",
    "the dog ran to the park and found a red ball",
    "a bird sang a song in the tall green tree",
    "the sun rose over the hill and the sky was blue",
    "we cook rice and beans for dinner every friday",
    "the train leaves the station at nine in the morning",
    "she reads a book by the window when it rains",
    "the old man feeds the ducks at the pond",
]
PAIRS = [
    ("question: what color is the sky? answer:", " the sky is blue"),
    ("question: where did the dog run? answer:", " the dog ran to the park"),
    ("question: what did the bird sing? answer:", " the bird sang a song"),
    ("question: when does the train leave? answer:", " the train leaves at nine"),
    ("question: what do we cook on friday? answer:", " we cook rice and beans"),
    ("question: who feeds the ducks? answer:", " the old man feeds the ducks"),
]
MODEL_CONTEXT = 128


@dataclass(frozen=True)
class TinyModel:
    path: Path
    context: int


def train_tokenizer(corpus: list[str], vocab_size: int) -> Any:
    """A byte-level BPE tokenizer trained on `corpus` on the spot (nothing is downloaded), as a
    transformers fast tokenizer with <pad>, <s>, </s> and <unk>."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    bpe = Tokenizer(models.BPE(unk_token="<unk>"))
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    bpe.train_from_iterator(
        corpus,
        trainers.BpeTrainer(
            vocab_size=vocab_size,
            special_tokens=["<pad>", "<s>", "</s>", "<unk>"],
            initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        ),
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=bpe,
        bos_token="<s>",
        eos_token="</s>",
        pad_token="<pad>",
        unk_token="<unk>",
    )


def build_tiny_model(directory: Path) -> TinyModel:
    """A 2-layer Llama (hidden 64) with q/k/v/o/gate/up/down projections, and a byte-level BPE
    tokenizer trained on the test corpus, saved together as safetensors."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    corpus = SENTENCES + [prompt + completion for prompt, completion in PAIRS]
    tokenizer = train_tokenizer(corpus * 4, vocab_size=400)
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=MODEL_CONTEXT,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        tie_word_embeddings=False,
    )
    torch.manual_seed(0)
    model = LlamaForCausalLM(config)
    directory.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(directory, safe_serialization=True)
    tokenizer.save_pretrained(directory)
    return TinyModel(directory, MODEL_CONTEXT)


# bnb-4bit QLoRA on every projection: trains the tiny model in seconds on a CPU.
TINY_QLORA: dict[str, Any] = {
    "pretrained_model": "tiny-llama",
    "quantize_model": True,
    "quantization_scheme": "bnb-4bit",
    "peft_implementation": "QLORA",
    "lora_r": 8,
    "lora_alpha_over_r": 2,
    "lora_target_modules": [
        "q_proj",
        "k_proj",
        "v_proj",
        "o_proj",
        "gate_proj",
        "up_proj",
        "down_proj",
    ],
    "learning_rate": 0.003,
    "batch_size": 2,
    "gradient_accumulation_steps": 2,
    "validation_ratio": 0.1,
    "validation_steps": 40,
}


def write_corpus(path: Path, repeat: int) -> Path:
    """The sentences, `repeat` times, as a jsonl dataset with a "text" field."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps({"text": s}) + "\n" for s in SENTENCES * repeat))
    return path


def tiny_finetunejob(
    name: str, training: dict[str, Any], dataset_path: str, output: tuple[str, str]
) -> dict[str, Any]:
    """A FineTuneJob for the tiny model on claim `models` (path tiny-llama) and data on claim
    `data`, writing to (claim, path)."""
    return {
        "apiVersion": "finetune.dev/v1alpha1",
        "kind": "FineTuneJob",
        "metadata": {"name": name},
        "spec": {
            "model": {"volume": {"claimName": "models", "path": "tiny-llama"}},
            "dataset": {"claimName": "data", "path": dataset_path, "maxSequenceLength": 64},
            "output": {"claimName": output[0], "path": output[1]},
            "training": training,
        },
    }
