"""instructune's masks in the trainers people already run: TRL's `SFTTrainer` and transformers' `Trainer`
(with `instructune.Collator`) train on exactly the labels `instructune.encode` makes.

Each test takes the batches the trainer's own data loader builds, checks that the positions they score
are ours row for row, and that the model's loss on such a batch equals instructune's loss
(`masked_lm_loss`) on the same rows. Both are fp32 computations of one quantity, so each is held to a
float64 reference within `fp32_tolerance`, a worst-case rounding bound (not a tuned number): the loss
is a mean of `logsumexp(z) - z[y]`, which moves by at most twice the largest error of a logit, and a
logit is the end of a chain of at most `D` roundings (per layer: the q/k/v/o projections, attention's
softmax and weighted sum over the row, the MLP's up and down projections; then the head), each
relative to the magnitudes it adds up, so its error is at most `gamma(D) * M` with `M` the largest
`sum_i |W_vi| |h_ti|` over the scored positions and `gamma(n) = n u / (1 - n u)`, `u = 2**-24`.
The bound does not follow errors growing through the layers, which a 2-layer model with RMSNorm
hardly has. Measured on these batches: every fp32 loss (ours, transformers', TRL's fused head) within
6e-7 of float64, against bounds of 7e-5 to 1e-4. The labels themselves are compared exactly.
"""

from __future__ import annotations

import math

import pytest
import torch

from instructune import IGNORE_INDEX
from instructune.data.batching import collate_padded
from instructune.testing import make_tiny_model, make_tiny_tokenizer
from instructune.train.loss import masked_lm_loss

pytest.importorskip("trl")

U = 2.0 ** -24

RECORDS = [
    [{"role": "user", "content": "Which is the largest ocean?"}, {"role": "assistant", "content": "The Pacific."}],
    [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "What is the capital of France?"},
     {"role": "assistant", "content": "Paris."}, {"role": "user", "content": "How are you?"},
     {"role": "assistant", "content": "I am fine, thank you."}],
    [{"role": "user", "content": "Hello"}, {"role": "assistant", "content": "Hello world! How are you?"}],
    [{"role": "user", "content": "The quick brown fox?"}, {"role": "assistant", "content": "Jumps over the lazy dog."}],
    [{"role": "user", "content": "0123456789"}, {"role": "assistant", "content": "+ - * / = ( ) [ ] { }"}],
    [{"role": "user", "content": "Write a response."}, {"role": "assistant", "content": "The Pacific Ocean " * 4}],
    [{"role": "user", "content": "user assistant system"}, {"role": "assistant", "content": "tool"}],
    [{"role": "user", "content": "Paris?"}, {"role": "assistant", "content": "Paris is the capital of France."},
     {"role": "user", "content": "And the ocean?"}, {"role": "assistant", "content": "The Pacific."}],
]


@pytest.fixture(scope="module")
def tokenizer():
    return make_tiny_tokenizer()


@pytest.fixture(scope="module")
def prepared(tokenizer):
    import instructune

    prepared = instructune.encode(RECORDS, tokenizer, cache=False)
    assert len(prepared.rows) == len(RECORDS)
    assert len({tuple(row.input_ids) for row in prepared.rows}) == len(RECORDS)  # a batch row names its source row
    return prepared


def _model(tokenizer):
    model = make_tiny_model(len(tokenizer), hidden_size=32)
    assert model.config._attn_implementation == "sdpa"
    return model


def gamma(n: int) -> float:
    return n * U / (1 - n * U)


