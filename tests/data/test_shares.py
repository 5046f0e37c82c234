"""The share arithmetic of a mixture: exact counts that add up, and the errors of shares that cannot be met."""

from fractions import Fraction

import pytest

from instructune.data.shares import Share, largest_remainder, plan_counts
from instructune.errors import UserError

NAMES = ["a", "b", "c"]


def test_rows_fraction_and_none_are_exact_counts():
    shares = [Share("rows", 7), Share("fraction", 0.25), Share(None)]
    assert plan_counts(shares, [10, 10, 3], NAMES) == [7, 3, 3]  # 2.5 rounds half up
    assert plan_counts([Share("rows", 25), Share("fraction", 2.0), Share(None)], [10, 10, 3], NAMES) == [25, 20, 3]


def test_largest_remainder_adds_up_exactly_and_breaks_ties_by_order():
    assert largest_remainder(10, [Fraction(1)] * 3) == [4, 3, 3]
    assert largest_remainder(7, [Fraction(1, 10), Fraction(3, 10), Fraction(6, 10)]) == [1, 2, 4]
    for total in range(50):
        assert sum(largest_remainder(total, [Fraction(2), Fraction(3), Fraction(5)])) == total


def test_weights_without_a_total_take_the_most_that_repeats_no_row():
    counts = plan_counts([Share("weight", 1), Share("weight", 1), Share("rows", 4)], [10, 30, 4], NAMES)
    assert counts == [10, 10, 4]
    assert plan_counts([Share("weight", 1), Share("weight", 0)], [10, 30], NAMES[:2]) == [10, 0]


def test_weights_with_mixture_rows_share_what_the_fixed_sources_leave():
    shares = [Share("weight", 0.7), Share("weight", 0.3), Share("rows", 5)]
    assert plan_counts(shares, [100, 100, 5], NAMES, mixture_rows=25) == [14, 6, 5]
    assert plan_counts(shares, [10, 100, 5], NAMES, mixture_rows=105) == [70, 30, 5]  # a repeats


@pytest.mark.parametrize("shares, available, total, message", [
    ([Share("rows", 11, repeat=False)], [10], None, "a: 'rows' asks for 11 rows, but the source has 10 training rows"),
    ([Share("fraction", 1.5, repeat=False)], [10], None, "a: 'fraction' asks for 15 rows"),
    ([Share("weight", 1, repeat=False), Share("rows", 5)], [10, 5], 20, "a: 'weight' asks for 15 rows"),
    ([Share("weight", 0), Share("weight", 0)], [10, 5], None, "every source's 'weight' is 0"),
    ([Share("weight", 1), Share("rows", 30)], [10, 30], 20, "'mixture_rows' is 20, but the sources with 'rows'"),
    ([Share("rows", 3)], [10], 20, "'mixture_rows' is set, but no source has a 'weight'"),
])
def test_a_share_that_cannot_be_met_is_an_error(shares, available, total, message):
    with pytest.raises(UserError) as error:
        plan_counts(shares, available, NAMES[:len(shares)], mixture_rows=total)
    assert message in str(error.value)
