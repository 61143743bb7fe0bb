"""The dashboard page in headless Chromium (Debian's, driven by Playwright)
against the running server with seeded traffic: it loads, its charts draw,
its numbers are the API's, it refreshes by itself without reloading, a
failure links to the request's detail, and a non-admin key sees nothing.

Screenshots: test-artifacts/dashboard.png (the overview) and
test-artifacts/dashboard-request.png (a failed request's detail)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import httpx

from tests.api.helpers import ApiServer
from tests.dashboard.conftest import Seeded, touch_worker

VIEWPORT = {"width": 1440, "height": 1000}


def _number(text: str) -> int:
    return int(text.replace(",", "").strip())


async def _open(browser: Any, api: ApiServer, key: str) -> tuple[Any, Any]:
    context = await browser.new_context(viewport=VIEWPORT, device_scale_factor=1)
    page = await context.new_page()
    errors: list[str] = []
    page.on("pageerror", lambda error: errors.append(str(error)))
    page.on("console", lambda message: errors.append(message.text) if message.type == "error" else None)
    page.errors = errors  # type: ignore[attr-defined]
    await page.goto(api.base_url + "/dashboard")
    await page.locator("#api-key").fill(key)
    await page.locator("#login-form button[type=submit]").click()
    return context, page


async def test_dashboard_in_chromium(browser: Any, dashboard_api: ApiServer, dashboard_admin: httpx.Client,
                                     seeded: Seeded, artifacts: Path) -> None:
    touch_worker(dashboard_api, seeded.worker_id)
    context, page = await _open(browser, dashboard_api, dashboard_api.admin_key)
    try:
        card = page.locator(f'article[data-model="{seeded.embed}"]')
        await card.wait_for(state="visible", timeout=10_000)
        assert await page.evaluate("sessionStorage.getItem('asyncinfer.dashboard.apiKey')") == dashboard_api.admin_key

        # a number on the page is the API's number
        status = dashboard_admin.get(f"/v1/models/{seeded.embed}/async_queue_status").json()
        assert _number(await card.locator('[data-field="queued"]').inner_text()) == status["num_queued_requests"] == 5
        assert _number(await card.locator('[data-field="in_progress"]').inner_text()) == status["num_in_progress_requests"]
        assert _number(await card.locator('[data-field="capacity"]').inner_text()) == status["capacity"]
        for priority, count in status["queued_by_priority"].items():
            chip = await card.locator(f'[data-field="queued-{priority}"]').inner_text()
            assert _number(chip.split()[-1]) == count, (priority, chip)
        assert _number(await card.locator('[data-field="failed"]').inner_text()) == len(seeded.failed_ids)

        # the charts drew: a canvas of non-zero size in each chart box, with pixels on it
        for model in (seeded.embed, seeded.transcribe):
            for chart in ("throughput", "time-in-queue"):
                canvas = page.locator(f'article[data-model="{model}"] [data-chart="{chart}"] canvas')
                assert await canvas.count() == 1, (model, chart)
                box = await canvas.bounding_box()
                assert box is not None and box["width"] > 200 and box["height"] > 80, (model, chart, box)
        painted = await page.evaluate("""(model) => {
            const canvas = document.querySelector(`article[data-model="${model}"] [data-chart="throughput"] canvas`);
            const data = canvas.getContext('2d').getImageData(0, 0, canvas.width, canvas.height).data;
            let colored = 0;
            for (let i = 0; i < data.length; i += 4) {
                const [r, g, b, a] = [data[i], data[i + 1], data[i + 2], data[i + 3]];
                if (a > 0 && b > r + 40) colored++;   // the blue bars
            }
            return colored;
        }""", seeded.embed)
        assert painted > 200, painted

        # workers and failures are listed
        workers = page.locator("#workers tbody tr")
        assert await workers.count() >= 2
        held = page.locator(f'#workers tr[data-worker-id="{seeded.worker_id}"] [data-field="held_leases"]')
        assert _number(await held.inner_text()) == 2
        for request_id in seeded.failed_ids + seeded.expired_ids:
            assert await page.locator(f'#failures a[href="#/request/{request_id}"]').count() == 1

        # live: new traffic shows up on its own, without a reload
        await page.evaluate("window.__same_page = true")
        response = dashboard_admin.post(f"/v1/models/{seeded.embed}/async_predict",
                                        json={"model_input": {"text": "one more"}, "priority": 1})
        assert response.status_code == 201, response.text
        queued = card.locator('[data-field="queued"]')
        await page.wait_for_function(
            "(el) => el.textContent.trim() === '6'", arg=await queued.element_handle(), timeout=10_000)
        status = dashboard_admin.get(f"/v1/models/{seeded.embed}/async_queue_status").json()
        assert _number(await queued.inner_text()) == status["num_queued_requests"] == 6
        assert await page.evaluate("window.__same_page === true")
        assert await page.locator("#live").get_attribute("data-state") == "ok"

        await page.screenshot(path=str(artifacts / "dashboard.png"), full_page=True)
        assert (artifacts / "dashboard.png").stat().st_size > 20_000

        # a failure links to the request's detail: status, timings, events, output
        failed = seeded.failed_ids[0]
        await page.locator(f'#failures a[href="#/request/{failed}"]').click()
        await page.locator("#detail").wait_for(state="visible")
        await page.wait_for_function("document.querySelector('#detail-status').textContent === 'FAILED'",
                                     timeout=10_000)
        assert await page.locator("#detail-id").inner_text() == failed
        assert await page.locator('[data-field="model"]').inner_text() == seeded.embed
        assert await page.locator('[data-field="started_at"]').inner_text() != "–"
        kinds = await page.locator("#detail-events tbody tr").evaluate_all(
            "(rows) => rows.map((row) => row.getAttribute('data-event-kind'))")
        events = dashboard_admin.get(f"/v1/async_request/{failed}/events").json()["events"]
        assert kinds == [e["kind"] for e in events] and len(kinds) >= 3, kinds
        assert "out of memory" in await page.locator("#detail-error-text").inner_text()
        await page.locator("#detail-output-load").click()
        output = page.locator("#detail-output-text")
        await output.wait_for(state="visible")
        assert "OutOfMemoryError" in await output.inner_text()
        await page.screenshot(path=str(artifacts / "dashboard-request.png"), full_page=True)

        # back to the overview, still the same page
        await page.locator("a.back").click()
        await card.wait_for(state="visible")
        assert await page.evaluate("window.__same_page === true")
        assert page.errors == []  # type: ignore[attr-defined]
    finally:
        await context.close()


async def test_non_admin_key_is_told_and_sees_nothing(browser: Any, dashboard_api: ApiServer,
                                                      seeded: Seeded) -> None:
    context, page = await _open(browser, dashboard_api, seeded.user_key)
    try:
        message = page.locator("#login-message")
        await message.wait_for(state="visible", timeout=10_000)
        assert "not an admin key" in await message.inner_text()
        assert "403" in await message.inner_text()
        assert await page.locator("[data-model]").count() == 0
        assert await page.locator("#overview").is_hidden()
        content = await page.content()
        assert seeded.embed not in content and seeded.failed_ids[0] not in content
        # the refused key is not kept
        assert await page.evaluate("sessionStorage.getItem('asyncinfer.dashboard.apiKey')") is None
    finally:
        await context.close()
