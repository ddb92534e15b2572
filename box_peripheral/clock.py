"""The box clock: never goes backwards, moved forward by operator-signed time (DESIGN §4).

The box has no trusted time source offline. It runs on its own wall clock plus an offset, keeps a
persisted high-water mark so a reboot with a flat RTC battery cannot turn time back, and moves
forward when an operator-signed object carries an `iat` later than the box's own time.
"""

from __future__ import annotations

from collections.abc import Callable

from protocol.tokens import TimeQuality

SYNC_FRESH_SECONDS = 86_400


class BoxClock:
    def __init__(self, *, wall: Callable[[], int], high_water: int = 0, last_sync: int | None = None) -> None:
        self._wall = wall
        self._offset = max(0, high_water - wall())
        self._high_water = high_water
        self._last_sync = last_sync

    def now(self) -> int:
        """Seconds since 1970, never less than any value returned before (or persisted)."""
        current = max(self._wall() + self._offset, self._high_water)
        self._high_water = current
        return current

    @property
    def high_water(self) -> int:
        return self._high_water

    @property
    def last_sync(self) -> int | None:
        return self._last_sync

    def observe_operator_time(self, signed_time: int) -> tuple[int, int] | None:
        """An operator-signed `iat`: move forward to it if it is ahead. Returns (before, after) if moved."""
        before = self.now()
        self._last_sync = max(self._last_sync or 0, signed_time)
        if signed_time <= before:
            return None
        self._offset += signed_time - before
        self._high_water = signed_time
        return before, signed_time

    def quality(self) -> TimeQuality:
        if self._last_sync is None:
            return TimeQuality.UNKNOWN
        if self.now() - self._last_sync <= SYNC_FRESH_SECONDS:
            return TimeQuality.SYNCED
        return TimeQuality.INFORMATIVE
