"""/metrics in the Prometheus text format (version 0.0.4).

Queue figures are read from PostgreSQL at scrape time (app.queue.reads:
counts over the partial indexes of queued and running rows only), so every
API process reports the same numbers. Counters prefixed `asyncinfer_api_`
are this process's own (label `pid`; with several API workers a scrape
sees one of them).
"""

from __future__ import annotations

import os
from typing import TYPE_CHECKING

from app.queue.reads import METRICS_WINDOW_SECONDS, Metrics

if TYPE_CHECKING:
    from app.api.state import ApiState

PRIORITY_NAMES = {-1: "realtime", 0: "0", 1: "1", 2: "2"}


def _escape(value: object) -> str:
    return str(value).replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')


def _labels(**labels: object) -> str:
    return "{" + ",".join(f'{k}="{_escape(v)}"' for k, v in labels.items()) + "}"


def render_metrics(m: Metrics, api: ApiState) -> bytes:
    out: list[str] = []

    def family(name: str, kind: str, help_text: str) -> None:
        out.append(f"# HELP {name} {help_text}")
        out.append(f"# TYPE {name} {kind}")

    family("asyncinfer_queue_depth", "gauge", "Requests waiting or running, by model, priority and state.")
    for model, priority, state, count in m.depth:
        out.append(f"asyncinfer_queue_depth{_labels(model=model, priority=PRIORITY_NAMES.get(priority, priority), state=state)} {count}")

    models: dict[str, tuple[int, int, bool, int | None]] = {}
    waits: list[tuple[str, int, float]] = []
    for name, capacity, in_flight, paused, max_depth, priority, head_wait in m.models:
        models[name] = (capacity, in_flight, paused, max_depth)
        if head_wait is not None:
            waits.append((name, priority, head_wait))
    family("asyncinfer_model_capacity", "gauge", "Requests a model may run at once, over all workers.")
    out += [f"asyncinfer_model_capacity{_labels(model=n)} {v[0]}" for n, v in models.items()]
    family("asyncinfer_model_in_flight", "gauge", "Requests a model runs now (the capacity counter).")
    out += [f"asyncinfer_model_in_flight{_labels(model=n)} {v[1]}" for n, v in models.items()]
    family("asyncinfer_model_paused", "gauge", "1 while a model is paused (claims hand out nothing).")
    out += [f"asyncinfer_model_paused{_labels(model=n)} {int(v[2])}" for n, v in models.items()]
    family("asyncinfer_model_max_queue_depth", "gauge", "Queued requests refused beyond this (429); absent: none.")
    out += [f"asyncinfer_model_max_queue_depth{_labels(model=n)} {v[3]}" for n, v in models.items() if v[3] is not None]
    family("asyncinfer_queue_head_wait_seconds", "gauge",
           "How long the first queued request of a model and priority has been due (negative: backoff).")
    out += [f"asyncinfer_queue_head_wait_seconds{_labels(model=n, priority=PRIORITY_NAMES.get(p, p))} {w:.3f}"
            for n, p, w in waits]

    family("asyncinfer_deliveries_pending", "gauge", "Webhook calls and storage writes not yet done, by kind.")
    family_rows = {kind: (count, age) for kind, count, age in m.deliveries}
    for kind in ("webhook", "storage"):
        out.append(f"asyncinfer_deliveries_pending{_labels(kind=kind)} {family_rows.get(kind, (0, 0))[0]}")
    family("asyncinfer_deliveries_oldest_pending_seconds", "gauge", "Age of the oldest pending delivery, by kind.")
    for kind in ("webhook", "storage"):
        out.append(f"asyncinfer_deliveries_oldest_pending_seconds{_labels(kind=kind)} "
                   f"{(family_rows.get(kind, (0, 0.0))[1] or 0.0):.3f}")

    family("asyncinfer_workers", "gauge", "Worker processes by liveness (heartbeat within 60 s).")
    out.append(f"asyncinfer_workers{_labels(state='alive')} {m.workers_alive}")
    out.append(f"asyncinfer_workers{_labels(state='unresponsive')} {m.workers_unresponsive}")

    window = f"{METRICS_WINDOW_SECONDS // 60}m"
    quantiles = ("0.5", "0.95", "0.99")
    family("asyncinfer_recent_finished", "gauge",
           f"Requests finished in the last {window}, by model and final state (from PostgreSQL).")
    for model, state, count, *_ in m.recent:
        out.append(f"asyncinfer_recent_finished{_labels(model=model, state=state, window=window)} {count}")
    family("asyncinfer_recent_retries", "gauge", f"Extra attempts of the requests finished in the last {window}.")
    for model, state, _count, retries, *_ in m.recent:
        out.append(f"asyncinfer_recent_retries{_labels(model=model, state=state, window=window)} {retries or 0}")
    for metric, index, what in (("time_in_queue", 4, "submit to first start"), ("inference", 5, "start to finish"),
                                ("end_to_end", 6, "submit to finish")):
        family(f"asyncinfer_recent_{metric}_seconds", "gauge",
               f"Quantiles of {what} over requests finished in the last {window}, by model and state.")
        for row in m.recent:
            for q, value in zip(quantiles, row[index] or ()):
                out.append(f"asyncinfer_recent_{metric}_seconds"
                           f"{_labels(model=row[0], state=row[1], quantile=q, window=window)} {value:.6f}")
    family("asyncinfer_recent_deliveries", "gauge", f"Deliveries finished in the last {window}, by kind and outcome.")
    family("asyncinfer_recent_delivery_attempts", "gauge", "Attempts of those deliveries (retries included).")
    family("asyncinfer_recent_delivery_latency_seconds", "gauge",
           f"Quantiles of finish-to-delivered time of deliveries finished in the last {window}.")
    for kind, state, count, attempts, latency in m.recent_deliveries:
        labels = dict(kind=kind, state=state, window=window)
        out.append(f"asyncinfer_recent_deliveries{_labels(**labels)} {count}")
        out.append(f"asyncinfer_recent_delivery_attempts{_labels(**labels)} {attempts or 0}")
        for q, value in zip(quantiles, latency or ()):
            out.append(f"asyncinfer_recent_delivery_latency_seconds{_labels(**labels, quantile=q)} {value:.6f}")

    pid = os.getpid()
    family("asyncinfer_api_submitted_total", "counter", "Requests accepted by this API process, by model.")
    out += [f"asyncinfer_api_submitted_total{_labels(pid=pid, model=k)} {v}" for k, v in sorted(api.submitted.items())]
    family("asyncinfer_api_submit_inserts_total", "counter", "Coalesced inserts of single submits (this process).")
    out.append(f"asyncinfer_api_submit_inserts_total{_labels(pid=pid)} {api.batches}")
    family("asyncinfer_api_submit_inserted_items_total", "counter", "Items in those inserts (this process).")
    out.append(f"asyncinfer_api_submit_inserted_items_total{_labels(pid=pid)} {api.batch_items}")
    family("asyncinfer_api_submits_waiting", "gauge", "Single submits waiting for their coalesced insert (this process).")
    out.append(f"asyncinfer_api_submits_waiting{_labels(pid=pid)} {api.batcher.waiting}")
    family("asyncinfer_api_realtime_total", "counter", "Real-time calls by outcome (this process).")
    out += [f"asyncinfer_api_realtime_total{_labels(pid=pid, outcome=k)} {v}" for k, v in sorted(api.realtime.items())]
    family("asyncinfer_api_errors_total", "counter", "Error answers by status code (this process).")
    out += [f"asyncinfer_api_errors_total{_labels(pid=pid, status=k)} {v}" for k, v in sorted(api.errors.items())]
    family("asyncinfer_api_listen_connected", "gauge", "1 while this process's LISTEN connection is up.")
    out.append(f"asyncinfer_api_listen_connected{_labels(pid=pid)} {int(api.hub.connected)}")
    return ("\n".join(out) + "\n").encode()
