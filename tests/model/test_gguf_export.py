"""GGUF export, checked by a real llama.cpp (llama-cpp-python): same logits, same greedy answers, same stop.

The tiny models have memorised short answers (so greedy decoding has a clear winner at every step)
and the ChatML template, whose end-of-turn token `<|im_end|>` is not the tokenizer's EOS `</s>`: the
export must name it as llama.cpp's EOT for generation to stop there.

Tolerances: an f32 export computes the same sums as PyTorch in another order. The logits are dot
products over 32-64 terms of values below ~4 in size, each rounding at most 2^-24 relative; over
2 layers that bounds the difference far below 1e-4 (measured: 3e-6). Gemma 3's GELU is read from
llama.cpp's fp16 lookup table (relative error 2^-11 on each activation), hence its looser 2e-3.
f16 and q8_0 are lossy on purpose: they are checked by answers, not logits.
"""

from __future__ import annotations

import gguf
import numpy as np
import pytest
import torch

from instructune.data.conversation import Conversation, Message
from instructune.errors import UserError
from instructune.model.export import GGUF_TYPES, export_gguf
from instructune.model.export.architectures import rotary_interleave
from instructune.model.export.llama_cpp_run import greedy_ids, open_gguf, prompt_logits
from instructune.model.lora import apply_lora
from instructune.testing import make_tiny_model, make_tiny_tokenizer, memorise
from instructune.use.generation import generate_ids
from model_fixtures import SAMPLE, logits_of, perturb_adapters

PAIRS = [("What is the capital of France?", "Paris is the capital of France."),
         ("Which is the largest ocean?", "The Pacific Ocean is the largest ocean.")]
F32_ATOL = 1e-4


def conversation(question: str, answer: str | None = None) -> Conversation:
    messages = [Message("user", question)] + ([Message("assistant", answer)] if answer else [])
    return Conversation(messages)


def chat_prompt(tokenizer, question: str) -> list[int]:
    text = tokenizer.apply_chat_template([{"role": "user", "content": question}], tokenize=False,
                                         add_generation_prompt=True)
    return tokenizer(text).input_ids


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    """A tiny Llama that has memorised two answers, saved like a training checkpoint (stop tokens included)."""
    tokenizer = make_tiny_tokenizer()
    model = make_tiny_model(len(tokenizer), hidden_size=64)
    memorise(model, tokenizer, [conversation(q, a) for q, a in PAIRS])
    model.generation_config.eos_token_id = [tokenizer.eos_token_id, tokenizer.convert_tokens_to_ids("<|im_end|>")]
    folder = tmp_path_factory.mktemp("checkpoint")
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder, model, tokenizer


@pytest.fixture(scope="module")
def exported(checkpoint, tmp_path_factory):
    """The checkpoint exported once per type, from its folder (the path `instructune export` takes)."""
    folder = tmp_path_factory.mktemp("gguf")
    return {kind: export_gguf(str(checkpoint[0]), folder / f"model-{kind}.gguf", kind=kind) for kind in GGUF_TYPES}


def hf_greedy(model, tokenizer, prompt: list[int]) -> list[int]:
    stop = [tokenizer.eos_token_id, tokenizer.convert_tokens_to_ids("<|im_end|>")]
    return generate_ids(model, [prompt], stop_token_ids=stop, pad_token_id=tokenizer.pad_token_id,
                        max_new_tokens=40)[0]


def test_rotary_interleave_is_the_inverse_of_transformers_gguf_reader():
    from transformers.modeling_gguf_pytorch_utils import LlamaTensorProcessor

    weight = np.arange(8 * 4 * 3, dtype=np.float32).reshape(8 * 4, 3)  # 4 heads of 8 rows
    for heads, kv_heads in ((4, 4), (4, 2)):
        rows = 8 * kv_heads
        interleaved = rotary_interleave(torch.from_numpy(weight[:rows]), kv_heads).numpy()
        back = LlamaTensorProcessor._reverse_permute_weights(None, interleaved, heads, kv_heads)
        np.testing.assert_array_equal(back, weight[:rows])
    # Within one head of 4 rows [x0, x1, y0, y1] the pairs become [x0, y0, x1, y1].
    head = torch.tensor([[0.0], [1.0], [2.0], [3.0]])
    assert rotary_interleave(head, 1).flatten().tolist() == [0.0, 2.0, 1.0, 3.0]


