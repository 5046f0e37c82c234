"""Choosing a chat template: a broken one is a one-line error naming where, before any row is read."""

from __future__ import annotations

from pathlib import Path

import pytest

from instructune.data.templates import (
    BUILTIN_TEMPLATES,
    check_template_choice,
    check_template_syntax,
    resolve_template,
)
from instructune.errors import UserError
from instructune.testing import make_tiny_tokenizer

FIXTURES = Path(__file__).resolve().parents[1] / "fixtures" / "chat_templates"

# The template: `{{ m['content'] }` is unclosed (line 2, column 17 is the lone `}`), no `endfor`.
BROKEN = "{% for m in messages %}\n{{ m['content'] }\n"


def test_a_template_file_with_a_syntax_error_names_the_file_line_and_column(tmp_path):
    path = tmp_path / "chat.jinja"
    path.write_text(BROKEN)
    with pytest.raises(UserError) as info:
        resolve_template(str(path), make_tiny_tokenizer())
    assert str(info.value) == f"template file {path}, line 2, column 17: Jinja syntax error: unexpected '}}'"
    with pytest.raises(UserError, match=r"line 2, column 17"):
        check_template_choice(str(path))  # without a tokenizer: what commands call before loading anything


def test_the_tokenizers_own_template_is_checked_too():
    tokenizer = make_tiny_tokenizer(chat_template="{% for m in messages %}{{ m['content'] }}")
    with pytest.raises(UserError) as info:
        resolve_template(None, tokenizer)
    message = str(info.value)  # column 42: just past the end of the 41 characters, where `endfor` is missing
    assert message.startswith("the tokenizer's chat template, line 1, column 42: Jinja syntax error: "
                              "Unexpected end of template")
    assert "\n" not in message


@pytest.mark.parametrize("source, where", [
    ("a\n  {{ x + }}\n", "line 2, column 10"),  # the parser stops at `}}`
    ("a\n {{ \"abc }}", "line 2, column 5"),  # the lexer stops at the unclosed string
    ("{% if x %}\n  {% endfor %}", "line 2, column 6"),  # the wrong end tag
    ("x\n{{ 'x' 'y' ) }}", "line 2, column 12"),
])
def test_the_column_points_at_the_offending_token(source, where):
    with pytest.raises(UserError, match=f"^t.jinja, {where}: Jinja syntax error: "):
        check_template_syntax(source, "t.jinja")


def test_valid_templates_pass_including_generation_blocks_and_loop_controls():
    for text in [*BUILTIN_TEMPLATES.values(), make_tiny_tokenizer().chat_template,
                 "{% for m in messages %}{% if loop.index > 3 %}{% break %}{% endif %}"
                 "{% generation %}{{ m['content'] }}{% endgeneration %}{% endfor %}"]:
        check_template_syntax(text, "t")
    for path in sorted(FIXTURES.glob("*.jinja")):  # real models' templates, where present
        check_template_syntax(path.read_text(encoding="utf-8"), path.name)


def test_a_missing_template_file_is_still_named():
    with pytest.raises(UserError, match="unknown template 'nope.jinja': not a built-in and no such file"):
        check_template_choice("nope.jinja")
    check_template_choice(None)
    check_template_choice("chatml")
