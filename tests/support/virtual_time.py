"""An asyncio event loop on virtual time, for testing pacing without sleeping.

Takes nothing; gives `VirtualTimeLoop`, whose clock jumps to the next timer instead of waiting
for it, and `run_virtual(coroutine)`. Every timer-based wait in the loop (asyncio.sleep,
call_later) is virtual and work sent to a thread runs at once, so a 150-second scenario runs in
milliseconds and the times observed are exact to a microsecond. The same idea as aiolimiter's
own `MockLoopTime`, for a whole run.
"""

from __future__ import annotations

import asyncio
import selectors
from collections.abc import Callable, Coroutine
from typing import Any, TypeVar

T = TypeVar("T")

# Every turn of the loop moves the clock a little, as a real clock would: a wake-up armed for "a
# rounding error from now" would spin forever on a clock that never moves by itself.
_TICK = 1e-9


class VirtualTimeLoop(asyncio.SelectorEventLoop):
    """An event loop whose clock jumps to the next timer instead of waiting for it."""

    def __init__(self) -> None:
        super().__init__(selectors.SelectSelector())
        self._virtual_now = 0.0
        selector: Any = self._selector  # type: ignore[attr-defined]
        real_select = selector.select

        def select(timeout: float | None = None) -> Any:
            if timeout is None:
                raise RuntimeError("deadlock: nothing is scheduled in virtual time")
            self._virtual_now += max(timeout, _TICK)
            return real_select(0)

        selector.select = select

    def time(self) -> float:
        return self._virtual_now

    def run_in_executor(self, executor: Any, func: Callable[..., T], *args: Any) -> Any:
        # At once, in the loop's thread: a thread's real time must not let virtual time run on
        # (asyncio.to_thread's file writes and image checks take no virtual time at all).
        future = self.create_future()
        try:
            future.set_result(func(*args))
        except BaseException as exc:  # noqa: BLE001 - handed to the awaiting task, as a thread's
            future.set_exception(exc)
        return future


def run_virtual(coroutine: Coroutine[Any, Any, T]) -> T:
    """Run `coroutine` to completion on a fresh virtual-time loop."""
    with asyncio.Runner(loop_factory=VirtualTimeLoop) as runner:
        return runner.run(coroutine)
