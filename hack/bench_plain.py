"""The trainer benchmark's baseline: a plain transformers Trainer + peft script.

    python hack/bench_plain.py METRICS --job FILE --model DIR --data FILE --output DIR

What a user would write by hand around transformers and peft: read the jsonl, tokenize it in one
batch call, load the model, wrap it with LoRA, hand both to a `Trainer`, train, save the adapter.
Every setting comes from the same objects the project's trainer uses, so that when the trainer's
settings change the baseline follows: the TrainerConfig (config.load_trainer_config), the plan
(plan.make_plan: steps, records, learning rate), the data order (data.split, data.PlannedRecords),
the TrainingArguments (training.get_training_arguments: optimizer, schedule, checkpoints, gradient
checkpointing if it moves there), the LoraConfig (adapters.get_peft_config: r, alpha, dropout,
targets) and the quantization config (modeling.get_quantization_config). The one rule restated
here is how the base is prepared (adapters.prepare_base, as Safe Synthesizer's backend does it:
peft's prepare_model_for_kbit_training when quantized, else gradient checkpointing and input
gradients); bench_trainer.py
compares the settings both runs really trained with (optimizer, arguments, adapter, gradient
checkpointing, dtypes) and reports any difference.
"""

from __future__ import annotations

import json
import sys

from bench_trainer import make_probe, write_metrics


def records(path: str, field: str) -> list[str]:
    with open(path, encoding="utf-8") as stream:
        return [json.loads(line)[field] for line in stream if line.strip()]


def main(argv: list[str]) -> int:
    metrics_path, args = argv[0], argv[1:]
    options = dict(zip(args[::2], args[1::2], strict=True))
    probe = make_probe()

    import torch
    from peft import get_peft_model, prepare_model_for_kbit_training
    from transformers import (
        AutoModelForCausalLM,
        AutoTokenizer,
        DataCollatorForSeq2Seq,
        Trainer,
        set_seed,
    )

    from finetune_trainer import data
    from finetune_trainer.adapters import get_peft_config
    from finetune_trainer.config import PathOverrides, load_trainer_config
    from finetune_trainer.hardware import detect_device
    from finetune_trainer.modeling import get_quantization_config
    from finetune_trainer.plan import make_plan
    from finetune_trainer.training import SEED, get_training_arguments

    config = load_trainer_config(
        options["--job"],
        PathOverrides(options["--model"], options["--data"], options["--output"]),
    )
    training, dataset = config.spec.training, config.spec.dataset
    scheme = training.resolved_quantization_scheme
    assert config.paths.model is not None
    device = detect_device()

    tokenizer = AutoTokenizer.from_pretrained(config.paths.model)
    texts = records(config.paths.dataset, dataset.resolved_text_field or "text")
    eos = [tokenizer.eos_token_id]
    limit = dataset.max_sequence_length
    examples = [
        data.Example((ids + eos)[:limit], (ids + eos)[:limit])
        for ids in tokenizer(texts)["input_ids"]
    ]

    model = AutoModelForCausalLM.from_pretrained(
        config.paths.model,
        dtype=torch.bfloat16 if device.bf16 else torch.float32,
        quantization_config=get_quantization_config(scheme),
        attn_implementation=training.attn_implementation,
        use_safetensors=True,
    )
    model.config.use_cache = False
    plan = make_plan(training, len(examples))  # one process; no RoPE scaling at these lengths
    set_seed(SEED)
    # The base prepared as Safe Synthesizer's backend prepares it (and so the trainer)
    if training.peft_method != "lora":
        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=True)
    else:
        model.gradient_checkpointing_enable()
        model.enable_input_require_grads()
    model = get_peft_model(model, get_peft_config(training))

    train, validation = data.split(examples, plan.validation_records)
    trainer = Trainer(
        model=model,
        args=get_training_arguments(training, plan, device, config.paths.checkpoint_dir),
        train_dataset=data.PlannedRecords(train, plan.records),
        eval_dataset=data.ExampleList(validation) if validation else None,
        data_collator=DataCollatorForSeq2Seq(tokenizer, label_pad_token_id=data.IGNORE_INDEX),
        callbacks=[probe],
    )
    trainer.train()
    model.save_pretrained(config.paths.output)
    write_metrics(metrics_path, probe, exit_code=0)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
