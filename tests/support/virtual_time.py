"""An asyncio event loop on virtual time, for testing pacing and deadlines without sleeping.

Takes nothing; gives `VirtualTimeLoop`, whose clock jumps to the next timer instead of waiting
for it, `run_virtual(coroutine)`, and `VirtualServer`, which runs a `FakeDashScope` in such a
loop so that the real provider's requests cross real sockets while every timer (the pacer's
waits, the fake's window and latency, a download's deadline, a retry's backoff) is virtual.
Every timer-based wait in the loop (asyncio.sleep, call_later) is virtual and work sent to a
thread runs at once, so a 150-second scenario runs in milliseconds and the times observed are
exact to a microsecond, however loaded the machine. The same idea as aiolimiter's own
`MockLoopTime`, for a whole run.

Real I/O takes no virtual time: the clock moves only when nothing is ready to read or write.
Between two sockets on 127.0.0.1 (the server's and the client's, in this one loop) the kernel
hands bytes over within the sending call, so "nothing ready" means everyone waits on a timer;
`settle` (real seconds) is how long the loop still listens before it believes that, in case the
kernel handed something over late.
"""

from __future__ import annotations

import asyncio
import selectors
from collections.abc import Callable, Coroutine
from typing import TYPE_CHECKING, Any, TypeVar

if TYPE_CHECKING:
    from tests.support.fake_dashscope import FakeDashScope

T = TypeVar("T")

# Every turn of the loop moves the clock a little, as a real clock would: a wake-up armed for "a
# rounding error from now" would spin forever on a clock that never moves by itself.
_TICK = 1e-9


class VirtualTimeLoop(asyncio.SelectorEventLoop):
    """An event loop whose clock jumps to the next timer instead of waiting for it.

    `settle`: real seconds to listen for I/O before jumping while sockets other than the loop's
    own are open (0: no sockets expected, as in the pacer's simulations)."""

    def __init__(self, settle: float = 0.0) -> None:
        super().__init__(selectors.SelectSelector())
        self._virtual_now = 0.0
        selector: Any = self._selector  # type: ignore[attr-defined]
        real_select = selector.select

        def select(timeout: float | None = None) -> Any:
            ready = real_select(0)
            if not ready and timeout != 0 and settle and self._has_sockets(selector):
                ready = real_select(settle)
            if ready:  # I/O to handle takes no time (but a tick, as every turn does)
                self._virtual_now += _TICK
                return ready
            if timeout is None:
                raise RuntimeError("deadlock: nothing is scheduled in virtual time")
            self._virtual_now += max(timeout, _TICK)
            return real_select(0)

        selector.select = select

    def _has_sockets(self, selector: Any) -> bool:
        own = self._ssock.fileno()  # type: ignore[attr-defined]
        return any(fd != own for fd in selector.get_map())

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


# Real seconds a loop with sockets listens before its clock jumps (see the module docstring).
SETTLE_S = 0.02


class VirtualServer:
    """A `FakeDashScope` listening in a virtual-time loop that every `run` uses, in turn.

    Takes the server (not yet started); gives, while entered, `run(coroutine)`: the coroutine
    run to completion in that loop, with the server answering in it. Its signature is
    `asyncio.run`'s, so a test may put it in its place for code that calls `asyncio.run` itself
    (the command line). The clock starts at 0 and goes on across runs, as a real one would.
    """

    def __init__(self, server: FakeDashScope) -> None:
        self.server = server
        self.loop = VirtualTimeLoop(settle=SETTLE_S)

    def __enter__(self) -> VirtualServer:
        asyncio.set_event_loop(self.loop)
        self.loop.run_until_complete(self.server.astart())
        return self

    def __exit__(self, *exc_info: object) -> None:
        try:
            self.loop.run_until_complete(self.server.astop())
            # As asyncio.run ends: what is left (a handler stalled on purpose) is cancelled and
            # runs its cleanup, so the server records it.
            leftovers = asyncio.all_tasks(self.loop)
            for task in leftovers:
                task.cancel()
            self.loop.run_until_complete(asyncio.gather(*leftovers, return_exceptions=True))
            self.loop.run_until_complete(self.loop.shutdown_asyncgens())
        finally:
            asyncio.set_event_loop(None)
            self.loop.close()

    def run(self, coroutine: Coroutine[Any, Any, T], *, debug: bool | None = None) -> T:
        """The coroutine's result, run in the server's loop on virtual time."""
        return self.loop.run_until_complete(coroutine)
