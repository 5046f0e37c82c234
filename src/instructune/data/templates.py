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
import re
from functools import lru_cache
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
    "<|return|>", "<|call|>",  # gpt-oss: the final turn ends with <|return|>, a tool call with <|call|>
)


def _choices_text() -> str:
    return f"choose --template {'|'.join(BUILTIN_TEMPLATES)} or --template path/to/template.jinja"


def resolve_template(template: str | os.PathLike | None, tokenizer) -> str:
    """The Jinja chat template to use: a built-in name, a file's contents, or the tokenizer's own.

    The text is compiled here, once, as rendering will compile it: a syntax error is a `UserError`
    naming the template, line and column, before any row is read (not a `template_error` per row).
    """
    if template is None or template == "":
        own = getattr(tokenizer, "chat_template", None)
        if isinstance(own, dict):  # named templates: the default one trains
            own = own.get("default")
        if not own:
            name = getattr(tokenizer, "name_or_path", "") or "the tokenizer"
            raise UserError(f"{name} has no chat template; {_choices_text()}")
        check_template_syntax(own, "the tokenizer's chat template")
        return own
    text = str(template)
    if text in BUILTIN_TEMPLATES:
        return BUILTIN_TEMPLATES[text]
    path = Path(text).expanduser()
    if path.is_file():
        try:
            source = path.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as error:
            raise UserError(f"cannot read template file {path}: {error}") from None
        check_template_syntax(source, f"template file {path}")
        return source
    raise UserError(f"unknown template {text!r}: not a built-in and no such file; {_choices_text()}")


def check_template_choice(template: str | os.PathLike | None) -> None:
    """Check a template given by name or path before anything else is loaded: a template file must
    exist and compile. Nothing to check for a built-in or the tokenizer's own (that needs the tokenizer)."""
    if template is None or template == "" or str(template) in BUILTIN_TEMPLATES:
        return
    resolve_template(template, None)


def check_template_syntax(text: str, what: str) -> None:
    """Compile `text` as `apply_chat_template` does; a syntax error is a one-line `UserError` such as
    `template file chat.jinja, line 3, column 22: unexpected '}'`."""
    import jinja2

    try:
        _compile(text)
    except jinja2.TemplateSyntaxError as error:
        where = what
        if error.lineno:
            where += f", line {error.lineno}"
            column = _error_column(text, error.lineno)
            if column is not None:
                where += f", column {column}"
        message = " ".join(str(error.message or error).split())
        raise UserError(f"{where}: Jinja syntax error: {message}") from None


@lru_cache(maxsize=16)
def _compile(text: str) -> None:
    from transformers.utils.chat_template_utils import _compile_jinja_template

    _compile_jinja_template(text)


def _error_column(text: str, lineno: int) -> int | None:
    """The 1-based column of the syntax error on line `lineno`, found by parsing again while tracking
    where each token starts (jinja2 reports only the line); None when that parse disagrees on the line."""
    import jinja2
    from jinja2.ext import Extension, loopcontrols
    from jinja2.lexer import TokenStream
    from jinja2.parser import Parser
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    source = "\n".join(re.split(r"\r\n|\r|\n", text))  # what the lexer sees
    last, starts, lexer_failed = [0, 0], {}, []  # last: where the last token read starts and ends

    def tracked(raw):  # the lexer's tokens, with the end of the last one read
        try:
            for lineno_, kind, value in raw:
                found = source.find(value, last[1]) if value else -1
                if found >= 0:
                    last[:] = [found, found + len(value)]
                yield lineno_, kind, value
        except jinja2.TemplateSyntaxError:
            lexer_failed.append(True)
            raise

    def located(tokens):  # the parser's tokens, each with where it starts
        for token in tokens:
            starts[id(token)] = (token, last[0])
            yield token

    class Generation(Extension):  # transformers' {% generation %} tag, parsed the same way
        tags = {"generation"}

        def parse(self, parser):
            lineno_ = next(parser.stream).lineno
            body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
            return jinja2.nodes.Output(body).set_lineno(lineno_)

    class Located(ImmutableSandboxedEnvironment):
        def _tokenize(self, source_, name, filename=None, state=None):
            raw = tracked(self.lexer.tokeniter(source_, name, filename, state))
            return TokenStream(located(self.lexer.wrap(raw, name, filename)), name, filename)

    env = Located(trim_blocks=True, lstrip_blocks=True, extensions=[Generation, loopcontrols])
    parser = None
    try:
        parser = Parser(env, source)
        parser.parse()
    except jinja2.TemplateSyntaxError as error:
        if error.lineno != lineno:
            return None
        if lexer_failed or parser is None:  # stopped before the bad character: the first non-blank one
            offset = last[1]
            while offset < len(source) and source[offset] in " \t":
                offset += 1
        else:  # stopped at the token it could not use
            current = parser.stream.current
            entry = starts.get(id(current))
            offset = entry[1] if entry is not None and entry[0] is current else len(source)
        if source.count("\n", 0, offset) + 1 != lineno:
            return None
        return offset - (source.rfind("\n", 0, offset) + 1) + 1
    return None


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
    """Token ids that end an assistant turn under this template (for stopping generation): the EOS, the
    closing marker the template writes after an assistant turn (derived from its renders, as training
    does) when it is one token, and the known markers the template names."""
    from instructune.data.encode import ConversationEncoder

    ids = []
    if tokenizer.eos_token_id is not None:
        ids.append(tokenizer.eos_token_id)
    vocab = tokenizer.get_vocab()
    try:
        derived = ConversationEncoder(tokenizer, template_text).closing_markers
    except Exception:  # a template the probes cannot render: the known markers below still apply
        derived = []
    for marker in [*derived, *(m for m in END_OF_TURN_MARKERS if m in template_text)]:
        if marker in vocab and vocab[marker] not in ids:
            ids.append(vocab[marker])
    return ids
