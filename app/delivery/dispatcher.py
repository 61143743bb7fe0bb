"""The dispatcher: drains the delivery outbox.

Loop: claim due deliveries in a batch (SKIP LOCKED, leased), run them
concurrently (webhook POSTs with httpx, object writes with obstore), record
every outcome in one finish_deliveries call. Woken by NOTIFY
asyncinfer_delivery, with a jittered poll for retries that come due.
At-least-once: a dispatcher that dies after a POST but before recording it
leaves the row to be delivered again after its lease; receivers dedupe on
the stable `webhook-id`.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import random
import time
from typing import Any

import httpx
import msgspec

from app.db.listener import Listener
from app.delivery.signing import signed_headers
from app.delivery.storage import ObjectWriter, object_url
from app.delivery.targets import TargetRefused, check_target, guarded_transport
from app.queue.operations import DeliveryResult, DueDelivery, Queue
from app.settings import Settings

log = logging.getLogger("asyncinfer.dispatcher")

DELIVERY_CHANNEL = "asyncinfer_delivery"
SECRETS_TTL_SECONDS = 5.0
CONNECTIONS_PER_CLIENT = 4


def webhook_payload(d: DueDelivery) -> dict[str, Any]:
    """The body: the reference service's shape, plus output_url when stored."""
    payload: dict[str, Any] = {
        "request_id": str(d.request_id),
        "model": d.model,
        "type": "async_request_completed",
        "time": d.finished_at.isoformat(),
        "data": d.output if d.state == "SUCCEEDED" else None,
        "errors": [d.error] if d.state == "FAILED" and d.error is not None else [],
        "metadata": d.metadata,
    }
    if d.stored_url:
        payload["output_url"] = d.stored_url
    return payload


