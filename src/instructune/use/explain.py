"""`instructune explain`: what the loss sees, token by token, for one example and any model.

The example is encoded exactly as training encodes it (`ConversationEncoder`, `train_on: assistant`),
and one forward pass scores every token: `p` is the model's probability of that token given every
token before it, and its loss is `-ln p` (p = 0.7 costs 0.3567). The masked loss, the one training
minimises, is the mean over the trained (response) tokens; the unmasked loss, what `train_on: all`
would score, is the mean over every token but the first, which nothing predicts.

With an instruction weight w (`--instruction-weight`, the `instruction_weight` training key), every
token also shows its weight in the loss: 1 for a trained token, w for the other tokens `train_on: all`
would score (never the BOS), and the weighted total, Σ weight x loss / Σ weight, sits beside the two
others: at w = 0 it is the masked loss, at w = 1 (no system prompt) the unmasked one.

A token's *role* says whether it belongs to the response (the assistant's own output and the token
that closes it, which training on assistant turns scores) or to the instruction (system, user and
tool turns, role headers, BOS, separators). *Trained* is whether this example's loss scores it: the
same thing unless a message carries its own `train: true|false`.
"""

from __future__ import annotations

import colorsys
import math
from dataclasses import dataclass, field, replace
from html import escape

from instructune import IGNORE_INDEX
from instructune.data.conversation import Conversation
from instructune.errors import UserError

ROLE_INSTRUCTION = "instruction"
ROLE_RESPONSE = "response"
LOSS_SCALE_MAX = 6.0
"""The loss drawn in the reddest colour (p ≈ 0.25 %); higher losses get the same colour."""


@dataclass
class TokenExplanation:
    """One token of the example: what it is, whether it is trained, and what the model made of it."""

    index: int
    id: int
    text: str
    """The text this token adds to the decoded example."""
    role: str
    """`instruction` or `response`."""
    trained: bool
    prob: float | None
    """p(token | all tokens before it); None for the first token, which nothing predicts."""
    loss: float | None
    """-ln prob; None for the first token."""
    top: list[tuple[str, float]] = field(default_factory=list)
    """The model's most likely tokens at this position (text, probability), at trained positions only."""
    weight: float | None = None
    """This token's weight in the loss under an instruction weight (1, w or 0); None when none was given."""

    def to_json(self) -> dict:
        """The JSON object of this token (without the top-k alternatives; `weight` only when there is one)."""
        data = {"index": self.index, "id": self.id, "text": self.text, "role": self.role,
                "trained": self.trained, "prob": self.prob, "loss": self.loss}
        if self.weight is not None:
            data["weight"] = self.weight
        return data


