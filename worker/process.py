"""One worker process: the pieces around the per-model runners.

* registration: upsert the served models (capacity from the models file) and
  register a workers row; load every model (in a thread, heartbeats keep
  going meanwhile); a model whose load fails marks the worker `unhealthy`
  with the reason and claims nothing.
* wake-up: one dedicated LISTEN connection (asyncinfer_queue,
  asyncinfer_cancel), health-checked and re-established, each reconnect
  followed by a catch-up claim; 'submit:<model>:n' / 'capacity:<model>:n'
  wake that model's claim loop; '<worker_id>:<request_id>:<attempt>' cancels.
* leases: every lease/3, ONE Queue.renew_leases call for everything held
  (also the heartbeat, sent when holding nothing). An id missing from the
  answer is a lost lease: the work is stopped or its result dropped.
  cancel_requested in the answer cancels like the NOTIFY does.
* finish: outcomes are collected for worker_finish_window_ms (and while the
  previous call is in flight) and recorded with ONE Queue.finish call;
  captured model log lines go first with one Queue.append_logs call.
* maintenance: Queue.run_maintenance every maintenance_interval (jittered);
  the SQL's advisory lock lets one process at a time do the work.
* shutdown (SIGTERM/SIGINT): stop claiming, let in-flight requests finish
  for worker_shutdown_grace_seconds, record their outcomes, then
  Queue.release_worker hands back whatever is still held.
"""

from __future__ import annotations

import asyncio
import logging
import os
import random
import socket
import sys
import threading
from collections.abc import Callable
from typing import Any

import msgspec

from app.db.listener import Listener
from app.db.pool import open_pool
from app.queue import notifications
from app.queue.errors import InvalidParameter
from app.queue.operations import Outcome, Queue
from app.settings import Settings
from worker import capture
from worker.config import ModelConfig
from worker.loader import LoadedModel, construct, load_is_async
from worker.runner import Job, ModelRunner
from worker.threads import Inbox, Signal

log = logging.getLogger("asyncinfer.worker")

LISTEN_CHANNELS = (notifications.QUEUE_CHANNEL, notifications.CANCEL_CHANNEL)


def _in_daemon_thread(fn: Callable[[], Any]) -> asyncio.Future[Any]:
    loop = asyncio.get_running_loop()
    future: asyncio.Future[Any] = loop.create_future()

    def settle(result: Any, error: BaseException | None) -> None:
        if future.done():
            return
        if error is not None:
            future.set_exception(error)
        else:
            future.set_result(result)

    def call() -> None:
        try:
            result = fn()
        except BaseException as error:  # noqa: BLE001
            loop.call_soon_threadsafe(settle, None, error)
        else:
            loop.call_soon_threadsafe(settle, result, None)

    threading.Thread(target=call, name="asyncinfer-load", daemon=True).start()
    return future


# How soon an outcome whose row another session held is tried again.
LOCKED_RETRY_SECONDS = 0.25


