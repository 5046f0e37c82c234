"""How many training rows each source of a mixture gives: its share made an exact count.

A source's share is one of:

- none: every training row of the source, once;
- `rows: N`: exactly N rows;
- `fraction: f`: `round(f x available)` rows (half up), f > 1 repeating rows;
- `weight: w`: a relative share of the rows the weighted sources give together. That total is
  `mixture_rows` less the other sources' rows when `mixture_rows` is set; otherwise the largest total
  that repeats no row of any weighted source (the source that runs out first is taken whole). The
  total is split by the largest-remainder method, so the counts add up exactly.

`available` is a source's training rows (after dropped, duplicate and held-out rows are taken away). A
count above it repeats every row as often as it fits and samples the rest (`repeat: true`, the
default); with `repeat: false` it is an error naming the source and the key. Arithmetic is exact
(`fractions.Fraction`): the same shares give the same counts on every machine.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from fractions import Fraction

from instructune.errors import UserError

SHARE_KEYS = ("rows", "fraction", "weight")
"""The keys that give a source's share; a source gives at most one of them."""


@dataclass(frozen=True)
class Share:
    """One source's share, as its configuration gives it."""

    key: str | None
    """`rows`, `fraction`, `weight`, or None: every row once."""
    value: float = 1
    repeat: bool = True
    """Whether the share may repeat rows when it asks for more than the source has."""


def plan_counts(shares: list[Share], available: list[int], names: list[str],
                mixture_rows: int | None = None) -> list[int]:
    """The exact number of rows to take from each source; a `UserError` naming the source and key when a
    share cannot be met."""
    counts: list[int | None] = []
    for share, have, name in zip(shares, available, names, strict=True):
        if share.key is None:
            counts.append(have)
        elif share.key == "rows":
            counts.append(_checked(int(share.value), have, share, name))
        elif share.key == "fraction":
            wanted = math.floor(Fraction(share.value) * have + Fraction(1, 2))
            counts.append(_checked(wanted, have, share, name))
        else:
            counts.append(None)
    weighted = [i for i, share in enumerate(shares) if share.key == "weight"]
    if not weighted:
        if mixture_rows is not None:
            raise UserError("'mixture_rows' is set, but no source has a 'weight' to share it; give the sources "
                            "weights, or leave mixture_rows out")
        return counts
    weights = {i: Fraction(shares[i].value) for i in weighted}
    total_weight = sum(weights.values())
    if total_weight == 0:
        raise UserError("data: every source's 'weight' is 0, so the weighted sources give no row; give at least "
                        "one a positive weight")
    fixed = sum(count for count in counts if count is not None)
    if mixture_rows is not None:
        total = mixture_rows - fixed
        if total < 0:
            raise UserError(f"'mixture_rows' is {mixture_rows:,}, but the sources with 'rows' or 'fraction' (or "
                            f"neither) already give {fixed:,}; raise mixture_rows or lower those shares")
    else:  # the most rows the weighted sources give without repeating one
        total = min(math.floor(available[i] * total_weight / w) for i, w in weights.items() if w > 0)
    for i, wanted in zip(weighted, largest_remainder(total, [weights[i] for i in weighted]), strict=True):
        counts[i] = _checked(wanted, available[i], shares[i], names[i])
    return counts


def largest_remainder(total: int, weights: list[Fraction]) -> list[int]:
    """`total` split in proportion to `weights` into integers that add up to `total` exactly: each gets
    the floor of its quota, and the rows left go to the largest remainders (the earlier source on a tie)."""
    whole = sum(weights)
    quotas = [total * w / whole for w in weights]
    counts = [math.floor(q) for q in quotas]
    order = sorted(range(len(weights)), key=lambda i: (-(quotas[i] - counts[i]), i))
    for i in order[:total - sum(counts)]:
        counts[i] += 1
    return counts


def _checked(wanted: int, have: int, share: Share, name: str) -> int:
    if wanted > have and not share.repeat:
        raise UserError(
            f"{name}: '{share.key}' asks for {wanted:,} rows, but the source has {have:,} training rows (after "
            "dropped, duplicate and held-out rows) and 'repeat' is false; lower the share, or set repeat: true "
            "to repeat rows")
    return wanted
