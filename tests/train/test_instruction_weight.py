"""The instruction weight (docs/masking.md, "Instruction weight"): w = 0 is bitwise the masked loss,
w = 1 is bitwise `train_on: all`, 0 < w < 1 is the weighted sum over the weight sum however the step is
split (micro-batches, ranks), and the head only ever sees positions of nonzero weight.

Tolerances: where two computations add the same fp32 terms in a different order (other micro-batches,
other ranks, full logits against the selective head), each element is a sum of at most ~100 terms whose
magnitudes are bounded by the tensor's largest element, so the two differ by at most about
100 * 2**-24 (6e-6) of that largest element: rtol 1e-5, and atol 1e-5 of the tensor's largest
magnitude, hold on any x86 CPU. Identities that do not reorder any addition are checked bit for bit.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from instructune import IGNORE_INDEX
from instructune.data.batching import collate_packed, collate_padded
from instructune.data.conversation import Conversation, Message
from instructune.data.encode import ConversationEncoder
from instructune.data.encoded import EncodedRow
from instructune.data.options import EncodingOptions
from instructune.data.templates import resolve_template
from instructune.data.weights import token_weights, tokenizer_prefix_length
from instructune.testing import make_tiny_family_model, make_tiny_model, make_tiny_tokenizer
from instructune.train import loss as loss_module
from instructune.train.distributed import Parallel, rank_share
from instructune.train.loss import (
    count_instruction_targets,
    count_targets,
    masked_lm_loss,
    row_mean_sum,
    step_normalizer,
    step_row_count,
    token_losses,
)
from instructune.train.step_plan import step_counts, step_denominator

VOCAB = 64
W = 0.3
LENGTHS = [5, 17, 9, 3, 12, 20, 7, 14]
RTOL = 1e-5


def _rows(lengths, seed: int = 0, prompt_fraction: float = 0.4) -> list[EncodedRow]:
    """Random rows: a prompt (-100) then a response; position 0 plays the BOS."""
    gen = torch.Generator().manual_seed(seed)
    rows = []
    for i, length in enumerate(lengths):
        ids = torch.randint(3, VOCAB, (length,), generator=gen).tolist()
        prompt = max(1, int(length * prompt_fraction))
        rows.append(EncodedRow(row=i, input_ids=ids, labels=[IGNORE_INDEX] * prompt + ids[prompt:],
                               roles=[0] * length))
    return rows


def _grads(model, loss: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    model.zero_grad(set_to_none=True)
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def _assert_equal(a, b, *, exact: bool):
    (loss_a, grads_a), (loss_b, grads_b) = a, b
    assert grads_a.keys() == grads_b.keys()
    for name in [None, *grads_a]:
        x, y = (loss_a, loss_b) if name is None else (grads_a[name], grads_b[name])
        if exact:
            assert torch.equal(x, y), name
        else:
            torch.testing.assert_close(x, y, rtol=RTOL, atol=RTOL * float(x.abs().max()), msg=name)


def _reference(model, rows: list[EncodedRow], w: float) -> torch.Tensor:
    """Σ weight x -log p with every position through the model's own head (weights from `token_weights`)."""
    batch = collate_padded(rows, pad_token_id=0)
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits.float()
    weights = torch.zeros(batch["input_ids"].shape)
    for i, row in enumerate(rows):
        weights[i, :len(row)] = torch.tensor(token_weights(row, w))
    ce = F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), batch["input_ids"][:, 1:].reshape(-1),
                         reduction="none")
    return (ce * weights[:, 1:].reshape(-1)).sum()


# ---------------------------------------------------------------------------------------------------
# Collation

def test_collation_carries_instruction_labels_only_with_a_weight():
    rows = _rows([6, 4])
    plain = collate_padded(rows, pad_token_id=0)
    assert "instruction_labels" not in plain and "instruction_labels" not in collate_packed(rows, 0)
    weighted = collate_padded(rows, pad_token_id=0, instruction_weight=W)
    assert all(torch.equal(weighted[k], plain[k]) for k in plain)  # nothing else changes
    x = IGNORE_INDEX
    ids0 = rows[0].input_ids
    assert weighted["instruction_labels"].tolist() == [[x, ids0[1], x, x, x, x], [x, x, x, x, x, x]]
    packed = collate_packed(rows, pad_token_id=0, pad_to_multiple_of=16, instruction_weight=W)
    assert packed["instruction_labels"].tolist() == [[x, ids0[1], x, x, x, x, x, x, x, x] + [x] * 6]
    assert count_instruction_targets(packed) == count_instruction_targets(weighted) == 1
    # The BOS (prefix) is never an instruction target.
    two = collate_padded(rows, pad_token_id=0, instruction_weight=W, prefix_length=2)
    assert two["instruction_labels"][0].tolist() == [x] * 6


