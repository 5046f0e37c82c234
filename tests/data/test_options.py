"""`EncodingOptions`: one frozen, checked object for every encoding setting, the single source of its
choices, and the preparation cache key that follows its fields."""

import argparse
import ast
import dataclasses
import inspect
import subprocess
import sys

import pytest

from instructune.commands.arguments import add_encoding_arguments, encoding_options
from instructune.data import prepare
from instructune.data.conversation import Conversation, Message
from instructune.data.options import (
    HISTORY,
    ON_BAD_ROW,
    REASONING,
    SYSTEM,
    TRAIN_ON,
    TRAIN_ON_EOS,
    TRUNCATION,
    EncodingOptions,
    OptionError,
)
from instructune.data.templates import resolve_template
from instructune.errors import UserError
from instructune.testing import make_tiny_tokenizer
from instructune.train.config import CHOICES, load_config

FIELDS = [f.name for f in dataclasses.fields(EncodingOptions)]

# A valid value other than the default, for every field; a field added later must be added here.
OTHER_VALUE = {"template": "chatml", "data_format": "alpaca", "train_on": "all", "max_length": 64,
               "truncation": "drop", "on_bad_row": "skip", "history": "expand", "reasoning": "mask",
               "train_on_eos": "none", "system_role": "merge", "template_vars": {"functions": []}}


@pytest.mark.parametrize("name, value, message", [
    ("template", 7, "template must be a string or null, got 7"),
    ("data_format", "xml", "data_format must be a known format; unknown data format 'xml'"),
    ("train_on", "everything", "train_on must be one of assistant, last, all, got 'everything'"),
    ("truncation", "middle", "truncation must be one of keep_response, keep_start, drop, got 'middle'"),
    ("on_bad_row", "ignore", "on_bad_row must be one of error, skip, got 'ignore'"),
    ("max_length", 1, "max_length must be at least 2 (or null), got 1"),
    ("max_length", 0, "max_length must be at least 2 (or null), got 0"),
    ("max_length", "64", "max_length must be an integer or null, got '64'"),
    ("max_length", True, "max_length must be an integer or null, got True"),
])
def test_each_check_is_a_user_error_naming_the_field(name, value, message):
    with pytest.raises(UserError) as info:
        EncodingOptions(**{name: value})
    assert isinstance(info.value, OptionError) and info.value.field == name
    assert str(info.value).startswith(message)


def test_every_field_has_a_one_line_docstring_and_a_valid_other_value():
    body = ast.parse(inspect.getsource(EncodingOptions)).body[0].body
    docs = {node.target.id: following.value.value for node, following in zip(body, body[1:])
            if isinstance(node, ast.AnnAssign) and isinstance(following, ast.Expr)}
    assert set(docs) == set(FIELDS) and all(doc and "\n" not in doc for doc in docs.values())
    assert set(OTHER_VALUE) == set(FIELDS), "give the new field a valid non-default value in OTHER_VALUE"
    EncodingOptions(**OTHER_VALUE)


def test_options_are_frozen_and_compare_by_value():
    options = EncodingOptions(max_length=64)
    with pytest.raises(dataclasses.FrozenInstanceError):
        options.max_length = 1
    assert options == EncodingOptions(max_length=64) and hash(options) == hash(EncodingOptions(max_length=64))


def _key(options: EncodingOptions, tokenizer, conversations) -> str:
    """The cache key prepare uses for these conversations (read with `options`) under these options."""
    return prepare._cache_key(conversations, tokenizer, resolve_template(options.template, tokenizer), options)


@pytest.mark.parametrize("name", FIELDS)
def test_the_cache_key_changes_with_every_field_that_shapes_rows(name):
    tokenizer = make_tiny_tokenizer()
    conversations = [(0, Conversation([Message("user", "Hi"), Message("assistant", "Hello.")]))]
    base = EncodingOptions()
    changed = dataclasses.replace(base, **{name: OTHER_VALUE[name]})
    if name in ("data_format", "on_bad_row"):
        # These decide which conversations are read; the key hashes the conversations themselves.
        assert _key(changed, tokenizer, conversations) == _key(base, tokenizer, conversations)
        assert name not in base.row_settings()
    else:
        # Everything else is in the key, directly or (the template) through the text it resolves to.
        assert _key(changed, tokenizer, conversations) != _key(base, tokenizer, conversations)


def test_the_configuration_and_the_command_line_build_the_same_options():
    settings = {"template": "chatml", "data_format": "alpaca", "train_on": "last", "max_length": 64,
                "truncation": "keep_start", "on_bad_row": "skip", "history": "drop", "reasoning": "mask",
                "train_on_eos": "all", "system_role": "drop", "template_vars": '{"functions": [1]}'}
    assert set(settings) == set(FIELDS)
    config_key = {"data_format": "format"}
    config = load_config(overrides=[f"{config_key.get(k, k)}={v}" for k, v in settings.items()])
    parser = argparse.ArgumentParser()
    add_encoding_arguments(parser)
    flag = {"data_format": "--format"}
    argv = [part for k, v in settings.items() for part in (flag.get(k, "--" + k.replace("_", "-")), str(v))]
    assert config.encoding == encoding_options(parser.parse_args(argv)) == EncodingOptions(**settings)


def test_the_choices_are_defined_once():
    assert (CHOICES["train_on"], CHOICES["truncation"], CHOICES["on_bad_row"]) == (TRAIN_ON, TRUNCATION, ON_BAD_ROW)
    parser = argparse.ArgumentParser()
    add_encoding_arguments(parser)
    choices = {a.dest: tuple(a.choices) for a in parser._actions if a.choices}
    assert choices == {"train_on": TRAIN_ON, "truncation": TRUNCATION, "on_bad_row": ON_BAD_ROW,
                       "history": HISTORY, "reasoning": REASONING, "train_on_eos": TRAIN_ON_EOS, "system_role": SYSTEM}


def test_the_command_line_helper_names_the_flag():
    parser = argparse.ArgumentParser()
    add_encoding_arguments(parser)
    with pytest.raises(UserError, match="^--max-length must be at least 2"):
        encoding_options(parser.parse_args(["--max-length", "0"]))
    with pytest.raises(UserError, match="^--format must be a known format"):
        encoding_options(parser.parse_args(["--format", "xml"]))
    # A command with fewer flags (explain: template and format) keeps the other defaults.
    assert encoding_options(argparse.Namespace(template="plain", data_format=None)) == EncodingOptions(
        template="plain")


def test_truncate_does_not_import_the_encoder():
    code = ("import sys, instructune.data.truncate; "
            "sys.exit('instructune.data.encode' in sys.modules)")
    assert subprocess.run([sys.executable, "-c", code]).returncode == 0
