"""Small in-process tokenizers and models for hermetic tests and examples (no network, no files)."""

from __future__ import annotations

from functools import cache

CHATML_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)

_TRAINING_TEXT = [
    "Which is the largest ocean? The Pacific Ocean is the largest ocean on Earth.",
    "What is the capital of France? Paris is the capital of France.",
    "Below is an instruction that describes a task. Write a response that appropriately completes the request.",
    "### Instruction:\n### Input:\n### Response:\n",
    "user assistant system tool Hello world! How are you? I am fine, thank you.",
    "The quick brown fox jumps over the lazy dog. 0123456789 + - * / = ( ) [ ] { } < > | _ : ; , . ! ?",
]

SPECIAL_TOKENS = ["<pad>", "<s>", "</s>", "<|im_start|>", "<|im_end|>"]


@cache
def _tiny_tokenizer_json(vocab_size: int) -> str:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    tok = Tokenizer(models.BPE(unk_token=None))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(_TRAINING_TEXT * 4, trainer=trainer)
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    return tok.to_str()


def make_tiny_tokenizer(vocab_size: int = 400, chat_template: str | None = CHATML_TEMPLATE, add_bos: bool = False):
    """A byte-level BPE tokenizer trained in-process on a few lines, with ChatML special tokens.

    `add_bos=True` makes it prepend `<s>` like Llama-style tokenizers do, to test BOS handling.
    """
    from tokenizers import Tokenizer, processors
    from transformers import PreTrainedTokenizerFast

    backend = Tokenizer.from_str(_tiny_tokenizer_json(vocab_size))
    if add_bos:
        bos_id = backend.token_to_id("<s>")
        backend.post_processor = processors.Sequence([
            processors.ByteLevel(trim_offsets=False),
            processors.TemplateProcessing(single="<s> $A", pair="<s> $A <s> $B", special_tokens=[("<s>", bos_id)]),
        ])
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend, bos_token="<s>", eos_token="</s>", pad_token="<pad>",
        additional_special_tokens=["<|im_start|>", "<|im_end|>"],
    )
    tokenizer.chat_template = chat_template
    return tokenizer


def make_tiny_model(vocab_size: int, hidden_size: int = 32, num_layers: int = 2, seed: int = 0,
                    tie_word_embeddings: bool = False):
    """A randomly initialised 2-layer Llama with the given vocabulary size, in fp32, for tests."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=vocab_size, hidden_size=hidden_size, intermediate_size=hidden_size * 2,
        num_hidden_layers=num_layers, num_attention_heads=4, num_key_value_heads=2,
        max_position_embeddings=1024, tie_word_embeddings=tie_word_embeddings,
        bos_token_id=1, eos_token_id=2, pad_token_id=0,
    )
    torch.manual_seed(seed)
    model = LlamaForCausalLM(config)
    return model.float()


def memorise(model, tokenizer, conversations, steps: int = 400, lr: float = 1e-2) -> None:
    """Train a tiny model on `conversations` until their response loss is ~0 (a plain masked-loss loop).

    For tests that need a model which knows its answers exactly (eval metrics, chat).
    """
    import torch

    from instructune.data.batching import collate_padded
    from instructune.data.encode import ConversationEncoder
    from instructune.loss import masked_lm_loss

    encoder = ConversationEncoder(tokenizer, tokenizer.chat_template)
    batch = collate_padded([encoder.encode(conv) for conv in conversations], tokenizer.pad_token_id)
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # a model this small runs ~10x faster on one thread than on two busy ones
    try:
        for _ in range(steps):
            out = masked_lm_loss(model, batch)
            loss = out.loss_sum / out.num_targets
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            if loss.item() < 1e-3:
                break
    finally:
        torch.set_num_threads(threads)
    model.eval()