# ---------------------------------------------------------------------------------------------------
# The identities

@pytest.mark.parametrize("family", ["llama", "llama_tied", "gemma3"])
def test_weight_zero_is_bitwise_the_masked_loss(family):
    model = make_tiny_family_model(family, VOCAB)
    rows = _rows(LENGTHS)
    masked = collate_padded(rows, pad_token_id=0)
    carried = collate_padded(rows, pad_token_id=0, instruction_weight=W)  # labels present, weight 0
    for options in ({}, {"per_row": True}):
        a = _grads(model, masked_lm_loss(model, masked, **options).loss_sum)
        b = _grads(model, masked_lm_loss(model, carried, instruction_weight=0.0, **options).loss_sum)
        _assert_equal(a, b, exact=True)
    assert step_denominator([carried], "token", 0.0) == step_normalizer([masked])


def _conversation_rows(tokenizer, train_on: str) -> list[EncodedRow]:
    encoder = ConversationEncoder(tokenizer, resolve_template(None, tokenizer), EncodingOptions(train_on=train_on))
    conversations = [
        [("user", "Which is the largest ocean?"), ("assistant", "The Pacific Ocean.")],
        [("user", "Hello"), ("assistant", "Hello world!"), ("user", "And France?"), ("assistant", "Paris.")],
        [("user", "How are you?"), ("assistant", "I am fine, thank you.")],
    ]
    return [encoder.encode(Conversation([Message(*m) for m in c]), row=i) for i, c in enumerate(conversations)]


@pytest.mark.parametrize("add_bos", [False, True])
@pytest.mark.parametrize("collate", [collate_padded, collate_packed])
def test_weight_one_is_bitwise_train_on_all(add_bos, collate):
    tokenizer = make_tiny_tokenizer(add_bos=add_bos)
    model = make_tiny_model(len(tokenizer))
    prefix = tokenizer_prefix_length(tokenizer)
    assert prefix == int(add_bos)
    everything = collate(_conversation_rows(tokenizer, "all"), 0)
    weighted = collate(_conversation_rows(tokenizer, "assistant"), 0, instruction_weight=1.0, prefix_length=prefix)
    assert torch.equal(weighted["input_ids"], everything["input_ids"])
    for chunk in (4096, 7):  # one chunk, and chunks of 7 rows in the fused head
        a = _grads(model, masked_lm_loss(model, everything, max_chunk_tokens=chunk).loss_sum)
        b = _grads(model, masked_lm_loss(model, weighted, max_chunk_tokens=chunk, instruction_weight=1.0).loss_sum)
        _assert_equal(a, b, exact=True)
    assert step_denominator([weighted], "token", 1.0) == step_normalizer([everything])
    assert step_row_count([weighted], 1.0) == step_row_count([everything])


@pytest.mark.parametrize("family", ["llama", "llama_tied", "gemma3", "cohere"])
@pytest.mark.parametrize("max_chunk_tokens", [4096, 5])
def test_weighted_loss_and_gradients_equal_full_logits_times_token_weights(family, max_chunk_tokens):
    model = make_tiny_family_model(family, VOCAB)
    rows = _rows(LENGTHS[:4])
    batch = collate_padded(rows, pad_token_id=0, instruction_weight=W)
    expected = _grads(model, _reference(model, rows, W))
    fused = _grads(model, masked_lm_loss(model, batch, max_chunk_tokens=max_chunk_tokens,
                                         instruction_weight=W).loss_sum)
    _assert_equal(expected, fused, exact=False)
    # The autograd path (per_row) gives the same sum.
    per_row = masked_lm_loss(model, batch, per_row=True, instruction_weight=W)
    _assert_equal(expected, _grads(model, per_row.loss_sum), exact=False)