def test_metadata_carries_template_special_tokens_and_end_of_turn(checkpoint, exported):
    _, model, tokenizer = checkpoint
    reader = gguf.GGUFReader(exported["f32"])
    field = {name: value.contents() for name, value in reader.fields.items() if name != "tokenizer.ggml.merges"}
    assert field["general.architecture"] == "llama"
    assert field["tokenizer.ggml.model"] == "gpt2" and field["tokenizer.ggml.pre"] == "gpt-2"
    assert field["tokenizer.chat_template"] == tokenizer.chat_template
    assert field["tokenizer.ggml.eos_token_id"] == tokenizer.eos_token_id
    assert field["tokenizer.ggml.eot_token_id"] == tokenizer.convert_tokens_to_ids("<|im_end|>")
    assert field["tokenizer.ggml.bos_token_id"] == tokenizer.bos_token_id
    assert field["tokenizer.ggml.padding_token_id"] == tokenizer.pad_token_id
    assert field["tokenizer.ggml.add_bos_token"] is False
    assert field["tokenizer.ggml.tokens"] == [tokenizer.convert_ids_to_tokens(i) for i in range(len(tokenizer))]
    types = field["tokenizer.ggml.token_type"]
    assert types[tokenizer.convert_tokens_to_ids("<|im_end|>")] == gguf.TokenType.CONTROL
    assert {types[i] for i in tokenizer(SAMPLE).input_ids} == {gguf.TokenType.NORMAL}
    assert field["llama.block_count"] == 2 and field["llama.embedding_length"] == 64
    assert field["llama.attention.head_count"] == 4 and field["llama.attention.head_count_kv"] == 2


@pytest.mark.parametrize("kind, matrix_type", [("f32", "F32"), ("f16", "F16"), ("q8_0", "Q8_0")])
def test_tensor_types_per_export_type(exported, kind, matrix_type):
    tensors = {t.name: t.tensor_type.name for t in gguf.GGUFReader(exported[kind]).tensors}
    assert len(tensors) == 2 * 9 + 3  # 9 weights per block, embedding, final norm, untied head
    assert tensors["blk.0.attn_q.weight"] == tensors["output.weight"] == matrix_type
    assert tensors["blk.1.attn_norm.weight"] == tensors["output_norm.weight"] == "F32"


def test_f32_export_gives_the_same_tokens_and_logits_in_llama_cpp(checkpoint, exported):
    _, model, tokenizer = checkpoint
    text = tokenizer.apply_chat_template([{"role": "user", "content": SAMPLE}], tokenize=False,
                                         add_generation_prompt=True)
    ids = tokenizer(text).input_ids
    with open_gguf(exported["f32"], threads=1) as llm:
        assert llm.tokenize(text.encode(), add_bos=False, special=True) == ids
        np.testing.assert_allclose(prompt_logits(llm, ids), logits_of(model, ids)[0].numpy(), rtol=0, atol=F32_ATOL)


@pytest.mark.parametrize("kind", GGUF_TYPES)
def test_greedy_answers_match_hf_and_stop_at_end_of_turn(checkpoint, exported, kind):
    _, model, tokenizer = checkpoint
    im_end = tokenizer.convert_tokens_to_ids("<|im_end|>")
    with open_gguf(exported[kind], threads=1) as llm:
        for question, answer in PAIRS:
            prompt = chat_prompt(tokenizer, question)
            expected = hf_greedy(model, tokenizer, prompt)
            assert tokenizer.decode(expected) == answer  # the model knows it: the comparison means something
            got, stop = greedy_ids(llm, prompt, max_new_tokens=40)
            assert got == expected
            assert stop == im_end


def test_llama_cpp_chat_uses_the_exported_template_and_stops(checkpoint, exported):
    with open_gguf(exported["f32"], threads=1) as llm:
        for question, answer in PAIRS:
            reply = llm.create_chat_completion([{"role": "user", "content": question}], temperature=0.0,
                                               max_tokens=40)
            assert reply["choices"][0]["message"]["content"] == answer
            assert reply["choices"][0]["finish_reason"] == "stop"


