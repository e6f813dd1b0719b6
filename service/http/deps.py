"""Typed dependencies: the serving objects live on `app.state`, set by the lifespan.

All `async def`: FastAPI runs a plain `def` dependency in its thread pool, a thread hop
per dependency per request on the hot path.
"""

from __future__ import annotations

import hmac
from typing import Annotated, Any

from fastapi import Depends, HTTPException, Request, Security
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from starlette.datastructures import State

from service.metrics import Metrics
from service.settings import Settings
from service.usecases.admin import AdminUseCase
from service.usecases.events import EventsUseCase
from service.usecases.forget import ForgetUseCase


def started(state: State, name: str) -> Any:
    """A serving object the lifespan put on app.state; 503 before it has run."""
    value = getattr(state, name, None)
    if value is None:  # only between process start and the lifespan
        raise HTTPException(503, "starting", headers={"Retry-After": "1"})
    return value


def _started(request: Request, name: str) -> Any:
    return started(request.app.state, name)


async def get_settings(request: Request) -> Settings:
    settings: Settings = request.app.state.settings
    return settings


async def get_events(request: Request) -> EventsUseCase:
    use_case: EventsUseCase = _started(request, "events")
    return use_case


async def get_admin(request: Request) -> AdminUseCase:
    use_case: AdminUseCase = _started(request, "admin")
    return use_case


async def get_forget(request: Request) -> ForgetUseCase:
    use_case: ForgetUseCase = _started(request, "forget")
    return use_case


async def get_metrics(request: Request) -> Metrics:
    metrics: Metrics = request.app.state.metrics
    return metrics


SettingsDep = Annotated[Settings, Depends(get_settings)]
EventsDep = Annotated[EventsUseCase, Depends(get_events)]
AdminUseCaseDep = Annotated[AdminUseCase, Depends(get_admin)]
ForgetDep = Annotated[ForgetUseCase, Depends(get_forget)]
MetricsDep = Annotated[Metrics, Depends(get_metrics)]


# Declares the scheme in the OpenAPI document; the check itself is require_admin's.
BEARER = HTTPBearer(auto_error=False, description="IFA_ADMIN_TOKEN", scheme_name="adminToken")


async def require_admin(
    request: Request,
    settings: SettingsDep,
    _declared: Annotated[HTTPAuthorizationCredentials | None, Security(BEARER)] = None,
) -> None:
    """Bearer token from IFA_ADMIN_TOKEN: 404 when none is configured, 401 when wrong.
    Runs before the body is read, so a token-less call is a 401 whatever its body."""
    if settings.admin_token is None:
        raise HTTPException(404, "Not Found")
    header = request.headers.get("authorization", "")
    scheme, _, token = header.partition(" ")
    expected = settings.admin_token.get_secret_value()
    if scheme.lower() != "bearer" or not hmac.compare_digest(
        token.strip().encode(), expected.encode()
    ):
        raise HTTPException(
            401, "missing or wrong bearer token", headers={"WWW-Authenticate": "Bearer"}
        )


AdminDep = Annotated[None, Depends(require_admin)]
