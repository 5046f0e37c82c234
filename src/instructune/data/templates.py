"""Chat templates: the tokenizer's own, a Jinja file the user gives, or a built-in by name.

Built-ins:
- `alpaca`: the exact Stanford Alpaca prompt (with and without input), the response followed by EOS.
- `chatml`: `<|im_start|>role\\ncontent<|im_end|>\\n`, generation prompt `<|im_start|>assistant\\n`.
- `plain`: the prompt text, a newline, the response and EOS; nothing else.

A built-in whose markers are not in the tokenizer's vocabulary (ChatML on a tokenizer that lacks
`<|im_start|>`/`<|im_end|>`) gets them added as special tokens by `add_template_tokens`, so each marker
is one token the model can learn to emit; training then resizes the embeddings to match.
"""

from __future__ import annotations

import os
from pathlib import Path

from instructune.errors import UserError

ALPACA_PREAMBLE = (
    "Below is an instruction that describes a task. "
    "Write a response that appropriately completes the request."
)
ALPACA_PREAMBLE_WITH_INPUT = (
    "Below is an instruction that describes a task, paired with an input that provides further context. "
    "Write a response that appropriately completes the request."
)

# The Alpaca reader gives each user turn `instruction` and `input` fields next to its content; a user
# turn from another format only has content, which then serves as the instruction. A system message
# replaces the preamble.
ALPACA_TEMPLATE = (
    "{%- for message in messages -%}"
    "{%- if message['role'] == 'system' -%}"
    "{{ message['content'] + '\n\n' }}"
    "{%- elif message['role'] == 'user' -%}"
    "{%- set instruction = message.get('instruction', message['content']) -%}"
    "{%- set input = message.get('input', '') or '' -%}"
    "{%- if loop.first -%}"
    "{{ ('" + ALPACA_PREAMBLE_WITH_INPUT + "' if input else '" + ALPACA_PREAMBLE + "') + '\n\n' }}"
    "{%- endif -%}"
    "{{ '### Instruction:\n' + instruction + '\n\n' }}"
    "{%- if input -%}{{ '### Input:\n' + input + '\n\n' }}{%- endif -%}"
    "{{ '### Response:\n' }}"
    "{%- elif message['role'] == 'assistant' -%}"
    "{{ message['content'] + eos_token }}{%- if not loop.last -%}{{ '\n\n' }}{%- endif -%}"
    "{%- else -%}"
    "{{ '### Observation:\n' + message['content'] + '\n\n' }}"
    "{%- endif -%}"
    "{%- endfor -%}"
)

CHATML_TEMPLATE = (
    "{%- for message in messages -%}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{ '<|im_start|>assistant\n' }}{%- endif -%}"
)

PLAIN_TEMPLATE = (
    "{%- for message in messages -%}"
    "{%- if message['role'] == 'assistant' -%}{{ message['content'] + eos_token }}"
    "{%- if not loop.last -%}{{ '\n' }}{%- endif -%}"
    "{%- else -%}{{ message['content'] + '\n' }}{%- endif -%}"
    "{%- endfor -%}"
)

BUILTIN_TEMPLATES = {"alpaca": ALPACA_TEMPLATE, "chatml": CHATML_TEMPLATE, "plain": PLAIN_TEMPLATE}
BUILTIN_MARKERS = {"chatml": ["<|im_start|>", "<|im_end|>"]}

# Tokens that close a turn in the common chat formats; the tokenizer's EOS is always one too.
END_OF_TURN_MARKERS = (
    "<|im_end|>", "<|eot_id|>", "<|eom_id|>", "<end_of_turn>", "<|end|>", "<|endoftext|>",
    "<|end_of_text|>", "</s>", "<｜end▁of▁sentence｜>", "<|END_OF_TURN_TOKEN|>", "[/TOOL_CALLS]",
)


def _choices_text() -> str:
    return f"choose --template {'|'.join(BUILTIN_TEMPLATES)} or --template path/to/template.jinja"


def resolve_template(template: str | os.PathLike | None, tokenizer) -> str:
    """The Jinja chat template to use: a built-in name, a file's contents, or the tokenizer's own."""
    if template is None or template == "":
        own = getattr(tokenizer, "chat_template", None)
        if isinstance(own, dict):  # named templates: the default one trains
            own = own.get("default")
        if not own:
            name = getattr(tokenizer, "name_or_path", "") or "the tokenizer"
            raise UserError(f"{name} has no chat template; {_choices_text()}")
        return own
    text = str(template)
    if text in BUILTIN_TEMPLATES:
        return BUILTIN_TEMPLATES[text]
    path = Path(text).expanduser()
    if path.is_file():
        try:
            return path.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as error:
            raise UserError(f"cannot read template file {path}: {error}") from None
    raise UserError(f"unknown template {text!r}: not a built-in and no such file; {_choices_text()}")


def template_name(template: str | os.PathLike | None) -> str:
    """A short human name for a template choice (for reports and cache keys)."""
    if template is None or template == "":
        return "tokenizer"
    return str(template) if str(template) in BUILTIN_TEMPLATES else Path(str(template)).name


def add_template_tokens(tokenizer, template: str | os.PathLike | None) -> list[str]:
    """Add a built-in template's markers the vocabulary lacks as special tokens; returns those added.

    The caller that owns a model must then resize its embeddings to `len(tokenizer)`.
    """
    markers = BUILTIN_MARKERS.get(str(template) if template is not None else "", [])
    vocab = tokenizer.get_vocab()
    missing = [m for m in markers if m not in vocab]
    if missing:
        tokenizer.add_special_tokens({"additional_special_tokens": missing}, replace_extra_special_tokens=False)
    return missing


def end_of_turn_token_ids(tokenizer, template_text: str) -> list[int]:
    """Token ids that end an assistant turn under this template (for stopping generation)."""
    ids = []
    if tokenizer.eos_token_id is not None:
        ids.append(tokenizer.eos_token_id)
    vocab = tokenizer.get_vocab()
    for marker in END_OF_TURN_MARKERS:
        if marker in template_text and marker in vocab and vocab[marker] not in ids:
            ids.append(vocab[marker])
    return ids
