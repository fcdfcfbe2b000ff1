"""A tiny GPT-2-style model and tokenizer built locally: a real `hf` backend with no download.

`build_tokenizer` trains a byte-level BPE tokenizer with the `tokenizers` library on a few lines
of the test tasks' text and saves it as a transformers `PreTrainedTokenizerFast` (no torch
needed: local-completions loads it with `tokenizer=<dir>`). `build_model` adds a 2-layer,
64-wide GPT-2 with seeded random weights (needs torch). Both write a directory that
`AutoTokenizer` / `AutoModelForCausalLM.from_pretrained` read offline.
"""

from __future__ import annotations

from pathlib import Path

SPECIAL = "<|endoftext|>"
# Text in the style of the tests' tasks (examples/tasks/demo_mc, tests/data/tasks/arith_gen),
# so prompts tokenize into a few merges rather than single bytes.
CORPUS = [
    "Question: What is 6 + 3?\nAnswer: 9",
    "Question 17: What is 12 + 30?\nAnswer: 42",
    "Question 4: What is 7 + 8?\nAnswer: 15",
    "The quick brown fox jumps over the lazy dog.",
    "0 1 2 3 4 5 6 7 8 9 10 11 12 13 14 15 16 17 18 19 20",
]
VOCAB_SIZE = 300


def build_tokenizer(directory: Path) -> Path:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=VOCAB_SIZE,
        special_tokens=[SPECIAL],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(CORPUS * 4, trainer=trainer)
    wrapped = PreTrainedTokenizerFast(
        tokenizer_object=tokenizer,
        bos_token=SPECIAL,
        eos_token=SPECIAL,
        unk_token=SPECIAL,
        pad_token=SPECIAL,
        model_max_length=512,
    )
    directory.mkdir(parents=True, exist_ok=True)
    wrapped.save_pretrained(directory)
    return directory


def build_model(directory: Path, seed: int = 1234) -> Path:
    """Tokenizer plus a randomly initialised (seeded) GPT-2 saved as safetensors, float32."""
    import torch
    from transformers import GPT2Config, GPT2LMHeadModel, PreTrainedTokenizerFast

    build_tokenizer(directory)
    tokenizer = PreTrainedTokenizerFast.from_pretrained(directory)
    config = GPT2Config(
        vocab_size=len(tokenizer),
        n_positions=512,
        n_embd=64,
        n_layer=2,
        n_head=2,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
    )
    torch.manual_seed(seed)
    model = GPT2LMHeadModel(config).eval()
    model.save_pretrained(directory, safe_serialization=True)
    return directory