class Dispatcher:
    def __init__(self, queue: Queue, settings: Settings) -> None:
        self.queue = queue
        self.settings = settings
        self.writer = ObjectWriter(settings)
        # Several small clients instead of one big pool: httpx's pool slows
        # down sharply past a handful of connections (measured on loopback:
        # 64 connections in one client ~175 req/s, 16 clients x 4 ~1 100).
        self._clients = [
            httpx.AsyncClient(
                timeout=httpx.Timeout(settings.webhook_timeout_seconds,
                                      connect=settings.webhook_connect_timeout_seconds),
                follow_redirects=False,
                transport=guarded_transport(settings.allow_private_webhooks,
                                            limits=httpx.Limits(max_connections=CONNECTIONS_PER_CLIENT)),
                headers={"user-agent": "asyncinfer-webhooks/1"},
            )
            for _ in range(max(1, -(-settings.dispatcher_concurrency // CONNECTIONS_PER_CLIENT)))
        ]
        self._next_client = itertools.cycle(self._clients)
        self._secrets: list[str] = []
        self._secrets_read_at = 0.0
        self._limit = asyncio.Semaphore(settings.dispatcher_concurrency)

    async def close(self) -> None:
        for client in self._clients:
            await client.aclose()

    def retry_in(self, attempts: int) -> float | None:
        """Delay before the next attempt after `attempts` failed ones (±10 % jitter), None when exhausted."""
        schedule = self.settings.webhook_retry_schedule_seconds
        if attempts > len(schedule):
            return None
        return schedule[attempts - 1] * random.uniform(0.9, 1.1)

    async def secrets(self) -> list[str]:
        if time.monotonic() - self._secrets_read_at > SECRETS_TTL_SECONDS:
            self._secrets = await self.queue.active_webhook_secrets()
            self._secrets_read_at = time.monotonic()
        return self._secrets

    async def deliver(self, d: DueDelivery) -> DeliveryResult:
        async with self._limit:
            try:
                if d.kind == "storage":
                    return await self._store(d)
                return await self._post(d)
            except Exception as error:  # never lose the row: record and retry
                log.exception("delivery %s of request %s crashed", d.id, d.request_id)
                return DeliveryResult(d.id, d.attempts, ok=False, error=f"internal: {error!r}"[:500],
                                      retry_in_seconds=self.retry_in(d.attempts))

    async def _store(self, d: DueDelivery) -> DeliveryResult:
        url = object_url(d.target, d.request_id)
        body = msgspec.json.encode(d.output)
        try:
            await self.writer.write(url, body)
        except ValueError as error:  # a URL we can never write: do not retry
            return DeliveryResult(d.id, d.attempts, ok=False, error=str(error))
        except Exception as error:
            return DeliveryResult(d.id, d.attempts, ok=False, error=f"{type(error).__name__}: {error}"[:500],
                                  retry_in_seconds=self.retry_in(d.attempts))
        return DeliveryResult(d.id, d.attempts, ok=True, stored_url=url,
                              drop_inline=len(body) > self.settings.output_inline_limit_bytes)

    async def _post(self, d: DueDelivery) -> DeliveryResult:
        try:
            await check_target(d.target, self.settings.allow_private_webhooks)
        except TargetRefused as error:  # permanent: fail without retrying
            return DeliveryResult(d.id, d.attempts, ok=False, error=f"refused: {error}")
        body = msgspec.json.encode(webhook_payload(d))
        headers = signed_headers(f"msg_{d.request_id.hex}", int(time.time()), body, await self.secrets())
        started = time.perf_counter()
        try:
            async with next(self._next_client).stream("POST", d.target, content=body, headers=headers) as response:
                read = 0
                async for chunk in response.aiter_bytes():  # bounded read, then drop the rest
                    read += len(chunk)
                    if read >= self.settings.webhook_max_response_bytes:
                        break
                status = response.status_code
        except httpx.HTTPError as error:
            return DeliveryResult(d.id, d.attempts, ok=False, error=f"{type(error).__name__}: {error}"[:500],
                                  retry_in_seconds=self.retry_in(d.attempts))
        elapsed_ms = (time.perf_counter() - started) * 1000
        if 200 <= status < 300:
            log.info("webhook delivered", extra={"request_id": str(d.request_id), "status": status,
                                                  "ms": round(elapsed_ms, 1)})
            return DeliveryResult(d.id, d.attempts, ok=True, status_code=status)
        reason = "redirect not followed" if 300 <= status < 400 else "non-2xx response"
        return DeliveryResult(d.id, d.attempts, ok=False, status_code=status, error=f"HTTP {status}: {reason}",
                              retry_in_seconds=self.retry_in(d.attempts))

    async def run_once(self) -> int:
        """Claim one batch, deliver it, record it. Returns how many were handled."""
        due = await self.queue.claim_deliveries(self.settings.dispatcher_batch_size,
                                                self.settings.delivery_lease_seconds)
        if not due:
            return 0
        results = await asyncio.gather(*(self.deliver(d) for d in due))
        await self.queue.finish_deliveries(results)
        return len(due)

    async def run(self, stop: asyncio.Event, listener: Listener | None = None) -> None:
        poll = self.settings.poll_interval_seconds
        while not stop.is_set():
            try:
                handled = await self.run_once()
            except Exception:
                log.exception("dispatcher tick failed; retrying")
                handled = 0
                await asyncio.sleep(1.0)
            if handled:
                continue
            await self._idle(poll * random.uniform(0.5, 1.5), stop, listener)

    @staticmethod
    async def _idle(timeout: float, stop: asyncio.Event, listener: Listener | None) -> None:
        """Wait for a NOTIFY, the poll timeout or the stop signal, whichever is first."""
        waits = [asyncio.ensure_future(stop.wait())]
        if listener is not None:
            waits.append(asyncio.ensure_future(listener.wait(timeout)))
        _, pending = await asyncio.wait(waits, timeout=timeout, return_when=asyncio.FIRST_COMPLETED)
        for task in pending:
            task.cancel()


async def run_dispatcher(database_url: str, settings: Settings, stop: asyncio.Event) -> None:
    from app.db.pool import open_pool

    pool = await open_pool(database_url, min_size=1, max_size=4, name="asyncinfer-dispatcher")
    listener = Listener(database_url, [DELIVERY_CHANNEL])
    dispatcher = Dispatcher(Queue(pool), settings)
    try:
        await listener.start()
        log.info("dispatcher started")
        await dispatcher.run(stop, listener)
    finally:
        await dispatcher.close()
        await listener.close()
        await pool.close()
