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


TINY_FAMILIES = ("llama", "llama_tied", "qwen2", "gemma3", "cohere", "granite", "mistral_window")


def make_tiny_family_model(family: str, vocab_size: int = 64):
    """A randomly initialised 2-layer fp32 model of one of `TINY_FAMILIES`, each with its own quirk.

    gemma3: final-logit soft-capping well below the raw logits (the tanh bends them) and a sliding
    window of 4, shorter than most test rows; cohere/granite: logit scaling; mistral_window: a sliding
    window of 5; llama_tied: the LM head tied to the input embedding.
    """
    import torch
    import transformers as tf

    torch.manual_seed(0)
    common = dict(vocab_size=vocab_size, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256, pad_token_id=0)
    if family in ("llama", "llama_tied"):
        return make_tiny_model(vocab_size, tie_word_embeddings=family == "llama_tied")
    if family == "qwen2":
        return tf.Qwen2ForCausalLM(tf.Qwen2Config(**common)).float()
    if family == "gemma3":
        config = tf.Gemma3TextConfig(**common, head_dim=8, query_pre_attn_scalar=8, sliding_window=4,
                                     layer_types=["sliding_attention", "full_attention"],
                                     final_logit_softcapping=0.25)
        return tf.Gemma3ForCausalLM(config).float()
    if family == "cohere":
        return tf.CohereForCausalLM(tf.CohereConfig(**common, logit_scale=4.0)).float()
    if family == "granite":
        return tf.GraniteForCausalLM(tf.GraniteConfig(**common, logits_scaling=4.0)).float()
    if family == "mistral_window":
        return tf.MistralForCausalLM(tf.MistralConfig(**common, sliding_window=5)).float()
    raise ValueError(f"unknown family {family!r}; one of {', '.join(TINY_FAMILIES)}")


def memorise(model, tokenizer, conversations, steps: int = 400, lr: float = 1e-2) -> None:
    """Train a tiny model on `conversations` until their response loss is ~0 (a plain masked-loss loop).

    For tests that need a model which knows its answers exactly (eval metrics, chat).
    """
    import torch

    from instructune.data.batching import collate_padded
    from instructune.data.encode import ConversationEncoder
    from instructune.train.loss import masked_lm_loss

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
