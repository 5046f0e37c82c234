"""The generation module's invariants on a tiny random model: batching, greedy/sampling, stops, streaming."""

import importlib.util
from types import SimpleNamespace

import pytest
import torch

from instructune.data.batching import pad_token_id
from instructune.data.conversation import Conversation, Message
from instructune.errors import UserError
from instructune.testing import make_tiny_model, make_tiny_tokenizer
from instructune.use.generation import (
    accepts_logits_to_keep,
    answer_conversations,
    decode_answer,
    encode_prompts,
    generate_ids,
    left_pad,
    stream_answer,
)
from instructune.use.loading import LoadedModel

QUESTIONS = ["Hello", "What is the capital of France?", "How are you? I am fine, thank you.", "Which ocean?"]


@pytest.fixture(scope="module")
def loaded():
    tokenizer = make_tiny_tokenizer()
    model = make_tiny_model(len(tokenizer), seed=3).eval()
    return LoadedModel.wrap(model, tokenizer, tokenizer.chat_template)


@pytest.fixture(scope="module")
def prompts(loaded):
    conversations = [Conversation([Message("user", q)]) for q in QUESTIONS]
    return encode_prompts(loaded.tokenizer, loaded.template, conversations)


def _generate(loaded, prompts, **settings):
    return generate_ids(loaded.model, prompts, stop_token_ids=loaded.stop_token_ids,
                        pad_token_id=loaded.pad_token_id, **settings)


def test_batched_left_padded_greedy_equals_each_prompt_alone(loaded, prompts):
    assert len({len(p) for p in prompts}) > 1  # the batch really is padded
    batched = _generate(loaded, prompts, max_new_tokens=16, batch_size=len(prompts))
    alone = [_generate(loaded, [p], max_new_tokens=16)[0] for p in prompts]
    assert batched == alone
    assert all(len(ids) == 16 for ids in batched)  # a random model rarely stops: the limit holds


def test_greedy_matches_transformers_generate(loaded, prompts):
    from transformers import GenerationConfig

    config = GenerationConfig(max_new_tokens=12, do_sample=False, eos_token_id=loaded.stop_token_ids,
                              pad_token_id=loaded.pad_token_id)
    for prompt in prompts:
        ids = torch.tensor([prompt])
        expected = loaded.model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), generation_config=config)
        assert _generate(loaded, [prompt], max_new_tokens=12)[0] == expected[0, len(prompt):].tolist()


def test_greedy_equals_the_sampling_path_when_only_the_top_token_is_left(loaded, prompts):
    greedy = _generate(loaded, prompts, max_new_tokens=10, batch_size=3)
    # top_p this small keeps only the most likely token, so sampling must pick the argmax every time.
    assert _generate(loaded, prompts, max_new_tokens=10, batch_size=3, temperature=1.0, top_p=1e-6, seed=5) == greedy


def test_sampling_with_a_seed_is_reproducible(loaded, prompts):
    settings = dict(max_new_tokens=12, temperature=1.5, top_p=0.95, batch_size=2)
    first = _generate(loaded, prompts, seed=11, **settings)
    assert _generate(loaded, prompts, seed=11, **settings) == first
    assert _generate(loaded, prompts, seed=12, **settings) != first
    torch.manual_seed(0)  # without a seed the global generator is used
    unseeded = _generate(loaded, prompts, **settings)
    torch.manual_seed(0)
    assert _generate(loaded, prompts, **settings) == unseeded


def test_generation_stops_at_a_stop_id_and_never_returns_it(loaded, prompts):
    free = _generate(loaded, prompts, max_new_tokens=16, batch_size=4)
    # Make the third token each prompt would produce greedily a stop token: output ends right before it.
    stops = sorted({ids[2] for ids in free})
    stopped = generate_ids(loaded.model, prompts, stop_token_ids=stops, pad_token_id=loaded.pad_token_id,
                           max_new_tokens=16, batch_size=4)
    for ids, full in zip(stopped, free, strict=True):
        cut = next(k for k, token in enumerate(full) if token in stops)
        assert ids == full[:cut] and not set(ids) & set(stops)


