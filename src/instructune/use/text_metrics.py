"""Scoring a generated answer against its reference: exact match, contains-the-answer, ROUGE-L.

All three compare *normalised* text: lower case, surrounding whitespace stripped, inner whitespace
collapsed to one space, trailing punctuation removed. So "The Pacific Ocean." and "the pacific
ocean" match exactly, while "The Pacific." does not.

- exact match: normalised prediction == normalised reference.
- contains: the row's short `answer` key (when the data has one, like the built-in `default_qa`) is in
  the normalised prediction; without a key, the whole normalised reference must be.
- ROUGE-L: the F1 of the longest common subsequence of words (Lin, 2004), with the LCS from
  `rapidfuzz` (the optional extra `instructune[eval]`).
"""

from __future__ import annotations

import re
import string

_SPACES = re.compile(r"\s+")
_WORD = re.compile(r"\w+")
_TRAILING = string.punctuation + "…“”‘’«»。！？，"


def normalize_answer(text: str) -> str:
    """Lower case, whitespace collapsed, trailing punctuation (and the spaces around it) stripped."""
    return _SPACES.sub(" ", text.lower()).strip().rstrip(_TRAILING + " ")


def exact_match(prediction: str, reference: str) -> bool:
    """True when the normalised prediction equals the normalised reference."""
    return normalize_answer(prediction) == normalize_answer(reference)


def contains_answer(prediction: str, reference: str, answer: str | None = None) -> bool:
    """True when the normalised prediction contains the answer key, or the whole reference without one."""
    key = normalize_answer(answer if answer else reference)
    return key in normalize_answer(prediction)


def rouge_available() -> bool:
    """Whether the library that ROUGE-L needs (`rapidfuzz`) is installed."""
    try:
        import rapidfuzz  # noqa: F401
    except ImportError:
        return False
    return True


def rouge_l(prediction: str, reference: str) -> float:
    """ROUGE-L F1 between the words of the normalised prediction and reference (1.0 when both are empty)."""
    from rapidfuzz.distance import LCSseq

    predicted = _WORD.findall(normalize_answer(prediction))
    expected = _WORD.findall(normalize_answer(reference))
    if not predicted or not expected:
        return float(predicted == expected)
    common = LCSseq.similarity(predicted, expected)
    if common == 0:
        return 0.0
    precision, recall = common / len(predicted), common / len(expected)
    return 2 * precision * recall / (precision + recall)