@dataclass
class Explanation:
    """Every token of one example, scored, and the masked and unmasked losses they add up to."""

    tokens: list[TokenExplanation]
    instruction_weight: float | None = None
    """The instruction weight the tokens' `weight` was computed with; None: no weight was asked for."""

    @property
    def trained(self) -> list[TokenExplanation]:
        """The tokens the masked loss scores."""
        return [t for t in self.tokens if t.trained and t.loss is not None]

    @property
    def scored(self) -> list[TokenExplanation]:
        """Every token that has a loss (all but the first): what the unmasked loss scores."""
        return [t for t in self.tokens if t.loss is not None]

    @property
    def masked_loss_sum(self) -> float:
        """Σ -ln p over the trained tokens."""
        return math.fsum(t.loss for t in self.trained)

    @property
    def masked_loss_mean(self) -> float:
        """The loss training reports for this example: the mean over trained tokens."""
        return self.masked_loss_sum / len(self.trained) if self.trained else float("nan")

    @property
    def unmasked_loss_sum(self) -> float:
        """Σ -ln p over every token but the first, as if instruction tokens counted."""
        return math.fsum(t.loss for t in self.scored)

    @property
    def unmasked_loss_mean(self) -> float:
        """The mean over every token but the first."""
        return self.unmasked_loss_sum / len(self.scored) if self.scored else float("nan")

    @property
    def weight_sum(self) -> float:
        """Σ weight over the scored tokens: what the weighted loss divides by (nan without a weight)."""
        if self.instruction_weight is None:
            return float("nan")
        return math.fsum(t.weight for t in self.scored)

    @property
    def weighted_loss_sum(self) -> float:
        """Σ weight x -ln p over the scored tokens: what training sums under the instruction weight."""
        if self.instruction_weight is None:
            return float("nan")
        return math.fsum(t.weight * t.loss for t in self.scored)

    @property
    def weighted_loss_mean(self) -> float:
        """The loss training reports for this example under the instruction weight: sum / weight sum."""
        total = self.weight_sum
        return self.weighted_loss_sum / total if total > 0 else float("nan")

    def to_json(self) -> dict:
        """`{"tokens": [...], "masked_loss_sum", "masked_loss_mean", "unmasked_loss_sum", "unmasked_loss_mean"}`,
        with an instruction weight also `instruction_weight`, `weight_sum`, `weighted_loss_sum`, `weighted_loss_mean`."""
        data = {"tokens": [t.to_json() for t in self.tokens],
                "masked_loss_sum": self.masked_loss_sum, "masked_loss_mean": self.masked_loss_mean,
                "unmasked_loss_sum": self.unmasked_loss_sum, "unmasked_loss_mean": self.unmasked_loss_mean}
        if self.instruction_weight is not None:
            data.update(instruction_weight=self.instruction_weight, weight_sum=self.weight_sum,
                        weighted_loss_sum=self.weighted_loss_sum, weighted_loss_mean=self.weighted_loss_mean)
        return data


# ---------------------------------------------------------------------------------------------------
# Computing it

def example_conversation(instruction: str, response: str, *, input_text: str | None = None,
                         system: str | None = None) -> Conversation:
    """The conversation of an Alpaca-style example given on the command line."""
    from instructune.data.formats import alpaca_to_conversation

    record = {"instruction": instruction, "output": response}
    if input_text:
        record["input"] = input_text
    if system:
        record["system"] = system
    return alpaca_to_conversation(record)


def conversation_at(path: str, row: int, data_format: str | None = None) -> Conversation:
    """Row `row` (0-based, counting every row of the source) of a dataset, as a conversation."""
    from instructune.data.readers import read_conversations

    if row < 0:
        raise UserError(f"--row must be 0 or more, got {row}")
    result = read_conversations(path, data_format=data_format, on_bad_row="skip")
    for index, conversation in result.conversations:
        if index == row:
            return conversation
    if row >= result.rows_read:
        raise UserError(f"{path} has {result.rows_read} row(s); --row {row} is past the end (rows count from 0)")
    raise UserError(f"{path}: row {row} is not a valid example; `instructune inspect {path}` says why")


def _roles_and_labels(tokenizer, template: str, conv: Conversation):
    """Token ids, per-token role (instruction/response), the labels this example trains with, and its row."""
    from instructune.data.options import EncodingOptions
    from instructune.data.prepare import prepare_dataset

    # The role ignores per-message `train` flags: it is what the assistant policy would train.
    plain = Conversation(messages=[replace(m, train=None) for m in conv.messages], tools=conv.tools)
    examples = [conv] if plain.messages == conv.messages else [conv, plain]
    # One example, so no worker processes and no cache entry.
    prepared = prepare_dataset(examples, tokenizer, EncodingOptions(train_on="assistant"),
                               template_text=template, num_proc=1, cache_dir=False)
    if prepared.report.drops:
        reason = prepared.report.drops[0][1]
        raise UserError(f"this example cannot be encoded exactly, so training would drop it ({reason}); "
                        "`instructune inspect` shows more")
    actual, policy = prepared.rows[0], prepared.rows[-1]
    roles = [ROLE_RESPONSE if label != IGNORE_INDEX else ROLE_INSTRUCTION for label in policy.labels]
    return actual.input_ids, roles, actual.labels, actual