def test_lora_adapter_is_merged_before_export(checkpoint, tmp_path):
    folder, _, tokenizer = checkpoint
    from instructune.model.load import load_model

    peft_model = apply_lora(load_model(str(folder)), {"r": 4}).eval()
    perturb_adapters(peft_model)
    peft_model.save_pretrained(tmp_path / "adapter")
    out = export_gguf(str(tmp_path / "adapter"), tmp_path / "adapter.gguf", kind="f32")
    ids = tokenizer(SAMPLE).input_ids
    expected = logits_of(peft_model, ids)[0].numpy()
    assert np.abs(expected - logits_of(load_model(str(folder)), ids)[0].numpy()).max() > 100 * F32_ATOL
    with open_gguf(out, threads=1) as llm:
        np.testing.assert_allclose(prompt_logits(llm, ids), expected, rtol=0, atol=F32_ATOL)


def test_tied_embedding_is_written_once(tmp_path):
    tokenizer = make_tiny_tokenizer()
    model = make_tiny_model(len(tokenizer), tie_word_embeddings=True).eval()
    out = export_gguf("tiny", tmp_path / "tied.gguf", kind="f32", model=model, tokenizer=tokenizer)
    assert "output.weight" not in {t.name for t in gguf.GGUFReader(out).tensors}
    ids = tokenizer(SAMPLE).input_ids
    with open_gguf(out, threads=1) as llm:
        np.testing.assert_allclose(prompt_logits(llm, ids), logits_of(model, ids)[0].numpy(), rtol=0, atol=F32_ATOL)


def tiny_gemma3(vocab_size: int, sliding_window: int, layers: int = 7):
    """A tiny Gemma 3 in llama.cpp's layer pattern: layers 1-5 local (sliding window), 6 global, 7 local."""
    import transformers as tf

    torch.manual_seed(0)
    config = tf.Gemma3TextConfig(
        vocab_size=vocab_size, hidden_size=32, intermediate_size=64, num_hidden_layers=layers,
        num_attention_heads=4, num_key_value_heads=2, head_dim=8, query_pre_attn_scalar=8,
        sliding_window=sliding_window, max_position_embeddings=256, pad_token_id=0,
        layer_types=["full_attention" if (i + 1) % 6 == 0 else "sliding_attention" for i in range(layers)])
    model = tf.Gemma3ForCausalLM(config).float().eval()
    with torch.no_grad():  # fresh norms are all zero (a factor of 1): make the stored +1 matter
        for name, parameter in model.named_parameters():
            if "norm" in name:
                parameter.normal_(0, 0.3)
    return model


def test_gemma3_norms_window_and_scales_match_in_llama_cpp(tmp_path):
    tokenizer = make_tiny_tokenizer()
    model = tiny_gemma3(len(tokenizer), sliding_window=4)
    out = export_gguf("tiny-gemma3", tmp_path / "gemma3.gguf", kind="f32", model=model, tokenizer=tokenizer)
    reader = gguf.GGUFReader(out)
    assert reader.fields["general.architecture"].contents() == "gemma3"
    assert reader.fields["gemma3.attention.sliding_window"].contents() == 4
    ids = tokenizer(f"{SAMPLE} {SAMPLE}").input_ids
    assert len(ids) > 3 * 4  # long enough for the window to cut
    expected = logits_of(model, ids)[0].numpy()
    unwindowed = logits_of(_without_window(model), ids)[0].numpy()
    with open_gguf(out, threads=1) as llm:
        got = prompt_logits(llm, ids)
    np.testing.assert_allclose(got, expected, rtol=0, atol=2e-3)
    assert np.abs(got - unwindowed).max() > 10 * np.abs(got - expected).max()  # the window matters and is right


def _without_window(model):
    import copy

    other = copy.deepcopy(model)  # a window longer than any test row: every layer sees the whole row
    other.config.sliding_window = 10_000
    for layer in other.model.layers:
        if getattr(layer.self_attn, "sliding_window", None):
            layer.self_attn.sliding_window = 10_000
    return other


def test_unsupported_architecture_and_gemma_softcapping_are_clear_errors(tmp_path):
    from instructune.testing import make_tiny_family_model

    tokenizer = make_tiny_tokenizer()
    with pytest.raises(UserError, match="GGUF export supports LlamaForCausalLM, Gemma3ForCausalLM; this model is "
                                        "Qwen2ForCausalLM"):
        export_gguf("q", tmp_path / "q.gguf", model=make_tiny_family_model("qwen2", len(tokenizer)),
                    tokenizer=tokenizer)
    with pytest.raises(UserError, match="soft-capping"):
        export_gguf("g", tmp_path / "g.gguf", model=make_tiny_family_model("gemma3", len(tokenizer)),
                    tokenizer=tokenizer)
    assert not list(tmp_path.iterdir())  # nothing half-written is left behind


