"""Single flight on one trio thread: one task loads a key, the others wait and share.

Everything runs on the trio thread, so the table needs no lock. A load that fails shares
its error with the tasks waiting for it but is not remembered: the next call loads again.
A load that is cancelled leaves its waiters with neither value nor error, and the first
of them loads the key itself, so no waiter hangs on a load that will never finish.

The lazy-pages daemon of a CRIU restore reads from threads, not trio tasks; its
single flight is a `concurrent.futures.Future` per chunk (`snapstore.criu.staging`).
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Generic, TypeVar

import trio

K = TypeVar("K")
V = TypeVar("V")


class Flight(Generic[V]):
    """One load in flight; waiters read `value` or `error` once `done` is set."""

    __slots__ = ("done", "error", "value")

    def __init__(self) -> None:
        self.done = trio.Event()
        self.value: V | None = None
        self.error: Exception | None = None


class SingleFlight(Generic[K, V]):
    """The loads in flight, by key."""

    def __init__(self) -> None:
        self._flights: dict[K, Flight[V]] = {}

    def __contains__(self, key: K) -> bool:
        return key in self._flights

    def begin(self, key: K) -> Flight[V]:
        """Register a load of `key` that the caller finishes with `end`: for a caller
        that loads several keys at once. `key` must not be in flight."""
        assert key not in self._flights
        flight: Flight[V] = Flight()
        self._flights[key] = flight
        return flight

    def end(self, key: K, flight: Flight[V]) -> None:
        """Wake the waiters of `flight`. Synchronous, so that it also runs in a `finally`
        of a cancelled load: waiters never hang."""
        del self._flights[key]
        flight.done.set()

    async def run(self, key: K, load: Callable[[], Awaitable[V]],
                  on_wait: Callable[[], None] | None = None) -> V:
        """`load()`'s value for `key`, or the value of the load of `key` already in
        flight; `on_wait` is called each time this call waits for another's load."""
        while (flight := self._flights.get(key)) is not None:
            if on_wait is not None:
                on_wait()
            await flight.done.wait()
            if flight.error is not None:
                raise flight.error
            if flight.value is not None:
                return flight.value
            # The loading task was cancelled before it finished: load it here.
        flight = self.begin(key)
        try:
            flight.value = await load()
            return flight.value
        except Exception as e:
            flight.error = e
            raise
        finally:
            self.end(key, flight)
