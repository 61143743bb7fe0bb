"""One model in one worker process: claim, batch, execute, report.

Claim loop (one task per model). With free local slots it claims
min(free, max_batch_size) requests (batching models) or `free` requests in
ONE Queue.claim call; the SQL also caps the claim at the model's free
capacity over all workers. A batching model that got fewer than it asked
for waits up to max_batch_wait_ms for more (woken by NOTIFY, each wake a
claim for the remainder), then runs the batch. With nothing to claim the
loop sleeps until a NOTIFY for its model, a freed local slot, or the
jittered fallback poll.

Execution never blocks the event loop: sync predict / predict_batch run in
daemon threads (predict_batch in one thread per model, so one forward pass
at a time; the next batch forms meanwhile), async ones as tasks. Results
come back through the process's Inbox and are reported (never per-request
round trips: outcomes are collected and finished in batches by the process).

Per-request outcomes in a batch: predict_batch may return an exception
instance at a position to fail that item alone. When predict_batch raises
and the model also has a sync predict, each item of the batch is run once
through predict (same thread, same deadline) so one bad input fails alone;
otherwise every item of the batch gets the error.

Timeouts and cancels: the model's execution_timeout_seconds applies to each
predict / predict_batch call; a request may lower it for itself with
metadata {"execution_timeout_seconds": x}. On a timeout, cancel or lost
lease the request is reported at once (timeout: a retryable error; cancel:
canceled; lost: nothing) and its result is dropped when it comes. Async
work is cancelled; a thread cannot be interrupted, so its local slot stays
taken until the call returns (the capacity in the database is freed at once).
"""

from __future__ import annotations

import asyncio
import logging
import random
import traceback
from typing import TYPE_CHECKING, Any

from app.db.pool import UndecodableJson
from app.queue.operations import ClaimedRequest, Outcome
from worker import capture
from worker.loader import LoadedModel
from worker.threads import DaemonPool, Signal

if TYPE_CHECKING:
    from worker.process import WorkerProcess

log = logging.getLogger("asyncinfer.worker")

TRACEBACK_LIMIT = 16_000
MESSAGE_LIMIT = 2_000


class Job:
    """One claimed request in this process."""

    __slots__ = ("req", "runner", "reported", "timer", "task", "batch")

    def __init__(self, req: ClaimedRequest, runner: ModelRunner) -> None:
        self.req = req
        self.runner = runner
        self.reported = False  # an outcome was reported (or the lease was lost)
        self.timer: asyncio.TimerHandle | None = None
        self.task: asyncio.Task[None] | None = None
        self.batch: Batch | None = None


class Batch:
    __slots__ = ("jobs", "timer", "task", "started", "returned")

    def __init__(self, jobs: list[Job]) -> None:
        self.jobs = jobs
        self.timer: asyncio.TimerHandle | None = None
        self.task: asyncio.Task[None] | None = None
        self.started = 0.0
        self.returned = False  # its model call returned (or never ran): local slots freed


def error_json(error: BaseException, kind: str = "model_error") -> dict[str, Any]:
    tb = "".join(traceback.format_exception(type(error), error, error.__traceback__))
    return {
        "type": kind,
        "exception": f"{type(error).__module__}.{type(error).__qualname__}".removeprefix("builtins."),
        "message": str(error)[:MESSAGE_LIMIT],
        "traceback": tb[-TRACEBACK_LIMIT:],
    }


def _retryable(error: BaseException) -> bool:
    """Model errors are retried per the request's retry config, unless the
    exception says otherwise with a `retryable = False` attribute."""
    return getattr(error, "retryable", True) is not False


def request_timeout(req: ClaimedRequest, default: float) -> float:
    meta = req.metadata
    if type(meta) is dict:
        value = meta.get("execution_timeout_seconds")
        if isinstance(value, int | float) and not isinstance(value, bool) and value > 0:
            return min(float(value), default)
    return default