GEMMA_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}"
    "{{ '<start_of_turn>' + ('model' if message['role'] == 'assistant' else message['role']) + '\n' }}"
    "{{ message['content'] + '<end_of_turn>\n' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<start_of_turn>model\n' }}{% endif %}"
)


def tiny_sentencepiece_tokenizer():
    """A Gemma-style tokenizer: BPE over text whose spaces become '▁', byte fallback, BOS added."""
    import json

    from tokenizers import Tokenizer, models, normalizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    from instructune.testing import _TRAINING_TEXT

    special = ["<pad>", "<eos>", "<bos>", "<unk>", "<start_of_turn>", "<end_of_turn>"]
    backend = Tokenizer(models.BPE(unk_token="<unk>", byte_fallback=True))
    backend.normalizer = normalizers.Replace(" ", "▁")
    backend.train_from_iterator(_TRAINING_TEXT * 4, trainer=trainers.BpeTrainer(
        vocab_size=300, special_tokens=special, show_progress=False))
    spec = json.loads(backend.to_str())
    for byte in range(256):  # what the characters the merges never saw fall back to
        spec["model"]["vocab"].setdefault(f"<0x{byte:02X}>", len(spec["model"]["vocab"]))
    spec["decoder"] = {"type": "Sequence", "decoders": [
        {"type": "Replace", "pattern": {"String": "▁"}, "content": " "}, {"type": "ByteFallback"}, {"type": "Fuse"}]}
    backend = Tokenizer.from_str(json.dumps(spec))
    backend.post_processor = processors.TemplateProcessing(
        single="<bos> $A", pair="<bos> $A <bos> $B", special_tokens=[("<bos>", backend.token_to_id("<bos>"))])
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, bos_token="<bos>", eos_token="<eos>",
                                        pad_token="<pad>", unk_token="<unk>",
                                        additional_special_tokens=["<start_of_turn>", "<end_of_turn>"])
    tokenizer.chat_template = GEMMA_TEMPLATE
    return tokenizer


def test_gemma3_with_a_sentencepiece_style_tokenizer_answers_like_hf(tmp_path):
    tokenizer = tiny_sentencepiece_tokenizer()
    # 2 local layers (quick to train) whose window covers the question (the window has its own test above)
    model = tiny_gemma3(len(tokenizer), sliding_window=64, layers=2)
    memorise(model, tokenizer, [conversation(q, a) for q, a in PAIRS])
    out = export_gguf("tiny-gemma3", tmp_path / "gemma3.gguf", kind="f32", model=model, tokenizer=tokenizer)
    field = {name: value.contents() for name, value in gguf.GGUFReader(out).fields.items()}
    assert field["tokenizer.ggml.model"] == "llama" and field["tokenizer.ggml.add_bos_token"] is True
    assert field["tokenizer.ggml.eot_token_id"] == tokenizer.convert_tokens_to_ids("<end_of_turn>")
    byte_a = tokenizer.convert_tokens_to_ids("<0x41>")
    assert field["tokenizer.ggml.token_type"][byte_a] == gguf.TokenType.BYTE
    end_of_turn = tokenizer.convert_tokens_to_ids("<end_of_turn>")
    with open_gguf(out, threads=1) as llm:
        for text in [SAMPLE, "  two  spaces, digits 0123 and é, 日本 (byte fallback)", PAIRS[1][0]]:
            assert llm.tokenize(text.encode(), add_bos=True, special=True) == tokenizer(text).input_ids, text
        for question, answer in PAIRS:
            prompt = tokenizer.apply_chat_template([{"role": "user", "content": question}], tokenize=True,
                                                   add_generation_prompt=True, return_dict=False)
            expected = hf_greedy_until(model, tokenizer, prompt, end_of_turn)
            assert tokenizer.decode(expected) == answer
            assert greedy_ids(llm, prompt, max_new_tokens=40) == (expected, end_of_turn)


def hf_greedy_until(model, tokenizer, prompt: list[int], stop: int) -> list[int]:
    return generate_ids(model, [prompt], stop_token_ids=[stop], pad_token_id=tokenizer.pad_token_id,
                        max_new_tokens=40)[0]
