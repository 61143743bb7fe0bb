"""The operator dashboard: a live page served by the API (`/dashboard`) and
the admin JSON it polls (`/v1/dashboard/summary`). Static assets live in
static/ and ship with the package; uPlot (MIT, see static/uPlot.LICENSE.txt)
is vendored there as its minified release file."""

from app.dashboard.routes import DASHBOARD_ROUTES

__all__ = ["DASHBOARD_ROUTES"]