def test_response_and_instruction_sums_are_the_unweighted_parts():
    model = make_tiny_model(VOCAB)
    rows = _rows(LENGTHS)
    batch = collate_padded(rows, pad_token_id=0, instruction_weight=W)
    out = masked_lm_loss(model, batch, instruction_weight=W)
    with torch.no_grad():
        response = token_losses(model, collate_padded(rows, pad_token_id=0))
        instruction_only = {**batch, "labels": batch["instruction_labels"]}
        instruction = token_losses(model, instruction_only)
    assert out.num_targets == count_targets(batch["labels"]) == response.numel()
    assert out.num_instruction_targets == count_instruction_targets(batch) == instruction.numel()
    torch.testing.assert_close(out.response_loss_sum, response.sum(), rtol=RTOL, atol=RTOL)
    torch.testing.assert_close(out.instruction_loss_sum, instruction.sum(), rtol=RTOL, atol=RTOL)
    torch.testing.assert_close(out.loss_sum.detach(), response.sum() + W * instruction.sum(), rtol=RTOL, atol=RTOL)
    assert out.response_loss_sum.requires_grad is False and out.instruction_loss_sum.requires_grad is False


# ---------------------------------------------------------------------------------------------------
# Exact normalisation: micro-batches and ranks

def _step(model, micro_batches, w, normalization="token"):
    """One step's loss and gradients, each micro-batch divided by the step's weight sum (or row count)."""
    denominator = step_denominator(micro_batches, normalization, w)
    model.zero_grad(set_to_none=True)
    total = torch.zeros(())
    for batch in micro_batches:
        out = masked_lm_loss(model, batch, per_row=normalization != "token", instruction_weight=w)
        loss = (out.loss_sum if normalization == "token" else row_mean_sum(out)) / denominator
        loss.backward()
        total += loss.detach()
    return total, {n: p.grad.clone() for n, p in model.named_parameters()}


def _split(rows, size, collate=collate_padded, w=W):
    return [collate(rows[i:i + size], pad_token_id=0, instruction_weight=w) for i in range(0, len(rows), size)]


@pytest.mark.parametrize("normalization", ["token", "sequence"])
def test_one_micro_batch_of_8_equals_8_of_1_and_packed(normalization):
    model = make_tiny_model(VOCAB)
    rows = _rows(LENGTHS)
    one_of_8 = _step(model, _split(rows, 8), W, normalization)
    _assert_equal(one_of_8, _step(model, _split(rows, 1), W, normalization), exact=False)
    _assert_equal(one_of_8, _step(model, _split(rows, 3, collate_packed), W, normalization), exact=False)
    # And it is the weighted loss itself: Σ w x -log p / Σ w (token), or the mean of the rows' weighted means.
    with torch.no_grad():
        if normalization == "token":
            weight_sum = sum(sum(token_weights(r, W)[1:]) for r in rows)
            expected = _reference(model, rows, W) / weight_sum
        else:
            expected = sum(_reference(model, [r], W) / sum(token_weights(r, W)[1:]) for r in rows) / len(rows)
    torch.testing.assert_close(one_of_8[0], expected, rtol=RTOL, atol=RTOL)


def test_the_weight_sum_is_the_same_number_however_the_step_is_split():
    rows = _rows(LENGTHS)
    n_response = sum(sum(label != IGNORE_INDEX for label in r.labels[1:]) for r in rows)
    n_instruction = sum(len(r) - 1 for r in rows) - n_response
    expected = n_response + W * n_instruction
    assert step_denominator(_split(rows, 8), "token", W) == expected
    assert step_denominator(_split(rows, 1), "token", W) == expected
    assert step_counts(_split(rows, 3), "token", 99, Parallel(), W) == (expected, n_response, 99, n_instruction)
    assert step_counts(_split(rows, 3), "sequence", 99, Parallel(), W) == (len(rows), n_response, 99, n_instruction)
    # w = 0: exactly the counts the masked loss always had, as ints.
    plain = [collate_padded(rows[i:i + 3], pad_token_id=0) for i in range(0, 8, 3)]
    assert step_counts(plain, "token", 99, Parallel(), 0.0) == (n_response, n_response, 99, 0)


class _Recorder(Parallel):
    """One process that remembers what it was asked to all-reduce."""

    def sum(self, *values):
        self.values = [float(v) for v in values]
        return self.values


class _TwoRanks(Parallel):
    """Rank r of 2 in one process: `sum` adds what the other rank contributes, as the all-reduce would."""

    def __init__(self, other: list[float]):
        super().__init__()
        self.other = other

    def sum(self, *values):
        return [float(v) + o for v, o in zip(values, self.other, strict=True)]


