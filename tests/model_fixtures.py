"""Shared pieces of the model tests: a sample text, logits of a model, adapters that change the output."""

from __future__ import annotations

import torch

SAMPLE = "What is the capital of France? Paris."


def logits_of(model, ids: list[int]) -> torch.Tensor:
    with torch.no_grad():
        return model(torch.tensor([ids])).logits


def perturb_adapters(peft_model) -> None:
    # Fresh LoRA B matrices are zero, so the adapter would change nothing; give them weights.
    torch.manual_seed(1)
    with torch.no_grad():
        for name, p in peft_model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.5)
