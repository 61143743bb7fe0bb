"""A fast loopback webhook receiver for benches: answers 204 to every POST,
counts what it got. Run: granian --interface asgi bench.webhook_receiver:app"""

received = 0


async def app(scope, receive, send):  # type: ignore[no-untyped-def]
    global received
    if scope["type"] != "http":
        return
    more = True
    while more:
        message = await receive()
        more = message.get("more_body", False)
    received += 1
    await send({"type": "http.response.start", "status": 204, "headers": []})
    await send({"type": "http.response.body", "body": b""})