@pytest.mark.parametrize("normalization", ["token", "sequence"])
def test_two_ranks_equal_one_rank(normalization):
    """Each rank trains on its `rank_share` of every micro-batch and divides by the global denominator
    (`step_counts`, one all-reduce); the ranks' gradients, summed as DDP does, equal one rank's."""
    model = make_tiny_model(VOCAB)
    rows = _rows(LENGTHS)
    lengths = [len(r) for r in rows]
    groups = [list(range(0, 4)), list(range(4, 8))]  # two micro-batches of 4 rows
    whole = [collate_padded([rows[i] for i in g], 0, instruction_weight=W) for g in groups]
    one = _step(model, whole, W, normalization)
    batches = [[collate_padded([rows[i] for i in rank_share(g, lengths, 2, rank)], 0, instruction_weight=W)
                for g in groups] for rank in (0, 1)]
    total, grads = torch.zeros(()), {}
    for rank in (0, 1):
        other = _Recorder()
        step_counts(batches[1 - rank], normalization, 0, other, W)
        denominator = step_counts(batches[rank], normalization, 0, _TwoRanks(other.values), W)[0]
        assert denominator == step_denominator(whole, normalization, W)  # the same number on every rank
        model.zero_grad(set_to_none=True)
        for batch in batches[rank]:
            out = masked_lm_loss(model, batch, per_row=normalization != "token", instruction_weight=W)
            loss = (out.loss_sum if normalization == "token" else row_mean_sum(out)) / denominator
            loss.backward()
            total += loss.detach()
        for name, p in model.named_parameters():
            grads[name] = grads.get(name, 0) + p.grad
    _assert_equal(one, (total, grads), exact=False)


# ---------------------------------------------------------------------------------------------------
# The head sees positions of nonzero weight only

@pytest.mark.parametrize("w", [0.0, 0.01, 1.0])
def test_the_head_gets_exactly_the_positions_of_nonzero_weight(w, monkeypatch):
    model = make_tiny_model(VOCAB)
    rows = _rows(LENGTHS)
    batch = collate_padded(rows, pad_token_id=0, instruction_weight=w)
    seen = []
    fused = loss_module.fused_linear_cross_entropy

    def spy(hidden, *args, **kwargs):
        seen.append(hidden.shape[0])
        return fused(hidden, *args, **kwargs)

    monkeypatch.setattr(loss_module, "fused_linear_cross_entropy", spy)
    masked_lm_loss(model, batch, instruction_weight=w).loss_sum.backward()
    nonzero = sum(sum(weight > 0 for weight in token_weights(r, w)[1:]) for r in rows)
    assert seen == [nonzero]
    assert nonzero == count_targets(batch["labels"]) + (count_instruction_targets(batch) if w else 0)
    with torch.no_grad():  # the evaluation path too
        assert token_losses(model, batch, instruction_weight=w).numel() == nonzero


def test_an_empty_rank_share_stays_an_exact_zero():
    """A rank without rows trains on a filler row with no targets, instruction ones included."""
    from instructune.train.distributed import without_targets

    model = make_tiny_model(VOCAB)
    batch = without_targets(collate_padded(_rows([6]), pad_token_id=0, instruction_weight=W))
    batch.pop("instruction_labels")  # as the training loop does for a filler row
    out = masked_lm_loss(model, batch, instruction_weight=W)
    out.loss_sum.backward()
    assert float(out.loss_sum.detach()) == 0.0 and all(p.grad is not None and not p.grad.any() for p in model.parameters())
    assert step_denominator([batch], "token", W) == 0


# ---------------------------------------------------------------------------------------------------
# Whole runs: the training loop

@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    from train_fixtures import write_tiny_model, write_toy_data

    root = tmp_path_factory.mktemp("instruction_weight")
    return write_tiny_model(root / "model"), write_toy_data(root / "data.jsonl", rows=24)


def _train(tiny_run, output_dir, **extra):
    from instructune.train.config import load_config
    from instructune.train.loop import train
    from train_fixtures import quick_settings

    settings = {"max_steps": 4, "eval_every": 0, "save_every": 0, "grad_accum": 2, **extra}
    return train(load_config(overrides=quick_settings(*tiny_run, output_dir, **settings)))


def _final_weights(output_dir):
    from safetensors.torch import load_file

    from instructune.train.checkpoint import latest_checkpoint

    return load_file(latest_checkpoint(output_dir) / "model.safetensors")


