"""LISTEN/NOTIFY channels and payloads. A notification is a hint, never a
claim: whoever wakes up runs the normal claim. Payload formats are defined
next to the SQL that sends them (migrations/sql/*_functions.sql)."""

from __future__ import annotations

from dataclasses import dataclass

QUEUE_CHANNEL = "asyncinfer_queue"        # 'submit:<model>:<count>' | 'capacity:<model>:<free>'
CANCEL_CHANNEL = "asyncinfer_cancel"      # '<worker_id>:<request_id>:<attempt>'
FINISHED_CHANNEL = "asyncinfer_finished"  # '<public_id>:<state>' (real-time requests)
ALL_CHANNELS = (QUEUE_CHANNEL, CANCEL_CHANNEL, FINISHED_CHANNEL)


@dataclass(frozen=True, slots=True)
class WorkAvailable:
    model: str
    count: int
    reason: str  # "submit" or "capacity"


@dataclass(frozen=True, slots=True)
class CancelRequested:
    worker_id: int
    request_id: int
    attempt: int | None = None


@dataclass(frozen=True, slots=True)
class Finished:
    public_id: str
    state: str


Notification = WorkAvailable | CancelRequested | Finished


def parse(channel: str, payload: str) -> Notification | None:
    """Decode one notification; None for anything malformed (it is only a hint)."""
    try:
        if channel == QUEUE_CHANNEL:
            # model names cannot contain ':' (models.name CHECK)
            reason, model, count = payload.split(":")
            return WorkAvailable(model=model, count=int(count), reason=reason)
        if channel == CANCEL_CHANNEL:
            worker_id, request_id, *attempt = payload.split(":")
            return CancelRequested(worker_id=int(worker_id), request_id=int(request_id),
                                   attempt=int(attempt[0]) if attempt else None)
        if channel == FINISHED_CHANNEL:
            public_id, state = payload.split(":", 1)
            return Finished(public_id=public_id, state=state)
    except ValueError:
        return None
    return None
