"""The background step loop: one daemon thread that steps the engine while work waits.

The engine's async API puts requests in its intake and calls ``wake()``; the thread
sleeps on a condition variable otherwise. If a step raises, the loop hands the
exception to ``on_death`` and ends, so the engine can report itself dead.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable

logger = logging.getLogger(__name__)


class StepLoop:
    """Runs ``step()`` whenever ``has_work()`` is true, until ``stop()``."""

    def __init__(self, step: Callable[[], int], has_work: Callable[[], bool],
                 on_death: Callable[[BaseException], None]):
        self._step, self._has_work, self._on_death = step, has_work, on_death
        self._cond = threading.Condition()
        self._stopping = False
        self._thread = threading.Thread(target=self._main, name="packserve-step-loop",
                                        daemon=True)

    def start(self) -> None:
        self._thread.start()

    def wake(self) -> None:
        with self._cond:
            self._cond.notify()

    def stop(self, timeout: float | None = None) -> None:
        with self._cond:
            self._stopping = True
            self._cond.notify()
        if self._thread.is_alive() and threading.current_thread() is not self._thread:
            self._thread.join(timeout)

    def is_alive(self) -> bool:
        return self._thread.is_alive()

    def _main(self) -> None:
        try:
            while True:
                with self._cond:
                    while not self._stopping and not self._has_work():
                        self._cond.wait()
                    if self._stopping:
                        return
                self._step()
        except BaseException as exc:  # noqa: BLE001 - reported to the engine, then we end
            logger.exception("the step loop died")
            self._on_death(exc)
