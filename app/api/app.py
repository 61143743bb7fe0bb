"""The Litestar application. `create_app` is the factory granian loads in
each API worker process (`app.api.app:create_app`): settings come from the
environment, DATABASE_URL included (`asyncinfer serve` exports it after
starting the embedded PostgreSQL when needed, and migrates first)."""

from __future__ import annotations

from litestar import Litestar
from litestar.datastructures import State
from litestar.openapi import OpenAPIConfig
from litestar.openapi.plugins import ScalarRenderPlugin, SwaggerRenderPlugin
from litestar.openapi.spec import Components, SecurityScheme

from app.api.errors import exception_handler
from app.api.openapi import document_operations
from app.api.routes import ROUTES
from app.api.state import ApiState
from app.api.supervision import watch_parent
from app.dashboard import DASHBOARD_ROUTES
from app.logs import configure_logging
from app.settings import Settings


def create_app(settings: Settings | None = None) -> Litestar:
    # Read afresh: granian forks its workers from the `serve` process, whose
    # cached settings predate the DATABASE_URL it exported.
    settings = settings or Settings()
    if not settings.database_url:
        raise RuntimeError("DATABASE_URL is not set: run the API with `asyncinfer serve`, which sets it")
    configure_logging(settings)
    watch_parent()
    from app.db.migrate import head_revision

    api = ApiState(settings, settings.database_url, head_revision())
    openapi = OpenAPIConfig(
        title="asyncinfer",
        version="0.1.0",
        description=(
            "Asynchronous inference on PostgreSQL. Authenticate with `Authorization: Api-Key <key>`. "
            "Every error is `{status_code, detail, errors: [{field, rule}]}`."
        ),
        path="/schema",
        render_plugins=[ScalarRenderPlugin(), SwaggerRenderPlugin(path="/swagger")],
        components=Components(security_schemes={
            "ApiKey": SecurityScheme(
                type="apiKey", name="Authorization", security_scheme_in="header",
                description="`Api-Key <key>`",
            ),
        }),
        security=[{"ApiKey": []}],
        use_handler_docstrings=True,
    )
    app = Litestar(
        route_handlers=[*ROUTES, *DASHBOARD_ROUTES],
        state=State({"api": api}),
        lifespan=[api.lifespan],
        exception_handlers={Exception: exception_handler},
        openapi_config=openapi,
        request_max_body_size=settings.max_body_bytes,
        logging_config=None,
        debug=False,
    )
    app.on_startup.append(document_operations)
    return app