def test_a_run_at_weight_one_is_bitwise_a_run_on_all_tokens(tiny_run, tmp_path):
    """The toy rows have no system prompt: w = 1 trains exactly what `train_on: all` trains."""
    from train_fixtures import train_records

    _train(tiny_run, tmp_path / "all", train_on="all")
    _train(tiny_run, tmp_path / "w1", instruction_weight=1.0)
    everything, weighted = train_records(tmp_path / "all"), train_records(tmp_path / "w1")
    for a, b in zip(everything, weighted, strict=True):
        if a["split"] == "train":
            assert b["loss"] == a["loss"] and b["grad_norm"] == a["grad_norm"]
            # Responses plus instructions (cumulative counts) are every token `all` trains.
            assert b["trained_tokens"] + b["instruction_tokens"] == a["trained_tokens"]
    weights_all, weights_w1 = _final_weights(tmp_path / "all"), _final_weights(tmp_path / "w1")
    assert all(torch.equal(weights_all[name], weights_w1[name]) for name in weights_all)


def test_a_weighted_run_logs_response_and_instruction_losses(tiny_run, tmp_path):
    from train_fixtures import train_records

    _train(tiny_run, tmp_path / "masked")
    _train(tiny_run, tmp_path / "weighted", instruction_weight=W)
    masked, weighted = train_records(tmp_path / "masked"), train_records(tmp_path / "weighted")
    assert "response_loss" not in masked[0] and "instruction_tokens" not in masked[0]  # w = 0: the old records
    first_masked, first = masked[0], weighted[0]
    # Step 1 starts from the same weights: its response loss is the masked run's loss (same targets, same sum
    # order up to the denominator), and the weighted loss is their weighted mean.
    assert first["trained_tokens"] == first_masked["trained_tokens"]
    assert abs(first["response_loss"] - first_masked["loss"]) <= RTOL * first_masked["loss"]
    n_r, n_i = first["trained_tokens"], first["instruction_tokens"]
    expected = (first["response_loss"] * n_r + W * first["instruction_loss"] * n_i) / (n_r + W * n_i)
    assert abs(first["loss"] - expected) <= RTOL * expected
    assert n_i > n_r  # the toy prompts (template text included) are longer than the answers


def test_two_ranks_equal_one_rank_with_a_weight_under_torchrun(tiny_run, tmp_path):
    import math
    import os
    import subprocess
    import sys

    import torch.distributed as dist

    from train_fixtures import train_records

    if not (dist.is_available() and dist.is_gloo_available()):
        pytest.skip("torch.distributed with gloo is not available")
    model, data = tiny_run
    settings = {"model": model, "data": data, "batch_size": 3, "grad_accum": 2, "lr": 1e-2, "max_steps": 3,
                "eval_fraction": 0, "save_every": 0, "log_every": 1, "instruction_weight": W, "dist_timeout_s": 60}
    (tmp_path / "run.yaml").write_text("".join(f"{k}: {v}\n" for k, v in settings.items()))
    from instructune.train.config import load_config
    from instructune.train.loop import train

    train(load_config(tmp_path / "run.yaml", [f"output_dir={tmp_path / 'one'}"]))
    env = {**os.environ, "OMP_NUM_THREADS": "1", "INSTRUCTUNE_CACHE": str(tmp_path / "cache")}
    done = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2",
                           "-m", "instructune", "train", str(tmp_path / "run.yaml"), f"output_dir={tmp_path / 'two'}"],
                          env=env, capture_output=True, text=True, timeout=240)
    assert done.returncode == 0, done.stderr[-4000:]
    one, two = train_records(tmp_path / "one"), train_records(tmp_path / "two")
    assert [r["step"] for r in one] == [r["step"] for r in two] == [1, 2, 3]
    for a, b in zip(one, two, strict=True):
        for key, value in a.items():
            if isinstance(value, float):
                assert math.isclose(b[key], value, rel_tol=RTOL, abs_tol=1e-7), (a["step"], key)
            else:
                assert b[key] == value, (a["step"], key)
    # Adam divides each update by the root of its second moment, so gradient differences at fp32 rounding
    # level grow a little over the steps: the weights get the tolerance test_distributed.py gives them.
    weights_one, weights_two = _final_weights(tmp_path / "one"), _final_weights(tmp_path / "two")
    for name, tensor in weights_one.items():
        torch.testing.assert_close(weights_two[name], tensor, rtol=1e-4, atol=1e-5, msg=name)