class WorkerProcess:
    def __init__(self, queue: Queue, settings: Settings, database_url: str, configs: list[ModelConfig],
                 concurrency: int | None = None, pipelines: dict[str, list[dict[str, Any]]] | None = None) -> None:
        self.queue = queue
        self.pipelines = pipelines or {}
        self.settings = settings
        self.database_url = database_url
        self.configs = configs
        self.concurrency = concurrency
        self.lease_seconds = settings.lease_seconds
        self.capture_limit = settings.worker_log_capture_bytes
        self.worker_id = 0
        self.stopping = False
        self.held: dict[int, Job] = {}
        self.runners: dict[str, ModelRunner] = {}
        self.load_failures: dict[str, str] = {}
        self.pending: list[Outcome] = []
        self.pending_logs: list[tuple[int, int, str]] = []
        self.flush_signal = Signal()
        self._flush_lock = asyncio.Lock()
        self.inbox = Inbox(asyncio.get_running_loop())
        self.listener: Listener | None = None
        self._tasks: list[asyncio.Task[None]] = []
        self._lease_check: asyncio.Task[None] | None = None
        self._check_again = False

    # -- structured logs -------------------------------------------------------

    def log_extra(self, job: Job) -> dict[str, Any]:
        return {"request_id": str(job.req.public_id), "model": job.runner.name, "attempt": job.req.attempt,
                "worker_id": self.worker_id}

    # -- outcomes ----------------------------------------------------------------

    def report(self, job: Job, outcome: Outcome, lines: list[str] | None = None) -> None:
        """Queue one outcome for the next finish call (once per claimed attempt)."""
        if job.reported:
            self.dropped(job, lines)
            return
        job.reported = True
        if job.timer is not None:
            job.timer.cancel()
            job.timer = None
        self.pending.append(outcome)
        if lines:
            req = job.req
            self.pending_logs.extend((req.id, req.attempt, line) for line in lines)
        self.flush_signal.set()

    def dropped(self, job: Job, lines: list[str] | None) -> None:
        """A result that came after its request was reported (timeout, cancel)
        or lost: the result is dropped, captured lines still go to the log."""
        if log.isEnabledFor(logging.DEBUG):
            log.debug("late result dropped", extra=self.log_extra(job))
        if lines:
            req = job.req
            self.pending_logs.extend((req.id, req.attempt, line) for line in lines)
            self.flush_signal.set()

    def cancel(self, request_id: int, source: str) -> None:
        job = self.held.get(request_id)
        if job is None or job.reported:
            return
        log.info("cancel requested (%s): stopping the request", source, extra=self.log_extra(job))
        self.report(job, Outcome(job.req.id, job.req.attempt, canceled=True))
        job.runner.stop_work(job)

    def lost(self, job: Job) -> None:
        if job.reported:
            return
        job.reported = True
        if self.held.get(job.req.id) is job:
            del self.held[job.req.id]
        log.warning("lease lost: the request is no longer ours; its result will be dropped",
                    extra=self.log_extra(job))
        job.runner.stop_work(job)

    async def _flush_loop(self) -> None:
        window = self.settings.worker_finish_window_ms / 1000.0
        while True:
            await self.flush_signal.wait()
            if window > 0:
                await asyncio.sleep(window)
            self.flush_signal.clear()
            try:
                await self.flush()
            except Exception:  # a bug of ours: keep recording outcomes
                log.exception("finish loop crashed; continuing", extra={"worker_id": self.worker_id})
                await asyncio.sleep(0.5)

    async def flush(self, attempts: int | None = None) -> bool:
        """Record every pending outcome (and log line). Retries failed calls
        (forever, or `attempts` times). True when nothing is left pending."""
        async with self._flush_lock:
            tries, backoff = 0, 0.05
            while self.pending or self.pending_logs:
                outcomes, self.pending = self.pending, []
                lines, self.pending_logs = self.pending_logs, []
                try:
                    if lines:
                        await self.queue.append_logs(self.worker_id, lines)
                        lines = []
                    if outcomes:
                        await self._finish(outcomes)
                        outcomes = []
                except Exception as error:
                    self.pending[:0] = outcomes
                    self.pending_logs[:0] = lines
                    tries += 1
                    log.warning("recording %d outcomes failed (%s); retrying", len(outcomes), error,
                                extra={"worker_id": self.worker_id})
                    if attempts is not None and tries >= attempts:
                        return False
                    await asyncio.sleep(backoff * random.uniform(0.5, 1.5))
                    backoff = min(backoff * 2, 2.0)
            return True

    async def _finish(self, outcomes: list[Outcome]) -> None:
        try:
            finished = await self.queue.finish(self.worker_id, outcomes)
        except (TypeError, msgspec.EncodeError, OverflowError):
            outcomes = [self._json_safe(o) for o in outcomes]
            finished = await self.queue.finish(self.worker_id, outcomes)
        held = self.held
        locked: set[int] = set()
        for f in finished:
            if f.state is None:  # another session holds the row: keep the outcome, try again shortly
                locked.add(f.id)
            elif f.state == "QUEUED":  # a retry: with no backoff it is runnable now, and no NOTIFY says so
                job = held.get(f.id)
                if job is not None:
                    job.runner.wake.set()
        if locked:
            retry = [o for o in outcomes if o.id in locked]
            outcomes = [o for o in outcomes if o.id not in locked]
            finished = [f for f in finished if f.state is not None]
            log.info("%d outcomes wait for rows another session holds; retrying", len(retry),
                     extra={"worker_id": self.worker_id})
            asyncio.get_running_loop().call_later(LOCKED_RETRY_SECONDS, self._retry_outcomes, retry)
        if len(finished) == len(outcomes):
            for o in outcomes:
                job = held.get(o.id)
                if job is not None and job.req.attempt == o.attempt and job.reported:
                    del held[o.id]
            return
        accepted = {f.id for f in finished}
        for o in outcomes:
            job = held.get(o.id)
            if job is not None and job.req.attempt == o.attempt and job.reported:
                del held[o.id]
                if o.id not in accepted:
                    log.warning("outcome refused: the lease was lost (reaped, requeued or re-claimed)",
                                extra=self.log_extra(job))

    def _retry_outcomes(self, outcomes: list[Outcome]) -> None:
        self.pending.extend(outcomes)
        self.flush_signal.set()

    def _json_safe(self, outcome: Outcome) -> Outcome:
        """An output that JSON cannot carry fails that request alone (not retried)."""
        try:
            msgspec.json.encode(outcome.to_json())
            return outcome
        except (TypeError, msgspec.EncodeError, OverflowError) as error:
            job = self.held.get(outcome.id)
            if job is not None:
                log.warning("output is not JSON (%s); the request fails", error, extra=self.log_extra(job))
            return Outcome(outcome.id, outcome.attempt, retryable=False, error={
                "type": "output_not_json", "message": f"the model returned an output JSON cannot carry: {error}"})

    # -- leases and heartbeat ------------------------------------------------------

    async def _renew_loop(self) -> None:
        loop = asyncio.get_running_loop()
        interval = self.lease_seconds / 3.0
        next_at = loop.time()
        while True:
            next_at += interval
            now = loop.time()
            if next_at < now:  # fell behind (a stalled database): renew now, then on schedule
                next_at = now
            await asyncio.sleep(next_at - now)
            try:
                await self.renew_once()
            except Exception:
                log.exception("lease renewal crashed; continuing", extra={"worker_id": self.worker_id})

    async def renew_once(self) -> None:
        sent = [(request_id, job.req.attempt) for request_id, job in self.held.items()]
        try:
            answer = await self.queue.renew_leases(self.worker_id, sent, self.lease_seconds)
        except Exception as error:
            log.warning("lease renewal failed (%s); retrying on the next tick", error,
                        extra={"worker_id": self.worker_id})
            return
        for request_id, attempt in sent:
            cancel_requested = answer.get(request_id)
            job = self.held.get(request_id)
            if job is None or job.req.attempt != attempt:
                continue
            if cancel_requested is None:
                self.lost(job)  # a reported job awaits its finish, which the fencing guard decides
            elif cancel_requested:
                self.cancel(request_id, "flagged in the database")

    # -- wake-up -----------------------------------------------------------------

    def on_notify(self, channel: str, payload: str) -> None:
        note = notifications.parse(channel, payload)
        if isinstance(note, notifications.WorkAvailable):
            runner = self.runners.get(note.model)
            if runner is not None:
                runner.wake.set()
        elif isinstance(note, notifications.CancelRequested):
            if note.worker_id == self.worker_id and note.request_id in self.held:
                self._check_leases_soon()

    def _check_leases_soon(self) -> None:
        """A cancel (or an admin's requeue) of one of ours was announced. A
        NOTIFY is only a hint, so ask the database: one renew_leases call says
        which requests are canceled (cancel them) and which are no longer ours
        (drop them), for every request held, not only the one announced."""
        self._check_again = True
        if self._lease_check is None or self._lease_check.done():
            self._lease_check = asyncio.create_task(self._lease_checks(), name="lease-check")

    async def _lease_checks(self) -> None:
        while self._check_again:  # a notice that came during a check gets a check of its own
            self._check_again = False
            await self.renew_once()

    def wake_all(self) -> None:
        for runner in self.runners.values():
            runner.wake.set()

    # -- maintenance ---------------------------------------------------------------

    async def _maintenance_loop(self) -> None:
        interval = self.settings.maintenance_interval_seconds
        requests_s = self.settings.request_retention_hours * 3600
        outputs_s = self.settings.output_retention_hours * 3600
        while True:
            await asyncio.sleep(interval * random.uniform(0.5, 1.5))
            try:
                result = await self.queue.run_maintenance(requests_s, outputs_s)
            except Exception as error:
                log.warning("maintenance tick failed: %s", error, extra={"worker_id": self.worker_id})
                continue
            if result.leader and (result.reaped or result.expired or result.reconciled):
                log.info("maintenance: %d leases reaped, %d requests expired, %d capacity counters corrected",
                         result.reaped, result.expired, result.reconciled, extra={"worker_id": self.worker_id})

    # -- life cycle --------------------------------------------------------------

    def _spawn(self, coro: Any, name: str) -> None:
        self._tasks.append(asyncio.create_task(coro, name=name))

    async def _load(self, config: ModelConfig) -> LoadedModel:
        def build() -> LoadedModel:
            model = construct(config)
            if not load_is_async(model.instance):
                load = getattr(model.instance, "load", None)
                if callable(load):
                    load()
            return model

        model = await _in_daemon_thread(build)
        if load_is_async(model.instance):
            await model.instance.load()
        return model

    async def run(self, stop: asyncio.Event) -> int:
        names = [c.name for c in self.configs]
        for config in self.configs:
            # The file's capacity is the initial one: a capacity set since by
            # an admin (API, CLI, psql) is not overwritten by a restart.
            await self.queue.ensure_model(config.name, capacity=config.capacity)
        for name, steps in self.pipelines.items():
            # Unlike capacity, a declaration in the file is authoritative: a
            # deploy that edits a pipeline takes effect when its workers start.
            try:
                await self.queue.upsert_pipeline(name, steps)
            except InvalidParameter as error:
                log.error("models file: [pipelines.%s]: %s", name, error)
                return 2
        self.worker_id = await self.queue.register_worker(
            f"worker:{'+'.join(names)}"[:200], socket.gethostname(), os.getpid(), names)
        extra = {"worker_id": self.worker_id}
        log.info("worker %d registered for %s", self.worker_id, ", ".join(names), extra=extra)

        self.listener = Listener(
            self.database_url, LISTEN_CHANNELS, on_notify=self.on_notify,
            health_check_seconds=self.settings.listen_health_check_seconds,
            on_reconnect=self.wake_all, application_name=f"asyncinfer-listen:{self.worker_id}")
        await self.listener.start()
        self._spawn(self._renew_loop(), "renew-leases")
        self._spawn(self._maintenance_loop(), "maintenance")
        self._spawn(self._flush_loop(), "finish")

        loaded: list[LoadedModel] = []
        for config in self.configs:
            loading = asyncio.ensure_future(self._load(config))
            stopping = asyncio.ensure_future(stop.wait())
            await asyncio.wait({loading, stopping}, return_when=asyncio.FIRST_COMPLETED)
            stopping.cancel()
            if not loading.done():  # stopped while loading: the daemon thread is abandoned
                loading.cancel()
                break
            try:
                model = loading.result()
            except BaseException as error:  # noqa: BLE001
                reason = f"{type(error).__name__}: {error}"
                self.load_failures[config.name] = reason
                log.error("model %s failed to load (%s); it claims nothing", config.name, reason,
                          extra={**extra, "model": config.name}, exc_info=error)
                continue
            loaded.append(model)
            log.info("model %s loaded (%s, device %s)", config.name,
                     "dynamic batching" if model.batching else ("async predict" if model.predict_async else
                                                                "predict in threads"),
                     model.device or "n/a", extra={**extra, "model": config.name})

        if self.load_failures:
            detail = "; ".join(f"model {name}: load() failed: {reason}" for name, reason in self.load_failures.items())
            await self.queue.set_worker_state(self.worker_id, "unhealthy", detail[:2000])
        for model in loaded:
            concurrency = model.config.effective_concurrency(model.batching, self.concurrency)
            runner = ModelRunner(self, model, concurrency)
            self.runners[model.config.name] = runner
            runner.start()
        if not self.load_failures and not stop.is_set():
            await self.queue.set_worker_state(self.worker_id, "healthy")
            log.info("worker %d serving %s", self.worker_id, ", ".join(names), extra=extra)

        await stop.wait()
        await self.shutdown()
        return 1 if self.load_failures else 0

    async def shutdown(self) -> None:
        loop = asyncio.get_running_loop()
        self.stopping = True
        grace = self.settings.worker_shutdown_grace_seconds
        extra = {"worker_id": self.worker_id}
        running = sum(1 for job in self.held.values() if not job.reported)
        log.info("stopping: no new claims; %d requests in flight, waiting up to %gs for them", running, grace,
                 extra=extra)
        self.wake_all()
        claim_loops = [r.task for r in self.runners.values() if r.task is not None]
        if claim_loops:
            done, pending = await asyncio.wait(claim_loops, timeout=10)
            for task in pending:
                task.cancel()
        deadline = loop.time() + grace
        while loop.time() < deadline and any(not job.reported for job in self.held.values()):
            await asyncio.sleep(0.02)
        for runner in self.runners.values():
            runner.cancel_all_tasks()
        if not await self.flush(attempts=5):
            log.error("could not record %d outcomes; their requests come back through lease expiry",
                      len(self.pending), extra=extra)
        released = None
        for attempt in range(5):
            try:
                released = await self.queue.release_worker(self.worker_id)
                break
            except Exception as error:
                log.warning("release_worker failed (%s)", error, extra=extra)
                await asyncio.sleep(0.2 * (attempt + 1))
        if released:
            log.info("handed back %d unfinished requests", released, extra=extra)
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        if self.listener is not None:
            await self.listener.close()
        for runner in self.runners.values():
            runner.close()
        log.info("worker %d stopped", self.worker_id, extra=extra)


async def run_worker(database_url: str, settings: Settings, configs: list[ModelConfig], concurrency: int | None,
                     stop: asyncio.Event, pipelines: dict[str, list[dict[str, Any]]] | None = None) -> int:
    capture.install()
    # A model thread woken for a new request waits for the GIL at most this
    # long while the event loop holds it (default 5 ms: a wake-up latency tail).
    sys.setswitchinterval(0.0005)
    # No ping on checkout: a dead connection shows up as a failed call, which
    # every loop here retries, and the pool drops it on return.
    size = len(configs) + 4
    pool = await open_pool(database_url, min_size=min(3, size), max_size=size, name="asyncinfer-worker", check="never")
    try:
        worker = WorkerProcess(Queue(pool), settings, database_url, configs, concurrency, pipelines)
        return await worker.run(stop)
    finally:
        await pool.close()
        capture.uninstall()
