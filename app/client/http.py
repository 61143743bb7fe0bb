"""A small client for the asyncinfer HTTP API, used by the CLI."""

from __future__ import annotations

from typing import Any

import httpx


class ApiError(Exception):
    """An error answer from the API, as one line for a person."""

    def __init__(self, status_code: int, detail: str) -> None:
        super().__init__(f"HTTP {status_code}: {detail}")
        self.status_code = status_code


def _detail(response: httpx.Response) -> str:
    try:
        body = response.json()
    except ValueError:
        return response.text.strip()[:300] or response.reason_phrase
    if isinstance(body, dict):
        errors = body.get("errors") or body.get("extra")
        detail = str(body.get("detail") or body)
        if isinstance(errors, list) and errors:
            parts = [f"{e.get('field', '?')}: {e.get('rule', e.get('message', ''))}" for e in errors if isinstance(e, dict)]
            if parts:
                detail += " (" + "; ".join(parts) + ")"
        return detail
    return str(body)


class Client:
    def __init__(self, base_url: str, api_key: str | None, timeout: float = 30.0) -> None:
        headers = {"Authorization": f"Api-Key {api_key}"} if api_key else {}
        self.http = httpx.AsyncClient(base_url=base_url.rstrip("/"), headers=headers, timeout=timeout,
                                      limits=httpx.Limits(max_connections=8))

    async def close(self) -> None:
        await self.http.aclose()

    async def call(self, method: str, path: str, json: Any = None, ok: tuple[int, ...] = (200, 201)) -> Any:
        try:
            response = await self.http.request(method, path, json=json)
        except httpx.HTTPError as error:
            raise ApiError(0, f"cannot reach {self.http.base_url}: {error}") from None
        if response.status_code not in ok:
            raise ApiError(response.status_code, _detail(response))
        return response.json()

    async def submit_batch(self, model: str, bodies: list[dict[str, Any]], pipeline: bool = False) -> list[str]:
        """Bulk submit to a model, or (pipeline=True) start runs of the pipeline so named."""
        kind = "pipelines" if pipeline else "models"
        answer = await self.call("POST", f"/v1/{kind}/{model}/async_predict_batch", {"requests": bodies})
        return answer["request_ids"]

    async def status(self, request_id: str) -> dict[str, Any]:
        return await self.call("GET", f"/v1/async_request/{request_id}")

    async def output(self, request_id: str) -> dict[str, Any]:
        return await self.call("GET", f"/v1/async_request/{request_id}/output")

    async def cancel(self, request_id: str) -> dict[str, Any]:
        return await self.call("DELETE", f"/v1/async_request/{request_id}")

    async def queue_status(self, model: str) -> dict[str, Any]:
        return await self.call("GET", f"/v1/models/{model}/async_queue_status")

    async def models(self) -> list[dict[str, Any]]:
        return (await self.call("GET", "/v1/models"))["models"]

    async def update_model(self, model: str, changes: dict[str, Any]) -> dict[str, Any]:
        return await self.call("PUT", f"/v1/models/{model}", changes)