# ---------------------------------------------------------------------------------------------------
# `instructune explain --instruction-weight` (kept here with the rest of the weight's tests)

@pytest.fixture(scope="module")
def explained():
    from instructune.use.explain import example_conversation, explain_conversation

    tokenizer = make_tiny_tokenizer()
    model = make_tiny_model(len(tokenizer), seed=1).eval()
    conv = example_conversation("Which is the largest ocean?", "The Pacific Ocean.")

    def explain(w):
        return explain_conversation(model, tokenizer, tokenizer.chat_template, conv, instruction_weight=w)
    return model, tokenizer, explain


def test_explain_weight_zero_and_one_are_the_masked_and_unmasked_totals(explained):
    _, _, explain = explained
    zero, one = explain(0.0), explain(1.0)
    assert zero.weighted_loss_sum == zero.masked_loss_sum and zero.weighted_loss_mean == zero.masked_loss_mean
    assert one.weighted_loss_sum == one.unmasked_loss_sum and one.weighted_loss_mean == one.unmasked_loss_mean
    assert [t.weight for t in zero.tokens] == [float(t.trained) for t in zero.tokens]
    assert one.tokens[0].weight == 0.0 and all(t.weight == 1.0 for t in one.tokens[1:])
    assert explain(None).instruction_weight is None and all(t.weight is None for t in explain(None).tokens)


def test_explain_weighted_total_is_what_training_computes(explained):
    model, tokenizer, explain = explained
    e = explain(W)
    assert [t.weight for t in e.tokens] == [0.0] + [1.0 if t.trained else W for t in e.tokens[1:]]
    ids = [t.id for t in e.tokens]
    row = EncodedRow(row=0, input_ids=ids, labels=[t.id if t.trained else IGNORE_INDEX for t in e.tokens],
                     roles=[0] * len(ids))
    batch = collate_padded([row], 0, instruction_weight=W)
    with torch.no_grad():
        training = masked_lm_loss(model, batch, instruction_weight=W).loss_sum / step_denominator([batch], "token", W)
    assert e.weight_sum == step_denominator([batch], "token", W)
    # explain adds float64 losses (fsum), training fp32 ones: they agree to fp32 rounding.
    assert abs(e.weighted_loss_mean - float(training)) <= RTOL * float(training)


def test_explain_cli_shows_the_weight_column_and_refuses_a_weight_out_of_range(explained, tmp_path, capsys):
    import json

    from instructune.cli import main

    model, tokenizer, _ = explained
    model.save_pretrained(tmp_path / "model")
    tokenizer.save_pretrained(tmp_path / "model")
    out = tmp_path / "explain.json"
    page = tmp_path / "explain.html"
    flags = ["explain", "--model", str(tmp_path / "model"), "--instruction", "Which is the largest ocean?",
             "--response", "The Pacific Ocean."]
    assert main([*flags, "--instruction-weight", "0.25", "--json", str(out), "--html", str(page)]) == 0
    printed = capsys.readouterr().out
    assert "weight" in printed and "weighted (instruction_weight 0.25)" in printed
    data = json.loads(out.read_text())
    assert data["instruction_weight"] == 0.25
    assert data["weighted_loss_sum"] == pytest.approx(
        sum(t["weight"] * t["loss"] for t in data["tokens"][1:]), abs=1e-9)
    assert data["weighted_loss_mean"] == pytest.approx(data["weighted_loss_sum"] / data["weight_sum"], abs=1e-12)
    assert {t["weight"] for t in data["tokens"]} == {0.0, 0.25, 1.0}
    assert "<th class=n>weight</th>" in page.read_text() and "weighted (instruction_weight 0.25)" in page.read_text()
    assert main([*flags, "--instruction-weight", "1.5"]) == 2
    assert "--instruction-weight must be in [0, 1], got 1.5" in capsys.readouterr().err


@pytest.mark.parametrize("value", ["-0.1", "1.5"])
def test_a_weight_out_of_range_is_a_user_error_naming_the_key(value):
    from instructune.errors import UserError
    from instructune.train.config import load_config

    with pytest.raises(UserError, match=rf"instruction_weight.*must be in \[0, 1\], got {value}"):
        load_config(overrides=[f"instruction_weight={value}"])
    assert load_config(overrides=["instruction_weight=0.25"]).instruction_weight == 0.25
