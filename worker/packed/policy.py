"""The forward-only path (embed, score, classify) as a step policy.

``Pooled`` has the calls ``worker.generate.generation.Generation`` has, so that the
engine's ``step()`` is one function for both: ``has_work``, ``schedule`` (drain the intake
into FFD bins), ``run`` (the bins' forwards), ``postprocess`` (finish each request),
``fail`` and ``fail_all``. Running out of memory is recovered inside ``run``: the runner
splits a bin that does not fit and reports the sizes that failed in its ``StepResult``,
from which ``run`` shrinks the budget; ``run`` therefore never returns None, the value by
which a generation step says its forward ran out of memory.
"""

from __future__ import annotations

from collections import deque

import numpy as np

from worker.core.errors import RequestOutOfMemoryError
from worker.core.request import Request
from worker.packed.runner import ModelRunner, StepResult
from worker.packed.scheduler import Scheduler, SchedulerOutput


class Pooled:
    """FIFO intake -> bins under the token budget -> packed forwards -> finished requests."""

    def __init__(self, scheduler: Scheduler, runner: ModelRunner):
        self.scheduler, self.runner = scheduler, runner
        self.intake: deque[Request] = deque()  # appended by any thread, drained by schedule()

    @property
    def token_budget(self) -> int:
        return self.scheduler.token_budget

    @property
    def num_waiting(self) -> int:
        return len(self.intake) + self.scheduler.num_waiting

    def has_work(self) -> bool:
        return bool(self.intake) or self.scheduler.num_waiting > 0

    def schedule(self) -> SchedulerOutput | None:
        while self.intake:
            self.scheduler.add(self.intake.popleft())
        return self.scheduler.schedule()

    def run(self, out: SchedulerOutput) -> StepResult:
        """The step's bins; after a bin ran out of memory (the runner split it), the
        budget shrinks here, before anything is counted or finished."""
        result = self.runner.run(out.batch)
        for num_tokens in result.oom_num_tokens:
            self.scheduler.shrink_budget(num_tokens)
        return result

    def failed(self, result: StepResult) -> set[int]:
        """The step's requests that ran out of memory alone (their index in ``out``)."""
        return set(result.oom_failed)

    def postprocess(self, out: SchedulerOutput, result: StepResult) -> int:
        """Finish every request of the step (an error for those that alone did not fit in
        the budget); returns how many."""
        failed, budget = self.failed(result), self.scheduler.token_budget
        for i, request in enumerate(out.requests):  # per request, every step
            if i in failed:
                request.finish(error=RequestOutOfMemoryError(request.num_tokens, budget))
                continue
            output = result.outputs[i]
            if request.normalize:
                output = output / max(float(np.linalg.norm(output)), 1e-12)
            request.finish(output=output)
        return len(out.requests)

    def fail(self, out: SchedulerOutput, error: BaseException) -> None:
        """The step's forward raised: its unfinished requests end with ``error``."""
        for request in out.requests:  # per request of the failed step
            if not request.finished:
                request.finish(error=error)

    def fail_all(self, error: BaseException) -> None:
        """Every queued request ends with ``error`` (the engine died)."""
        pending = list(self.intake) + list(self.scheduler.waiting)
        self.intake.clear()
        self.scheduler.waiting.clear()
        for request in pending:  # per queued request, once
            if not request.finished:
                request.finish(error=error)
