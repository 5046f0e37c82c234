"""`instructune chat`: driven through a pseudo-terminal, it answers, resets and quits."""

import sys
from pathlib import Path

import pexpect
import pytest

from instructune.data.conversation import Conversation, Message
from instructune.testing import make_tiny_model, make_tiny_tokenizer, memorise
from instructune.use.chat import ChatSession, chat_loop
from instructune.use.generation import encode_prompts
from instructune.use.loading import load_for_inference

PAIRS = [("What is the capital of France?", "Paris is the capital of France."),
         ("Which is the largest ocean?", "The Pacific Ocean is the largest ocean.")]


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    """A tiny chat model that has memorised two answers, saved as a checkpoint with its ChatML template."""
    tokenizer = make_tiny_tokenizer()
    model = make_tiny_model(len(tokenizer), hidden_size=64)
    memorise(model, tokenizer, [Conversation([Message("user", q), Message("assistant", a)]) for q, a in PAIRS])
    folder = tmp_path_factory.mktemp("chat-model")
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def test_chat_in_a_terminal_answers_resets_and_quits(checkpoint):
    script = Path(sys.executable).parent / "instructune"
    child = pexpect.spawn(str(script), ["chat", "--model", str(checkpoint), "--temperature", "0",
                                        "--max-new-tokens", "24"], encoding="utf-8", timeout=60)
    try:
        child.expect_exact("you> ")
        child.sendline(PAIRS[0][0])
        child.expect_exact(f"assistant> {PAIRS[0][1]}\r\n")
        child.expect_exact("you> ")
        child.sendline("/system Answer briefly.")
        child.expect_exact("(system prompt set: Answer briefly.)")
        child.expect_exact("you> ")
        child.sendline("/system")
        child.expect_exact("(system prompt removed)")
        child.expect_exact("you> ")
        child.sendline("/reset")
        child.expect_exact("(conversation cleared)")
        child.expect_exact("you> ")
        # A fresh conversation: the memorised answer again, not one coloured by the first exchange.
        child.sendline(PAIRS[1][0])
        child.expect_exact(f"assistant> {PAIRS[1][1]}\r\n")
        child.expect_exact("you> ")
        child.sendline("/exit")
        child.expect(pexpect.EOF)
    finally:
        child.close()
    assert child.exitstatus == 0


@pytest.fixture(scope="module")
def loaded(checkpoint):
    return load_for_inference(str(checkpoint))


def test_session_keeps_the_conversation_and_streams(loaded):
    session = ChatSession(loaded, temperature=0, max_new_tokens=24)
    pieces = []
    answer = session.reply(PAIRS[0][0], pieces.append)
    assert answer == PAIRS[0][1] and "".join(pieces).strip() == answer
    assert [m.role for m in session.turns] == ["user", "assistant"]

    session.set_system("Be kind.")
    expected = Conversation([Message("system", "Be kind."), Message("user", PAIRS[0][0]),
                             Message("assistant", PAIRS[0][1])])
    assert session.prompt_ids() == encode_prompts(loaded.tokenizer, loaded.template, [expected])[0]
    session.reset()
    assert session.turns == [] and session.system == "Be kind."
    assert session.prompt_ids() == encode_prompts(loaded.tokenizer, loaded.template,
                                                  [Conversation([Message("system", "Be kind.")])])[0]


def test_old_turns_are_forgotten_when_the_context_is_full(loaded):
    session = ChatSession(loaded, temperature=0, max_new_tokens=8)
    session.reply(PAIRS[0][0], lambda _: None)
    session.reply(PAIRS[1][0], lambda _: None)
    notes = []
    session.context = len(session.prompt_ids()) + 8  # room for one more question only without the oldest turns
    session.reply("Hello world!", lambda _: None, note=notes.append)
    assert notes and "forgotten" in notes[0]
    assert session.turns[0].role == "user" and session.turns[0].content != PAIRS[0][0]


def test_commands_without_a_terminal(loaded, capsys):
    session = ChatSession(loaded, temperature=0, max_new_tokens=24)
    lines = iter(["/help", "/bogus", PAIRS[1][0], "/reset"])

    def read(prompt):
        try:
            return next(lines)
        except StopIteration:
            raise EOFError from None

    chat_loop(session, read)
    out = capsys.readouterr().out
    assert "/reset" in out and "unknown command /bogus" in out and PAIRS[1][1] in out
    assert "(conversation cleared)" in out and session.turns == []
