"""Tariff arithmetic shared by the box and the server (docs/protocol.md §10).

Integers only: energy in Wh, prices in fen per kWh, money in fen. The one rounding rule is
"round down to the fen": a user never pays for a fraction of a fen, and because the rule is
monotone the box can work out exactly how much energy a balance buys.
"""

from __future__ import annotations

from collections.abc import Sequence

from protocol.errors import ErrorCode, LocalProtocolError

WH_PER_KWH = 1000


def _check_non_negative(**values: int) -> None:
    for name, value in values.items():
        if type(value) is not int or value < 0:
            raise LocalProtocolError(f"{name} must be a non-negative integer", code=ErrorCode.INTERNAL)


def session_cost_fen(energy_wh: int, price_fen_per_kwh: int) -> int:
    """Cost of `energy_wh` at `price_fen_per_kwh`: floor(energy_wh * price / 1000)."""
    _check_non_negative(energy_wh=energy_wh, price_fen_per_kwh=price_fen_per_kwh)
    return energy_wh * price_fen_per_kwh // WH_PER_KWH


def energy_affordable_wh(balance_fen: int, price_fen_per_kwh: int) -> int | None:
    """The most Wh whose cost stays within `balance_fen`; None when energy is free (no limit).

    The largest e with floor(e * p / 1000) <= b is floor(((b + 1) * 1000 - 1) / p).
    """
    _check_non_negative(balance_fen=balance_fen, price_fen_per_kwh=price_fen_per_kwh)
    if price_fen_per_kwh == 0:
        return None
    return ((balance_fen + 1) * WH_PER_KWH - 1) // price_fen_per_kwh


def allocate_cost_fen(cost_fen: int, grant_amounts_fen: Sequence[int]) -> list[int]:
    """Split a session's cost over its grants in the order they were used.

    Each grant is charged up to its amount before the next one is touched; the box never lets a
    session cost more than the sum, and a larger `cost_fen` (a forged or mis-metered receipt) is
    capped at that sum: the excess is the server's anomaly to handle, never a user's charge.
    """
    _check_non_negative(cost_fen=cost_fen)
    charges = []
    remaining = cost_fen
    for amount in grant_amounts_fen:
        _check_non_negative(amount=amount)
        charge = min(amount, remaining)
        charges.append(charge)
        remaining -= charge
    return charges


def charged_cost_fen(energy_wh: int, price_fen_per_kwh: int, grants_total_fen: int) -> int:
    """What a receipt charges: the session's cost, never above the grants that paid for it.

    The box trips before the balance runs out, but the meter may land a fraction of a Wh past the
    limit; that energy is given away, not charged. Box and server both use this rule.
    """
    _check_non_negative(grants_total_fen=grants_total_fen)
    return min(session_cost_fen(energy_wh, price_fen_per_kwh), grants_total_fen)