def test_progress_is_reported_per_batch_and_results_keep_input_order(loaded, prompts):
    seen = []
    reordered = prompts[::-1]
    out = _generate(loaded, reordered, max_new_tokens=4, batch_size=3, on_batch=seen.append)
    assert seen == [3, 1]
    assert out == _generate(loaded, prompts, max_new_tokens=4)[::-1]


def test_answers_are_the_decoded_ids_and_a_reference_turn_is_left_out(loaded, prompts):
    conversations = [Conversation([Message("user", q), Message("assistant", "left out")]) for q in QUESTIONS]
    answers = answer_conversations(loaded, conversations, max_new_tokens=8, batch_size=2)
    ids = _generate(loaded, prompts, max_new_tokens=8)
    assert answers == [decode_answer(loaded.tokenizer, i) for i in ids]


def test_streaming_joins_to_the_decoded_answer(loaded, prompts):
    for prompt in prompts:
        ids = _generate(loaded, [prompt], max_new_tokens=20)[0]
        stream = stream_answer(loaded, prompt, max_new_tokens=20)
        pieces = []
        while True:
            try:
                pieces.append(next(stream))
            except StopIteration as end:
                assert end.value == ids
                break
        assert all(pieces)
        assert "".join(pieces) == loaded.tokenizer.decode(ids, skip_special_tokens=True)
    conversation = Conversation([Message("user", QUESTIONS[1])])
    assert "".join(stream_answer(loaded, conversation, max_new_tokens=20)).strip() == \
        answer_conversations(loaded, [conversation], max_new_tokens=20)[0]
    # A seeded sampled stream is the seeded sampled batch of one.
    sampled = _generate(loaded, [prompts[0]], max_new_tokens=12, temperature=1.0, seed=4)[0]
    assert "".join(stream_answer(loaded, prompts[0], max_new_tokens=12, temperature=1.0, seed=4)) == \
        loaded.tokenizer.decode(sampled, skip_special_tokens=True)


def test_the_model_is_left_in_the_mode_it_was_in(loaded, prompts):
    loaded.model.train()
    try:
        _generate(loaded, prompts[:1], max_new_tokens=2)
        assert loaded.model.training
    finally:
        loaded.model.eval()


def test_pad_fallback_and_helpers():
    assert pad_token_id(SimpleNamespace(pad_token_id=5, eos_token_id=2)) == 5
    assert pad_token_id(SimpleNamespace(pad_token_id=None, eos_token_id=2)) == 2
    assert pad_token_id(SimpleNamespace(pad_token_id=None, eos_token_id=None)) == 0
    tokenizer = make_tiny_tokenizer()
    tokenizer.pad_token = None
    assert LoadedModel.wrap(make_tiny_model(len(tokenizer)), tokenizer, tokenizer.chat_template).pad_token_id == \
        tokenizer.eos_token_id
    ids, mask = left_pad([[7, 8, 9], [5]], pad_token_id=0)
    assert ids.tolist() == [[7, 8, 9], [0, 0, 5]] and mask.tolist() == [[1, 1, 1], [0, 0, 1]]
    assert accepts_logits_to_keep(make_tiny_model(16))


def test_settings_out_of_range_are_user_errors(loaded, prompts):
    for settings, flag in [({"temperature": -1.0}, "--temperature"), ({"top_p": 0.0}, "--top-p"),
                           ({"max_new_tokens": 0}, "--max-new-tokens"), ({"batch_size": 0}, "--batch-size")]:
        with pytest.raises(UserError, match=flag):
            _generate(loaded, prompts, **settings)


