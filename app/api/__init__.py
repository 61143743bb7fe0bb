"""The HTTP API (Litestar under granian): `asyncinfer serve`.

app.py builds the application (factory `app.api.app:create_app`), routes.py
holds the handlers, server.py runs it. See routes.py for the status codes
and errors.py for the one error shape.
"""