def fp32_tolerance(model64, batch: dict[str, torch.Tensor]) -> float:
    """The bound described in the module docstring, for `batch` (padded) under `model64` (float64)."""
    config = model64.config
    longest = batch["input_ids"].shape[1]
    chain = config.num_hidden_layers * (4 * config.hidden_size + 2 * longest + config.hidden_size
                                        + config.intermediate_size) + config.hidden_size
    with torch.no_grad():
        hidden = model64.model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).last_hidden_state
    scored = batch["labels"][:, 1:] != IGNORE_INDEX
    h = hidden[:, :-1][scored].abs()                                              # [targets, H]
    magnitude = float((h @ model64.lm_head.weight.abs().T).max())                 # max_t,v sum_i |W_vi| |h_ti|
    targets = int(scored.sum())
    return 2 * gamma(chain) * magnitude + gamma(targets) * 10  # + the mean's own sum (losses below 10)


def reference_loss(model64, batch: dict[str, torch.Tensor]) -> float:
    """The masked loss of a padded batch in float64 throughout, from the full logits."""
    with torch.no_grad():
        logits = model64(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    targets = batch["labels"][:, 1:]
    return float(torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), targets.reshape(-1),
                                                   ignore_index=IGNORE_INDEX, reduction="mean"))


def as_float64(model, tokenizer):
    copy = _model(tokenizer).double()
    copy.load_state_dict(model.state_dict())
    return copy.eval()


def ours(model, rows, tokenizer) -> tuple[dict[str, torch.Tensor], float]:
    """instructune's batch of `rows` and its loss: the loss instructune's training computes."""
    batch = collate_padded(rows, tokenizer.pad_token_id)
    with torch.no_grad():
        out = masked_lm_loss(model, batch)
    return batch, float(out.loss_sum / out.num_targets)


def rows_of_padded(batch, prepared) -> list:
    """The prepared rows a padded batch holds, found by their input_ids; checks its labels are theirs."""
    by_ids = {tuple(row.input_ids): row for row in prepared.rows}
    rows = []
    for i in range(batch["input_ids"].shape[0]):
        n = int(batch["attention_mask"][i].sum())
        row = by_ids[tuple(batch["input_ids"][i, :n].tolist())]
        assert batch["labels"][i, :n].tolist() == row.labels  # the scored positions are ours
        assert (batch["labels"][i, n:] == IGNORE_INDEX).all()  # padding never is
        rows.append(row)
    return rows


def rows_of_packed(batch, prepared) -> list:
    """The prepared rows a padding-free batch holds (split where position_ids restart); checks the labels."""
    by_ids = {tuple(row.input_ids): row for row in prepared.rows}
    assert "attention_mask" not in batch and batch["input_ids"].shape[0] == 1
    starts = (batch["position_ids"][0] == 0).nonzero().flatten().tolist() + [batch["input_ids"].shape[1]]
    rows = []
    for start, end in zip(starts, starts[1:]):
        row = by_ids[tuple(batch["input_ids"][0, start:end].tolist())]
        assert batch["labels"][0, start:end].tolist() == row.labels  # first label -100 in a prepared row anyway
        rows.append(row)
    assert batch["cu_seq_lens_q"].tolist() == starts
    return rows


def check_loss(model, loss: float, rows, tokenizer) -> float:
    """`loss` (a trainer's, on `rows`) and instructune's on the same rows agree with the float64 reference
    within the fp32 bound; returns the bound."""
    batch, our_loss = ours(model, rows, tokenizer)
    model64 = as_float64(model, tokenizer)
    reference, tolerance = reference_loss(model64, batch), fp32_tolerance(model64, batch)
    assert tolerance < 1e-3  # a sanity cap: the bound of these tiny batches is ~1e-4
    assert abs(our_loss - reference) <= tolerance
    assert abs(loss - reference) <= tolerance, (loss, reference, tolerance)
    return tolerance


