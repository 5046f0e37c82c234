"""The tokenizer as GGUF metadata: the vocabulary, how llama.cpp must split and merge text, special ids.

llama.cpp re-implements tokenization from this metadata alone, so every piece of it must describe the
Hugging Face tokenizer exactly:

- byte-level BPE (GPT-2 style: Llama 3, SmolLM, Qwen): tokenizer model `gpt2`, the tokens in id order,
  the merges in rank order, and the pre-tokenizer's splitting rule named as one llama.cpp knows (`pre`);
- SentencePiece-style BPE with byte fallback (Gemma, Llama 2): tokenizer model `llama`, the tokens,
  `<0xNN>` byte tokens marked as bytes, and a score per token that ranks merges the way the BPE merge
  list does (llama.cpp merges the adjacent pair whose result scores highest).

Added tokens keep their kind: special ones are control tokens (matched before splitting, never
produced from text), others user-defined.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field

import gguf

from instructune.errors import UserError

_BYTE_TOKEN = re.compile(r"^<0x[0-9A-Fa-f]{2}>$")


@dataclass
class Vocabulary:
    """Everything llama.cpp needs to tokenize like the Hugging Face tokenizer and stop at the end of a turn."""

    model: str
    """`gpt2` (byte-level BPE) or `llama` (SentencePiece-style BPE)."""
    pre: str | None
    """gpt2 only: llama.cpp's name for the pre-tokenizer's splitting rule."""
    tokens: list[str]
    types: list[int]
    merges: list[str] = field(default_factory=list)
    scores: list[float] | None = None
    special_ids: dict[str, int] = field(default_factory=dict)
    """bos, eos, eot, unk, pad: whichever the tokenizer has."""
    add_bos: bool = False
    chat_template: str | None = None

    def write(self, writer: gguf.GGUFWriter) -> None:
        """Add the tokenizer keys to a GGUF file being written."""
        writer.add_tokenizer_model(self.model)
        if self.pre is not None:
            writer.add_tokenizer_pre(self.pre)
        writer.add_token_list(self.tokens)
        writer.add_token_types(self.types)
        if self.scores is not None:
            writer.add_token_scores(self.scores)
        if self.merges:
            writer.add_token_merges(self.merges)
        adders = {"bos": writer.add_bos_token_id, "eos": writer.add_eos_token_id, "eot": writer.add_eot_token_id,
                  "unk": writer.add_unk_token_id, "pad": writer.add_pad_token_id}
        for name, token_id in self.special_ids.items():
            adders[name](token_id)
        writer.add_add_bos_token(self.add_bos)
        writer.add_add_eos_token(False)  # a chat prompt never ends with EOS: the answer follows
        if self.model == "llama":
            writer.add_add_space_prefix(False)  # the HF tokenizers of these models add no leading space
        if self.chat_template:
            writer.add_chat_template(self.chat_template)


def read_vocabulary(tokenizer, vocab_size: int, end_of_turn_id: int | None) -> Vocabulary:
    """The GGUF tokenizer metadata of a Hugging Face fast tokenizer, padded to the model's `vocab_size` rows.

    `end_of_turn_id` is the token that ends an assistant turn (written as llama.cpp's EOT, so generation
    stops there even when it is not the tokenizer's EOS).
    """
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None:
        raise UserError("GGUF export needs a fast tokenizer (tokenizer.json); this model has only a slow one")
    spec = json.loads(backend.to_str())
    model = spec.get("model") or {}
    if model.get("type") != "BPE":
        raise UserError(f"GGUF export supports BPE tokenizers; this one is {model.get('type')!r}")
    tokens, types = _tokens_and_types(tokenizer, spec, vocab_size)
    merges = [" ".join(pair) if isinstance(pair, list) else pair for pair in model.get("merges", [])]
    if model.get("byte_fallback"):
        kind, pre, scores = "llama", None, _merge_scores(tokens, merges)
        types = [gguf.TokenType.BYTE if kind_ == gguf.TokenType.NORMAL and _BYTE_TOKEN.match(token) else kind_
                 for token, kind_ in zip(tokens, types)]
        merges = []  # llama.cpp's SentencePiece tokenizer reads the scores, not a merge list
    else:
        kind, pre, scores = "gpt2", _pre_tokenizer_name(spec.get("pre_tokenizer")), None
    special = {"bos": tokenizer.bos_token_id, "eos": tokenizer.eos_token_id, "unk": tokenizer.unk_token_id,
               "pad": tokenizer.pad_token_id, "eot": end_of_turn_id}
    probe = tokenizer("a").input_ids
    add_bos = tokenizer.bos_token_id is not None and bool(probe) and probe[0] == tokenizer.bos_token_id
    return Vocabulary(kind, pre, tokens, [int(t) for t in types], merges, scores,
                      {name: int(i) for name, i in special.items() if i is not None}, add_bos,
                      _chat_template(tokenizer))


def _tokens_and_types(tokenizer, spec: dict, vocab_size: int) -> tuple[list[str], list[int]]:
    """Every token in id order with its GGUF type; ids the tokenizer lacks become unused `[PAD<id>]` rows."""
    by_id = {token_id: token for token, token_id in tokenizer.get_vocab().items()}
    if by_id and max(by_id) >= vocab_size:
        raise UserError(f"the tokenizer has token id {max(by_id)} but the model's embedding has only {vocab_size} "
                        "rows; resize the model's embeddings to the tokenizer before exporting")
    added = {entry["id"]: entry for entry in spec.get("added_tokens", [])}
    tokens, types = [], []
    for token_id in range(vocab_size):
        token = by_id.get(token_id)
        if token is None:
            tokens.append(f"[PAD{token_id}]")
            types.append(gguf.TokenType.UNUSED)
        elif token_id in added:
            tokens.append(token)
            types.append(gguf.TokenType.CONTROL if added[token_id].get("special") else gguf.TokenType.USER_DEFINED)
        else:
            tokens.append(token)
            types.append(gguf.TokenType.NORMAL)
    return tokens, types


def _merge_scores(tokens: list[str], merges: list[str]) -> list[float]:
    """A score per token that makes llama.cpp's highest-score-first merging follow the BPE merge ranks."""
    rank = {}
    for index, merge in enumerate(merges):
        rank.setdefault(merge.replace(" ", "", 1), index)
    # Tokens no merge makes (single characters, bytes, added tokens) are never a merge's result: any score.
    return [-float(rank.get(token, len(merges))) for token in tokens]


def _pre_tokenizer_name(pre: dict | None) -> str:
    """llama.cpp's name for a byte-level BPE pre-tokenizer; only splitting rules known to match exactly."""
    steps = pre.get("pretokenizers", []) if pre and pre.get("type") == "Sequence" else [pre] if pre else []
    kinds = [(step.get("type"), step.get("individual_digits"), step.get("use_regex", True)) for step in steps]
    if kinds == [("ByteLevel", None, True)]:
        return "gpt-2"  # GPT-2's regex, which HF's ByteLevel uses
    if kinds == [("Digits", True, True), ("ByteLevel", None, True)]:
        return "smollm"  # each digit alone, then GPT-2's regex (SmolLM, SmolLM2)
    described = " + ".join(str(kind[0]) for kind in kinds) or "none"
    raise UserError(f"GGUF export does not know llama.cpp's name for this tokenizer's pre-tokenizer ({described}); "
                    "supported: byte-level BPE with GPT-2's splitting (optionally digits split first), and "
                    "SentencePiece-style BPE with byte fallback")


def _chat_template(tokenizer) -> str | None:
    template = tokenizer.chat_template
    if isinstance(template, dict):  # several named templates: llama.cpp reads the default one
        template = template.get("default")
    return template