def explain_conversation(model, tokenizer, template: str, conv: Conversation, *, top_k: int = 3,
                         instruction_weight: float | None = None) -> Explanation:
    """Encode `conv` as training does and score every token with `model` (see the module docstring);
    with `instruction_weight`, also each token's weight in the loss (`data.weights.token_weights`)."""
    from instructune.data.batching import pad_token_id
    from instructune.show.tokens import decode_pieces
    from instructune.use.scoring import score_batch

    if conv.is_text:
        raise UserError("this row is a plain text document, trained on every token; explain shows the "
                        "instruction masking of conversations")
    if top_k < 0:
        raise UserError(f"--top-k must be 0 or more, got {top_k}")
    if instruction_weight is not None and not 0 <= instruction_weight <= 1:
        raise UserError(f"--instruction-weight must be in [0, 1], got {instruction_weight}")
    ids, roles, labels, row = _roles_and_labels(tokenizer, template, conv)
    scores = score_batch(model, [ids], [range(1, len(ids))], pad_token_id=pad_token_id(tokenizer), top_k=top_k)[0]
    pieces = decode_pieces(tokenizer, ids)
    names: dict[int, str] = {}

    def name(token_id: int) -> str:
        if token_id not in names:
            names[token_id] = tokenizer.decode([token_id], skip_special_tokens=False)
        return names[token_id]

    tokens = [TokenExplanation(index=0, id=ids[0], text=pieces[0], role=roles[0],
                               trained=labels[0] != IGNORE_INDEX, prob=None, loss=None)]
    for k, position in enumerate(scores.positions):
        log_prob = scores.log_probs[k]
        trained = labels[position] != IGNORE_INDEX
        top = [(name(i), p) for i, p in zip(scores.top_ids[k], scores.top_probs[k])] if trained and top_k else []
        tokens.append(TokenExplanation(index=position, id=ids[position], text=pieces[position], role=roles[position],
                                       trained=trained, prob=math.exp(log_prob), loss=-log_prob, top=top))
    if instruction_weight is not None:
        from instructune.data.weights import token_weights, tokenizer_prefix_length

        weights = token_weights(row, instruction_weight, tokenizer_prefix_length(tokenizer))
        for token in tokens:
            token.weight = weights[token.index]
    return Explanation(tokens, instruction_weight)


# ---------------------------------------------------------------------------------------------------
# Showing it

def _token_cell(text: str) -> str:
    from instructune.show.tokens import visible

    # One table row per token: a newline shows as ↵ only, and spaces as ␣ so " Pacific" ≠ "Pacific".
    return visible(text).replace("\n", "").replace(" ", "␣")


def format_prob(p: float, decimals: int = 4) -> str:
    """A probability as people read it: `0.7000` from 10^-3 on (10^-1 with 2 decimals), `3.1e-07` below.

    With a fixed 4 decimals every token the model finds very unlikely (a loss above about 9 nats) would
    print as 0.0000, the very tokens one looks for; the JSON keeps the full float.
    """
    return f"{p:.{decimals}f}" if p >= 10.0 ** (1 - decimals) or p == 0 else f"{p:.1e}"


def top_text(token: TokenExplanation) -> str:
    """`␣Pacific 0.70, ␣Atlantic 0.20, Pacific 0.10`: each alternative drawn like the token column.

    A leading space is part of a token (` Pacific` and `Pacific` are different tokens), so it shows as ␣
    here too instead of being stripped, which made such pairs look like duplicates.
    """
    return ", ".join(f"{_token_cell(text)} {format_prob(p, 2)}" for text, p in token.top)


