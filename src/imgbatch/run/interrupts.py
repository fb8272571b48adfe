"""Ctrl-C and SIGTERM during `apply`: what each one does, and when.

Takes the running loop and the `Executor`; gives `Interrupts` (the handler while a run sends:
stop sending, then abandon, then cancel), `signal_handler` (installs it on the loop for SIGINT
and SIGTERM and puts back what was there) and `interrupt_at_once` (until the run sends, Ctrl-C
raises KeyboardInterrupt at once: nothing has been sent or written yet).
"""

from __future__ import annotations

import asyncio
import contextlib
import signal
import threading
from collections.abc import Callable, Iterator

from imgbatch.plan.decide import Plan
from imgbatch.run.executor import Executor, RunOutcome


class Interrupts:
    """Ctrl-C and SIGTERM while a run is sending. The first stops sending and says so at once
    (what is in flight, how long it may be waited for); the second, or the grace time out,
    abandons the requests in flight (what is already received is still written); a third
    cancels the run outright. Results are written in every case."""

    def __init__(self, grace: float) -> None:
        self.grace = grace
        self.count = 0
        self._cause = "Ctrl-C"
        self._executor: Executor | None = None
        self._task: asyncio.Future[RunOutcome] | None = None
        self._timer: asyncio.TimerHandle | None = None

    async def run(self, executor: Executor, plan: Plan) -> RunOutcome:
        self._executor = executor
        self._task = asyncio.ensure_future(executor.run(plan))
        if self.count:  # interrupted while the provider started: send nothing
            executor.stop(f"interrupted ({self._cause})")
        try:
            await self._task
        except asyncio.CancelledError:
            current = asyncio.current_task()
            if current is not None and current.cancelling():
                raise  # cancelled from outside, not by a third interrupt
        finally:
            if self._timer is not None:
                self._timer.cancel()
        return executor.outcome

    def __call__(self, signum: signal.Signals) -> None:
        if self._task is not None and self._task.done():
            return  # the run is over; results are being written
        self.count += 1
        self._cause = "Ctrl-C" if signum == signal.SIGINT else signum.name
        executor = self._executor
        if executor is None:
            return
        if self.count == 1:
            executor.stop(f"interrupted ({self._cause})", grace=self.grace, again=self._cause)
            loop = asyncio.get_running_loop()
            self._timer = loop.call_later(self.grace, executor.abandon, self._cause)
        elif self.count == 2:
            executor.abandon(self._cause)
        elif self._task is not None:
            self._task.cancel()


@contextlib.contextmanager
def interrupt_at_once() -> Iterator[None]:
    """Until the run sends, Ctrl-C raises KeyboardInterrupt at once (nothing has been sent or
    written): asyncio.run's own handler would only cancel at the next await, after a plan that
    can take seconds. A handler the caller installed is left alone."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = signal.getsignal(signal.SIGINT)
    runner = getattr(getattr(previous, "func", None), "__self__", None)
    if previous is not signal.default_int_handler and not isinstance(runner, asyncio.Runner):
        yield
        return
    signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)


@contextlib.contextmanager
def signal_handler(
    loop: asyncio.AbstractEventLoop, handler: Callable[[signal.Signals], None]
) -> Iterator[None]:
    installed = []
    for signum in (signal.SIGINT, signal.SIGTERM):
        try:
            previous = signal.getsignal(signum)
            loop.add_signal_handler(signum, handler, signum)
            installed.append((signum, previous))
        except (NotImplementedError, RuntimeError, ValueError):
            pass  # not the main thread, or a platform without loop signal handlers
    try:
        yield
    finally:
        for signum, previous in installed:
            loop.remove_signal_handler(signum)
            # Not the default remove_signal_handler puts back: the one that was there.
            if previous is not None:
                signal.signal(signum, previous)