def test_trl_sft_trainer_scores_exactly_our_labels(tmp_path, tokenizer, prepared):
    from trl import SFTConfig, SFTTrainer

    model = _model(tokenizer)
    args = SFTConfig(output_dir=str(tmp_path), per_device_train_batch_size=3, max_length=None, report_to=[],
                     use_cpu=True, max_steps=1, save_strategy="no", logging_steps=1, learning_rate=1e-3,
                     seed=0, disable_tqdm=True)
    trainer = SFTTrainer(model=model, args=args, train_dataset=prepared.to_hf(), processing_class=tokenizer)

    seen = []
    model.eval()
    for batch in trainer.get_train_dataloader():  # an epoch of the batches TRL's own loader builds
        rows = rows_of_padded(batch, prepared)
        seen += [row.row for row in rows]
        with torch.no_grad():
            transformers_loss = float(model(**batch).loss)              # the model's own loss on TRL's batch
            trl_loss = float(trainer.compute_loss(model, dict(batch)))  # TRL's (its fused head)
        check_loss(model, transformers_loss, rows, tokenizer)
        check_loss(model, trl_loss, rows, tokenizer)
    assert sorted(seen) == list(range(len(RECORDS)))

    # One TRL step: the batch it trains on holds our labels, and the loss it backpropagates is ours.
    model.train()
    trained = []
    compute_loss = trainer.compute_loss

    def recording(model, inputs, *a, **kw):
        loss = compute_loss(model, inputs, *a, **kw)
        rows = rows_of_padded(inputs, prepared)
        trained.append((float(loss), rows))
        return loss

    trainer.compute_loss = recording
    before = [p.detach().clone() for p in model.parameters()]
    trainer.train()
    assert trainer.state.global_step == 1 and len(trained) == 1
    loss, rows = trained[0]
    model_before = _model(tokenizer)
    model_before.load_state_dict(dict(zip(dict(model.named_parameters()), before)), strict=False)
    check_loss(model_before.eval(), loss, rows, tokenizer)
    assert any(not torch.equal(p, q) for p, q in zip(before, model.parameters()))


@pytest.mark.parametrize("packing", [False, True])
def test_transformers_trainer_with_the_collator_scores_exactly_our_labels(tmp_path, tokenizer, prepared, packing):
    from transformers import Trainer, TrainingArguments

    from instructune import Collator

    model = _model(tokenizer)
    args = TrainingArguments(output_dir=str(tmp_path), per_device_train_batch_size=3, report_to=[], use_cpu=True,
                             max_steps=1, save_strategy="no", logging_steps=1, learning_rate=1e-3, seed=0,
                             disable_tqdm=True)
    trainer = Trainer(model=model, args=args, train_dataset=prepared.to_hf(),
                      data_collator=Collator(tokenizer, packing=packing))
    seen = []
    model.eval()
    for batch in trainer.get_train_dataloader():
        rows = rows_of_packed(batch, prepared) if packing else rows_of_padded(batch, prepared)
        seen += [row.row for row in rows]
        with torch.no_grad():
            loss = float(model(**batch).loss)
        # Packed: rows attend only within themselves, or this would not equal the padded reference.
        check_loss(model, loss, rows, tokenizer)
    assert sorted(seen) == list(range(len(RECORDS)))

    model.train()
    result = trainer.train()
    assert trainer.state.global_step == 1 and math.isfinite(result.training_loss)


def test_the_collator_is_instructunes_own_batching(tokenizer, prepared):
    from instructune import Collator

    features = [dict(row) for row in prepared.to_hf()][:3]
    padded = Collator(tokenizer)(features)
    assert set(padded) == {"input_ids", "labels", "attention_mask"}
    assert all(torch.equal(padded[k], v) for k, v in collate_padded(prepared.rows[:3], tokenizer.pad_token_id).items())
    packed = Collator(tokenizer, packing=True, pad_to_multiple_of=8)(features)
    lengths = [len(row) for row in prepared.rows[:3]]
    assert packed["input_ids"].shape[1] % 8 == 0
    assert packed["cu_seq_lens_q"].tolist()[:4] == [0, lengths[0], lengths[0] + lengths[1], sum(lengths)]
    assert packed["max_length_q"] == max(max(lengths), packed["input_ids"].shape[1] - sum(lengths))
    with pytest.raises(ValueError, match="tokenizer or a pad_token_id"):
        Collator()
