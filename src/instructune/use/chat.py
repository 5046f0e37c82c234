"""`instructune chat`: talk to a model in the terminal, with the template it was trained with.

Each turn renders the whole conversation with the model's template and the generation prompt (as
training rendered it), streams the answer as it is generated, and stops at the end-of-turn token.
Commands: `/reset` forgets the conversation, `/system TEXT` sets the system prompt (`/system` alone
removes it), `/exit` (or Ctrl-D) quits, `/help` lists them. Ctrl-C stops an answer half way; the
unfinished answer is not kept in the conversation.

When the conversation no longer fits the model's context, the oldest exchanges are forgotten (the
system prompt stays) and a note says so.
"""

from __future__ import annotations

import sys
from collections.abc import Callable

from instructune.data.conversation import Conversation, Message

USER_PROMPT = "you> "
ASSISTANT_PREFIX = "assistant> "
HELP = "commands: /reset (forget the conversation) · /system TEXT (set the system prompt) · /exit"


class ChatSession:
    """A conversation with one loaded model: the messages so far and how to answer the next one."""

    def __init__(self, loaded, *, system: str | None = None, temperature: float = 0.7, top_p: float = 0.9,
                 max_new_tokens: int = 256):
        from instructune.data.encode import ConversationEncoder
        from instructune.use.generation import check_sampling

        check_sampling(max_new_tokens=max_new_tokens, temperature=temperature, top_p=top_p)
        self.loaded = loaded
        self.encoder = ConversationEncoder(loaded.tokenizer, loaded.template)
        self.system = system
        self.temperature = temperature
        self.top_p = top_p
        self.max_new_tokens = max_new_tokens
        self.turns: list[Message] = []
        config = getattr(loaded.model, "config", None)
        self.context = getattr(config, "max_position_embeddings", None)

    def reset(self) -> None:
        """Forget every turn (the system prompt stays)."""
        self.turns = []

    def set_system(self, text: str | None) -> None:
        """Set the system prompt for the next answers; None or empty removes it."""
        self.system = text or None

    def conversation(self) -> Conversation:
        """The system prompt (if any) and the turns so far."""
        system = [Message("system", self.system)] if self.system else []
        return Conversation(messages=system + list(self.turns))

    def prompt_ids(self) -> list[int]:
        """The conversation rendered with the generation prompt and tokenized, exactly as in training."""
        text, _ = self.encoder.render(self.conversation(), add_generation_prompt=True)
        return self.encoder.tokenize(text)[0]

    def _fit_context(self) -> int:
        """Forget the oldest exchanges until the prompt and a full answer fit; return how many turns went."""
        forgotten = 0
        prompt = self.prompt_ids()
        while self.context and len(prompt) + self.max_new_tokens > self.context and len(self.turns) > 1:
            # Drop through the next user turn, so the conversation still starts with the user.
            cut = next((k for k in range(1, len(self.turns)) if self.turns[k].role == "user"), len(self.turns) - 1)
            forgotten += cut
            self.turns = self.turns[cut:]
            prompt = self.prompt_ids()
        return forgotten

    def reply(self, text: str, write: Callable[[str], None], note: Callable[[str], None] | None = None) -> str:
        """Answer `text`, streaming the answer to `write`; the exchange joins the conversation when finished."""
        from instructune.use.generation import stream_answer

        self.turns.append(Message("user", text))
        pieces = []
        try:
            forgotten = self._fit_context()
            if forgotten and note is not None:
                note(f"(the conversation outgrew the model's context: {forgotten} oldest message(s) forgotten)")
            for piece in stream_answer(self.loaded, self.prompt_ids(), max_new_tokens=self.max_new_tokens,
                                       temperature=self.temperature, top_p=self.top_p):
                write(piece)
                pieces.append(piece)
        except BaseException:
            self.turns.pop()  # an interrupted or failed answer leaves the conversation as it was
            raise
        answer = "".join(pieces).strip()  # the pieces join to the decoded answer
        self.turns.append(Message("assistant", answer))
        return answer


def _write(text: str) -> None:
    sys.stdout.write(text)
    sys.stdout.flush()


def chat_loop(session: ChatSession, read: Callable[[str], str] = input) -> None:
    """Read lines until `/exit` or end of input; answer each one, or run it as a command."""
    while True:
        try:
            line = read(USER_PROMPT)
        except EOFError:
            print()
            return
        except KeyboardInterrupt:
            print()
            return
        line = line.strip()
        if not line:
            continue
        if line.startswith("/"):
            command, _, rest = line.partition(" ")
            if command in ("/exit", "/quit", "/bye"):
                return
            if command == "/reset":
                session.reset()
                print("(conversation cleared)")
            elif command == "/system":
                session.set_system(rest.strip())
                print(f"(system prompt set: {rest.strip()})" if rest.strip() else "(system prompt removed)")
            elif command == "/help":
                print(HELP)
            else:
                print(f"(unknown command {command}; {HELP})")
            continue
        _write(ASSISTANT_PREFIX)
        try:
            session.reply(line, _write, note=lambda text: _write(f"{text}\n{ASSISTANT_PREFIX}"))
        except KeyboardInterrupt:
            _write(" (interrupted; not kept)")
        print()
