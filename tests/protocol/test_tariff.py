"""Tariff arithmetic: monotone, never above the grant when the box stops at the grant, one answer."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from protocol import tariff
from protocol.errors import LocalProtocolError

energy = st.integers(min_value=0, max_value=10**8)
price = st.integers(min_value=0, max_value=10**6)
balance = st.integers(min_value=0, max_value=10**9)


@given(a=energy, b=energy, p=price)
def test_cost_is_monotone_in_energy(a: int, b: int, p: int) -> None:
    low, high = sorted((a, b))
    assert tariff.session_cost_fen(low, p) <= tariff.session_cost_fen(high, p)


@given(e=energy, p=price, q=price)
def test_cost_is_monotone_in_price(e: int, p: int, q: int) -> None:
    low, high = sorted((p, q))
    assert tariff.session_cost_fen(e, low) <= tariff.session_cost_fen(e, high)


@given(b=balance, p=price.filter(lambda v: v > 0))
def test_energy_affordable_is_the_exact_limit_of_the_balance(b: int, p: int) -> None:
    limit = tariff.energy_affordable_wh(b, p)
    assert limit is not None
    # the box stops at `limit`: the cost is within the grant, one more Wh would exceed it
    assert tariff.session_cost_fen(limit, p) <= b
    assert tariff.session_cost_fen(limit + 1, p) > b


@given(b=balance)
def test_free_energy_has_no_limit(b: int) -> None:
    assert tariff.energy_affordable_wh(b, 0) is None


@given(e=energy, p=price)
def test_cost_rounds_down_to_the_fen(e: int, p: int) -> None:
    cost = tariff.session_cost_fen(e, p)
    assert cost * 1000 <= e * p < (cost + 1) * 1000


@given(cost=st.integers(0, 10**7), grants=st.lists(st.integers(0, 10**6), min_size=1, max_size=5))
def test_cost_allocation_charges_grants_in_order_and_never_above_them(cost: int, grants: list[int]) -> None:
    charges = tariff.allocate_cost_fen(cost, grants)
    assert all(0 <= c <= g for c, g in zip(charges, grants, strict=True))
    assert sum(charges) == min(cost, sum(grants))
    # a later grant is touched only once every earlier one is used up
    for i, charge in enumerate(charges):
        if charge and i:
            assert all(charges[j] == grants[j] for j in range(i))


@pytest.mark.parametrize("bad", [-1, 1.5, "3"])
def test_non_integers_and_negatives_are_refused(bad: object) -> None:
    with pytest.raises(LocalProtocolError):
        tariff.session_cost_fen(bad, 100)  # type: ignore[arg-type]
    with pytest.raises(LocalProtocolError):
        tariff.energy_affordable_wh(100, bad)  # type: ignore[arg-type]