def loss_colour(loss: float) -> str:
    """A `#rrggbb` background from green (loss 0) through yellow to red (loss >= LOSS_SCALE_MAX)."""
    share = min(max(loss / LOSS_SCALE_MAX, 0.0), 1.0)
    red, green, blue = colorsys.hls_to_rgb((1 - share) / 3, 0.78, 0.75)
    return f"#{round(red * 255):02x}{round(green * 255):02x}{round(blue * 255):02x}"


def print_explanation(console, explanation: Explanation) -> None:
    """The per-token table, then the masked and unmasked totals side by side."""
    from rich.table import Table
    from rich.text import Text

    weighted = explanation.instruction_weight is not None
    table = Table(title=None, show_edge=False, pad_edge=False, header_style="bold")
    for heading, justify in (("#", "right"), ("token", "left"), ("role", "left"), ("trained", "left"),
                             *((("weight", "right"),) if weighted else ()),
                             ("p", "right"), ("loss", "right"), ("top alternatives", "left")):
        table.add_column(heading, justify=justify, overflow="fold")
    for t in explanation.tokens:
        prob = "" if t.prob is None else format_prob(t.prob)
        loss = "" if t.loss is None else f"{t.loss:.4f}"
        style = "bold green" if t.trained else "grey58"
        weight = (format_weight(t.weight),) if weighted else ()
        # Text objects, not strings: a token such as `[/INST]` must not be read as rich markup.
        table.add_row(str(t.index), Text(_token_cell(t.text)), t.role, "yes" if t.trained else "masked", *weight,
                      prob, loss, Text(top_text(t)), style=style)
    console.print(table)
    console.print()
    console.print(totals_table(explanation))
    trained, scored = len(explanation.trained), len(explanation.scored)
    console.print(f"Training on this example scores its {trained} trained token(s): loss "
                  f"{explanation.masked_loss_mean:.4f}. If the {scored - trained} instruction token(s) counted "
                  f"too, it would be {explanation.unmasked_loss_mean:.4f}.", markup=False, soft_wrap=True)
    if weighted:
        console.print(f"With instruction_weight {format_weight(explanation.instruction_weight)}, training scores "
                      f"it as {explanation.weighted_loss_mean:.4f} (Σ weight x loss / Σ weight).",
                      markup=False, soft_wrap=True)


def format_weight(weight: float | None) -> str:
    """A token's weight as a short number: `1`, `0.25`, `0`; empty for no weight."""
    return "" if weight is None else f"{weight:g}"


def _totals_rows(explanation: Explanation) -> list[tuple[str, float, float, str]]:
    """(label, sum, mean, tokens) of each total: masked, unmasked and, with a weight, weighted."""
    e = explanation
    rows = [("masked (trained tokens only)", e.masked_loss_sum, e.masked_loss_mean, str(len(e.trained))),
            ("unmasked (every token but the first)", e.unmasked_loss_sum, e.unmasked_loss_mean, str(len(e.scored)))]
    if e.instruction_weight is not None:
        rows.append((f"weighted (instruction_weight {format_weight(e.instruction_weight)})", e.weighted_loss_sum,
                     e.weighted_loss_mean, f"Σ weight {e.weight_sum:g}"))
    return rows


def totals_table(explanation: Explanation):
    """A rich table of the masked and unmasked loss: sum, mean and token count."""
    from rich.table import Table

    table = Table(show_edge=False, pad_edge=False, header_style="bold")
    for heading, justify in (("loss", "left"), ("sum", "right"), ("mean", "right"), ("tokens", "right")):
        table.add_column(heading, justify=justify)
    for k, (label, total, mean, tokens) in enumerate(_totals_rows(explanation)):
        table.add_row(label, f"{total:.4f}", f"{mean:.4f}", tokens, style="bold green" if k == 0 else None)
    return table


