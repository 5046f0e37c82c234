"""A data collator for transformers' `Trainer` (and TRL's `SFTTrainer`): instructune's batches of
prepared rows, labels untouched.

Given rows with `input_ids` and `labels` (what `instructune prepare` writes, `PreparedDataset.to_hf()`
gives, or `EncodedRow`s), it builds the very batches instructune trains on (`batching.collate_padded`,
`batching.collate_packed`), so the positions a model scores are the rows' own labels and nothing else:

- padded (the default): `input_ids`, `labels` (-100 on padding) and `attention_mask`, right-padded;
- packed (`packing=True`, padding-free): the rows concatenated into one sequence with `position_ids`
  restarting at every row, and no `attention_mask`. transformers keeps attention within each row from
  the restarting `position_ids` (SDPA, eager and flex build the block-diagonal causal mask,
  flash-attention runs per row), and the row boundaries also come as flash-attention's
  `cu_seq_lens_q`/`cu_seq_lens_k`/`max_length_q`/`max_length_k`. The first label of every row is -100
  (it would be predicted from the previous row), which it is in a prepared row anyway (rule 1).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch

from instructune.data.batching import collate_packed, collate_padded, pad_token_id
from instructune.data.encoded import EncodedRow


@dataclass
class Collator:
    """Batches of prepared rows for transformers' `Trainer` (`data_collator=Collator(tokenizer)`).

    Example::

        from transformers import Trainer, TrainingArguments
        import instructune

        prepared = instructune.encode("data.jsonl", "HuggingFaceTB/SmolLM2-135M-Instruct")
        trainer = Trainer(model=model, args=TrainingArguments("out", remove_unused_columns=False),
                          train_dataset=prepared.to_hf(),
                          data_collator=instructune.Collator(prepared.tokenizer))
    """

    tokenizer: object = None
    """The tokenizer, for its pad id (its pad token, else its EOS); or give `pad_token_id`."""
    packing: bool = False
    """One padding-free sequence per batch (`position_ids`, no `attention_mask`) instead of padded rows."""
    pad_to_multiple_of: int | None = None
    pad_token_id: int | None = None

    def __post_init__(self):
        if self.pad_token_id is None:
            if self.tokenizer is None:
                raise ValueError("Collator needs a tokenizer or a pad_token_id")
            self.pad_token_id = pad_token_id(self.tokenizer)

    def __call__(self, features: Sequence[Mapping | EncodedRow]) -> dict[str, torch.Tensor]:
        """One batch of `features` (rows with `input_ids` and `labels`; other columns are ignored)."""
        if not self.packing:
            return collate_padded(features, self.pad_token_id, self.pad_to_multiple_of)
        batch = collate_packed(features, self.pad_token_id, self.pad_to_multiple_of)
        boundaries = batch.pop("cu_seq_lens")
        longest = int(boundaries.diff().max())
        batch.update(cu_seq_lens_q=boundaries, cu_seq_lens_k=boundaries, max_length_q=longest, max_length_k=longest)
        return batch