def test_generation_and_scoring_emit_no_deprecation_warnings(loaded, prompts):
    """transformers 5 renamed the forward's `past_key_values` to `cache` and warns (FutureWarning) on the
    old name, which every command that generates printed; decoding and scoring must use what the
    installed version expects, plain model or LoRA adapter alike."""
    import warnings

    from instructune.use.scoring import score_batch

    models = [loaded.model]
    if importlib.util.find_spec("peft") is not None:
        from peft import LoraConfig, get_peft_model

        with warnings.catch_warnings():  # building the adapter is not what this test is about
            warnings.simplefilter("ignore")
            models.append(get_peft_model(make_tiny_model(len(loaded.tokenizer), seed=3),
                                         LoraConfig(r=2, target_modules=["q_proj", "v_proj"])).eval())
    for model in models:
        wrapped = LoadedModel.wrap(model, loaded.tokenizer, loaded.template)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            _generate(wrapped, prompts, max_new_tokens=4, batch_size=2)
            "".join(stream_answer(wrapped, prompts[0], max_new_tokens=4))
            score_batch(model, [prompts[1]], [range(1, len(prompts[1]))], pad_token_id=wrapped.pad_token_id,
                        top_k=2)
        noisy = [f"{w.category.__name__}: {w.message}" for w in caught
                 if issubclass(w.category, (FutureWarning, DeprecationWarning))]
        assert noisy == [], noisy


def test_one_batch_of_many_prompts_stopping_at_different_steps_equals_each_prompt_alone(loaded):
    # The default job answers all its held-out questions in one batch (ANSWER_BATCH): that must not change
    # a single greedy token, also when rows of very different lengths stop at different steps.
    from instructune.study.default_job import ANSWER_BATCH

    words = "the capital ocean France largest which is of a how are you fine thank".split()
    conversations = [Conversation([Message("user", " ".join(words[(i * 7) % len(words):][:1 + i % 9]) + "?")])
                     for i in range(ANSWER_BATCH)]
    many = encode_prompts(loaded.tokenizer, loaded.template, conversations)
    assert len({len(p) for p in many}) > 5
    free = _generate(loaded, many, max_new_tokens=12, batch_size=ANSWER_BATCH)
    # Tokens from different steps of a few rows: rows stop early at different steps, others run to the limit.
    stops = sorted({ids[1 + i % 8] for i, ids in enumerate(free[::9])})
    settings = dict(stop_token_ids=stops, pad_token_id=loaded.pad_token_id, max_new_tokens=12)
    batched = generate_ids(loaded.model, many, batch_size=ANSWER_BATCH, **settings)
    alone = [generate_ids(loaded.model, [p], batch_size=1, **settings)[0] for p in many]
    assert batched == alone
    assert len({len(ids) for ids in batched}) > 2  # the rows did stop at different steps


def test_step_progress_counts_answers_tokens_and_bounds_the_steps_left(loaded, prompts):
    free = _generate(loaded, prompts, max_new_tokens=10, batch_size=2)
    stops = [free[0][1]]  # stops the shortest prompt's batch early (prompts are batched by length)
    seen = []
    out = generate_ids(loaded.model, prompts, stop_token_ids=stops, pad_token_id=loaded.pad_token_id,
                       max_new_tokens=10, batch_size=2,
                       on_step=lambda p: seen.append((p.answered, p.tokens, p.steps, p.max_steps)))
    answered = [a for a, *_ in seen]
    assert answered == sorted(answered) and answered[-1] == len(prompts) == seen[-1][0]
    assert [s for _, _, s, _ in seen] == list(range(1, len(seen) + 1))
    # The last count equals the steps taken (the bound shrank when a batch stopped early) and is below 2 x 10.
    assert seen[-1][3] == seen[-1][2] == len(seen) < 20
    assert all(bound >= steps for _, _, steps, bound in seen)
    # Every answer's tokens, each stop token included.
    assert seen[-1][1] == sum(len(ids) + (len(ids) < 10) for ids in out)
