"""`instructune train` bounds OpenMP's spin-wait unless the user chose a policy."""

from __future__ import annotations

import os

import pytest

from instructune.train.openmp import SPIN_COUNT, bound_openmp_spinning


@pytest.mark.parametrize("preset, expected", [
    ({}, SPIN_COUNT),
    ({"OMP_WAIT_POLICY": "PASSIVE"}, None),  # the user's policy stands, and no spin count overrides it
    ({"GOMP_SPINCOUNT": "0"}, "0"),
])
def test_spin_count_is_set_only_when_the_user_set_nothing(monkeypatch, preset, expected):
    monkeypatch.delenv("OMP_WAIT_POLICY", raising=False)
    monkeypatch.delenv("GOMP_SPINCOUNT", raising=False)
    for key, value in preset.items():
        monkeypatch.setenv(key, value)
    bound_openmp_spinning()
    assert os.environ.get("GOMP_SPINCOUNT") == expected