_EXTRA_CSS = """
table.tok td, table.tok th { font-family: ui-monospace, Menlo, Consolas, monospace; font-size: .85rem; }
table.tok tr.trained td { font-weight: 600; } table.tok tr.masked td { color: #777; }
.swatch { display: inline-block; width: 1.4em; text-align: center; border-radius: 2px; }
"""


def explanation_html(explanation: Explanation, *, special: set[int] | None = None, subtitle: str = "") -> str:
    """A self-contained page: the example with tokens coloured by loss (hover for p and top-k), the table."""
    from instructune.show.html import CSS, token_spans
    from instructune.show.tokens import TokenView

    views = []
    for t in explanation.tokens:
        note = "" if t.loss is None else f"p {format_prob(t.prob)} · loss {t.loss:.4f}"
        if t.top:
            note += f" · top: {top_text(t)}"
        views.append(TokenView(text=t.text, token_id=t.id, label=t.id if t.trained else IGNORE_INDEX, role=t.role,
                               special=t.id in (special or set()),
                               background=None if t.loss is None else loss_colour(t.loss), note=note))
    scale = "".join(f'<span class="swatch" style="background:{loss_colour(x)}">{x:g}</span>'
                    for x in (0, 0.5, 1, 2, 3, 4, 5, 6))
    weighted = explanation.instruction_weight is not None
    rows = []
    for t in explanation.tokens:
        cells = [str(t.index), escape(_token_cell(t.text)), t.role, "yes" if t.trained else "masked",
                 "" if t.prob is None else format_prob(t.prob), "" if t.loss is None else f"{t.loss:.4f}",
                 escape(top_text(t))]
        style = "" if t.loss is None else f' style="background:{loss_colour(t.loss)}"'
        cells[5] = f"<span class=swatch{style}>&nbsp;</span> {cells[5]}" if t.loss is not None else ""
        if weighted:  # the weight column sits after "trained", as in the terminal table
            cells.insert(4, format_weight(t.weight))
        numeric = (0, 4, 5, 6) if weighted else (0, 4, 5)
        row = "".join(f"<td{' class=n' if i in numeric else ''}>{c}</td>" for i, c in enumerate(cells))
        rows.append(f'<tr class="{"trained" if t.trained else "masked"}">{row}</tr>')
    headings = ("#", "token", "role", "trained", *(("weight",) if weighted else ()), "p", "loss", "top alternatives")
    numeric = (0, 4, 5, 6) if weighted else (0, 4, 5)
    head = "".join(f"<th{' class=n' if i in numeric else ''}>{h}</th>" for i, h in enumerate(headings))
    totals = (
        "<table><thead><tr><th>loss</th><th class=n>sum</th><th class=n>mean</th><th class=n>tokens</th></tr>"
        "</thead><tbody>" + "".join(f"<tr><td>{escape(label)}</td><td class=n>{total:.4f}</td><td class=n>{mean:.4f}"
                                    f"</td><td class=n>{escape(tokens)}</td></tr>"
                                    for label, total, mean, tokens in _totals_rows(explanation))
        + "</tbody></table>")
    body = [
        "<h1>instructune explain</h1>",
        f'<p class="sub">{escape(subtitle)}</p>' if subtitle else "",
        f'<p class="legend">background: the token\'s loss −ln p, {scale} and up · the trained tokens sit '
        "between ⟦ ⟧ · hover a token for p, its loss and the model's top alternatives</p>",
        f'<pre class="tokens">{token_spans(views)}</pre>',
        "<h2>Totals</h2>", totals,
        "<h2>Tokens</h2>", f'<table class="tok"><thead><tr>{head}</tr></thead><tbody>{"".join(rows)}</tbody></table>',
    ]
    return ("<!doctype html>\n<html lang=\"en\">\n<head>\n<meta charset=\"utf-8\">\n"
            f"<title>instructune explain</title>\n<style>{CSS}{_EXTRA_CSS}</style>\n</head>\n<body>\n"
            + "\n".join(part for part in body if part) + "\n</body>\n</html>\n")