class ModelRunner:
    def __init__(self, proc: WorkerProcess, model: LoadedModel, concurrency: int) -> None:
        self.proc = proc
        self.model = model
        self.name = model.config.name
        self.batching = model.batching
        self.limit = concurrency
        self.max_batch = model.config.max_batch_size if self.batching else concurrency
        self.max_wait = model.config.max_batch_wait_ms / 1000.0
        self.timeout = model.config.execution_timeout_seconds
        self.busy = 0  # local slots taken: requests whose model call has not returned
        self.wake = Signal()
        self.task: asyncio.Task[None] | None = None
        self._loop = asyncio.get_running_loop()
        if self.batching:
            self._threads = DaemonPool(1, f"{self.name}-batch") if not model.predict_batch_async else None
        else:
            self._threads = DaemonPool(concurrency, f"{self.name}") if not model.predict_async else None

    # -- claiming --------------------------------------------------------------

    def start(self) -> None:
        self.task = asyncio.create_task(self._claim_loop_guarded(), name=f"claim-{self.name}")

    async def _claim_loop_guarded(self) -> None:
        while not self.proc.stopping:
            try:
                await self._claim_loop()
            except Exception:  # a bug of ours must not silently stop the model being served
                log.exception("claim loop crashed; restarting it", extra={"model": self.name})
                await asyncio.sleep(1.0)

    async def _claim(self, want: int) -> list[Job] | None:
        """One claim statement; the claimed requests are held (renewed, cancellable) at once."""
        proc = self.proc
        try:
            claimed = await proc.queue.claim(self.name, proc.worker_id, want, proc.lease_seconds)
        except Exception as error:
            log.warning("claim failed: %s", error, extra={"model": self.name, "worker_id": proc.worker_id})
            return None
        held = proc.held
        jobs = []
        for req in claimed:
            job = Job(req, self)
            held[req.id] = job
            if isinstance(req.model_input, UndecodableJson):
                # stored, but not a value Python can hold: this request fails, its batch-mates run
                proc.report(job, Outcome(req.id, req.attempt, retryable=False, error={
                    "type": "invalid_input", "message": f"model_input: {req.model_input.error} "
                    "(numbers must fit a double; integers at most 4300 digits)"}))
                continue
            jobs.append(job)
        return jobs

    async def _claim_loop(self) -> None:
        proc = self.proc
        poll = proc.settings.poll_interval_seconds
        backoff = 0.05
        while not proc.stopping:
            free = self.limit - self.busy
            if free <= 0:
                self.wake.clear()
                await self.wake.wait()  # a local slot frees
                continue
            want = min(free, self.max_batch)
            self.wake.clear()  # a NOTIFY from now on means: claim again
            claimed = await self._claim(want)
            if claimed is None:
                await asyncio.sleep(backoff * random.uniform(0.5, 1.5))
                backoff = min(backoff * 2, 2.0)
                continue
            backoff = 0.05
            got = len(claimed)
            if self.batching and 0 < got < want and self.max_wait > 0 and not proc.stopping:
                claimed = await self._fill(claimed, want)
            if proc.stopping:
                for job in claimed:  # not started: release_worker hands them back
                    if proc.held.get(job.req.id) is job:
                        del proc.held[job.req.id]
                break
            claimed = [job for job in claimed if not job.reported]  # canceled or lost while the batch formed
            if claimed:
                self.dispatch(claimed)
            if got < want:  # the queue (or the model's capacity) had no more for us
                await self.wake.wait(poll * random.uniform(0.5, 1.5))

    async def _fill(self, claimed: list[Job], want: int) -> list[Job]:
        """Wait up to max_batch_wait for more requests to join the batch."""
        deadline = self._loop.time() + self.max_wait
        while len(claimed) < want and not self.proc.stopping:
            remaining = deadline - self._loop.time()
            if remaining <= 0 or not await self.wake.wait(remaining) or self.proc.stopping:
                break
            self.wake.clear()
            more = await self._claim(want - len(claimed))
            if more:
                claimed.extend(more)
        return claimed

    # -- dispatch --------------------------------------------------------------

    def dispatch(self, jobs: list[Job]) -> None:
        self.busy += len(jobs)
        if self.batching:
            self._dispatch_batch(jobs)
            return
        loop, timeout = self._loop, self.timeout
        now = loop.time()
        if self.model.predict_async:
            for job in jobs:
                job.task = loop.create_task(self._run_async(job))
                job.task.add_done_callback(self._slot_freed)
                job.timer = loop.call_at(now + request_timeout(job.req, timeout), self._timed_out, job)
        else:
            assert self._threads is not None
            submit, call = self._threads.submit, self._call_item
            for job in jobs:
                job.timer = loop.call_at(now + request_timeout(job.req, timeout), self._timed_out, job)
                submit(call, job)

    def _dispatch_batch(self, jobs: list[Job]) -> None:
        batch = Batch(jobs)
        loop = self._loop
        for job in jobs:
            job.batch = batch
            own = request_timeout(job.req, self.timeout)
            if own < self.timeout:  # a request asked for less than the batch's deadline
                job.timer = loop.call_at(loop.time() + own, self._timed_out, job)
        if self.model.predict_batch_async:
            batch.started = loop.time()
            batch.timer = loop.call_at(batch.started + self.timeout, self._batch_timed_out, batch)
            batch.task = loop.create_task(self._run_batch_async(batch))
            batch.task.add_done_callback(lambda _task: self._batch_returned(batch))
        else:
            assert self._threads is not None
            # Re-armed when the call starts; until then it bounds the wait behind
            # a previous call that hangs (a thread cannot be interrupted).
            batch.timer = loop.call_at(loop.time() + self.timeout, self._batch_timed_out, batch)
            self._threads.submit(self._call_batch, batch)

    # -- execution: threads ----------------------------------------------------

    def _new_capture(self) -> capture.Capture | None:
        limit = self.proc.capture_limit
        return capture.Capture(limit) if limit > 0 else None

    def _call_item(self, job: Job) -> None:  # in a worker thread
        if job.reported:  # canceled, timed out or lost while waiting for a thread
            self.proc.inbox.post(self._item_done, job, None, None, None)
            return
        cap = self._new_capture()
        token = capture.current.set(cap)
        try:
            result, error = self.model.predict(job.req.model_input), None
        except BaseException as exc:  # noqa: BLE001 - the model's failure is the request's outcome
            result, error = None, exc
        finally:
            capture.current.reset(token)
        self.proc.inbox.post(self._item_done, job, result, error, cap)

    def _item_done(self, job: Job, result: Any, error: BaseException | None, cap: capture.Capture | None) -> None:
        self.busy -= 1
        self.wake.set()
        lines = cap.close() if cap is not None else None
        if job.reported:
            self.proc.dropped(job, lines)
            return
        if error is None:
            self.proc.report(job, Outcome(job.req.id, job.req.attempt, output=result), lines)
        else:
            self._failed(job, error, lines)

    def _call_batch(self, batch: Batch) -> None:  # in the model's batch thread
        self.proc.inbox.post(self._batch_started, batch)
        jobs = [job for job in batch.jobs if not job.reported]
        if not jobs:
            self.proc.inbox.post(self._batch_done, batch, jobs, None, None, None)
            return
        inputs = [job.req.model_input for job in jobs]
        cap = self._new_capture()
        token = capture.current.set(cap)
        errors: dict[int, BaseException] | None = None
        try:
            outputs = self.model.predict_batch(inputs)
            outputs, errors = self._check_batch(outputs, len(inputs))
        except BaseException as exc:  # noqa: BLE001
            outputs, errors = self._fallback(exc, inputs)
        finally:
            capture.current.reset(token)
        self.proc.inbox.post(self._batch_done, batch, jobs, outputs, errors, cap)

    @staticmethod
    def _check_batch(outputs: Any, n: int) -> tuple[list[Any], dict[int, BaseException] | None]:
        if not isinstance(outputs, list):
            try:
                outputs = list(outputs)
            except TypeError:
                raise TypeError(f"predict_batch must return a list, got {type(outputs).__name__}") from None
        if len(outputs) != n:
            raise ValueError(f"predict_batch returned {len(outputs)} outputs for {n} inputs")
        errors = None
        for i, out in enumerate(outputs):
            if isinstance(out, BaseException):
                errors = errors or {}
                errors[i] = out
        return outputs, errors

    def _fallback(self, exc: BaseException, inputs: list[Any]) -> tuple[list[Any], dict[int, BaseException]]:
        """predict_batch raised: run each item once through a sync predict so one
        bad input fails alone; without one, every item gets the error."""
        predict = self.model.predict
        if predict is None or self.model.predict_async or len(inputs) == 1:
            return [None] * len(inputs), dict.fromkeys(range(len(inputs)), exc)
        log.warning("predict_batch of %d failed (%s: %s); running the items one by one",
                    len(inputs), type(exc).__name__, exc, extra={"model": self.name})
        outputs: list[Any] = []
        errors: dict[int, BaseException] = {}
        for i, item in enumerate(inputs):
            try:
                outputs.append(predict(item))
            except BaseException as item_exc:  # noqa: BLE001
                outputs.append(None)
                errors[i] = item_exc
        return outputs, errors

    def _batch_started(self, batch: Batch) -> None:
        batch.started = self._loop.time()
        if batch.timer is not None:
            batch.timer.cancel()
            batch.timer = None
        if any(not job.reported for job in batch.jobs):
            batch.timer = self._loop.call_at(batch.started + self.timeout, self._batch_timed_out, batch)

    def _batch_returned(self, batch: Batch) -> None:
        if not batch.returned:
            batch.returned = True
            self.busy -= len(batch.jobs)
            self.wake.set()

    def _batch_done(self, batch: Batch, jobs: list[Job], outputs: list[Any] | None,
                    errors: dict[int, BaseException] | None, cap: capture.Capture | None) -> None:
        self._batch_returned(batch)
        if batch.timer is not None:
            batch.timer.cancel()
        lines = cap.close() if cap is not None else None
        if lines and len(jobs) > 1:
            lines = [f"[batch of {len(jobs)}] {line}" for line in lines]
        if outputs is None:
            return
        report = self.proc.report
        for i, (job, out) in enumerate(zip(jobs, outputs)):
            if job.reported:
                self.proc.dropped(job, lines)
            elif errors is not None and i in errors:
                self._failed(job, errors[i], lines)
            else:
                report(job, Outcome(job.req.id, job.req.attempt, output=out), lines)

    # -- execution: async --------------------------------------------------------

    async def _run_async(self, job: Job) -> None:
        cap = self._new_capture()
        capture.current.set(cap)  # this task's own context
        try:
            result = await self.model.predict(job.req.model_input)
        except asyncio.CancelledError:
            return  # whoever cancelled it (timeout, cancel, lost lease, shutdown) reported already
        except Exception as exc:
            self._failed(job, exc, cap.close() if cap is not None else None)
        else:
            self.proc.report(job, Outcome(job.req.id, job.req.attempt, output=result),
                             cap.close() if cap is not None else None)

    def _slot_freed(self, _task: object = None) -> None:
        self.busy -= 1
        self.wake.set()

    async def _run_batch_async(self, batch: Batch) -> None:
        jobs = list(batch.jobs)
        cap = self._new_capture()
        capture.current.set(cap)
        errors: dict[int, BaseException] | None = None
        outputs: list[Any] | None
        try:
            outputs = await self.model.predict_batch([job.req.model_input for job in jobs])
            outputs, errors = self._check_batch(outputs, len(jobs))
        except asyncio.CancelledError:
            outputs = None
        except Exception as exc:
            outputs, errors = [None] * len(jobs), dict.fromkeys(range(len(jobs)), exc)
        self._batch_done(batch, jobs, outputs, errors, cap)

    # -- failures, timeouts, cancels ---------------------------------------------

    def _failed(self, job: Job, error: BaseException, lines: list[str] | None) -> None:
        if job.reported:
            self.proc.dropped(job, lines)
            return
        retryable = _retryable(error)
        req = job.req
        will_retry = retryable and req.attempt < req.max_attempts
        log.warning("model raised %s: %s (attempt %d of %d; %s)", type(error).__name__, error, req.attempt,
                    req.max_attempts, "will retry" if will_retry else "final",
                    extra=self.proc.log_extra(job), exc_info=error)
        self.proc.report(job, Outcome(req.id, req.attempt, error=error_json(error), retryable=retryable), lines)

    def _timeout_outcome(self, job: Job, seconds: float) -> None:
        req = job.req
        log.warning("execution timed out after %.3gs (attempt %d of %d)", seconds, req.attempt, req.max_attempts,
                    extra=self.proc.log_extra(job))
        error = {"type": "timeout", "message": f"execution exceeded {seconds:g} s", "timeout_seconds": seconds}
        self.proc.report(job, Outcome(req.id, req.attempt, error=error, retryable=True))

    def _timed_out(self, job: Job) -> None:
        job.timer = None
        if job.reported:
            return
        self._timeout_outcome(job, request_timeout(job.req, self.timeout))
        if job.task is not None:
            job.task.cancel()

    def _batch_timed_out(self, batch: Batch) -> None:
        batch.timer = None
        for job in batch.jobs:
            if not job.reported:
                self._timeout_outcome(job, self.timeout)
        if batch.task is not None:
            batch.task.cancel()
        elif not batch.started:
            log.error("a batch waited %.3gs behind a predict_batch call that has not returned; timed out",
                      self.timeout, extra={"model": self.name})
        else:
            log.error("predict_batch still running after its %.3gs timeout; a thread cannot be interrupted, so "
                      "this model's next batch waits for it", self.timeout, extra={"model": self.name})

    def stop_work(self, job: Job) -> None:
        """The request was reported (canceled) or lost: stop its work if we can."""
        if job.timer is not None:
            job.timer.cancel()
            job.timer = None
        if job.task is not None:
            job.task.cancel()
        batch = job.batch
        if batch is not None and batch.task is not None and all(j.reported for j in batch.jobs):
            batch.task.cancel()

    def cancel_all_tasks(self) -> None:
        for job in self.proc.held.values():
            if job.runner is self:
                if job.task is not None:
                    job.task.cancel()
                if job.batch is not None and job.batch.task is not None:
                    job.batch.task.cancel()

    def close(self) -> None:
        if self._threads is not None:
            self._threads.close()

