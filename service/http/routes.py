"""HTTP routes: parse, call a use case (service/usecases/), shape the answer."""

from __future__ import annotations

import time
from typing import Annotated, Any, Final

from fastapi import APIRouter, Path, Request
from pydantic import BaseModel
from starlette.datastructures import State
from starlette.responses import PlainTextResponse, Response
from starlette.types import Scope

from ifa_common.manifest import ArtifactError, ArtifactMissing
from service.engine.registry import ModelNotReady, NoRollout
from service.http.answered import AnsweredThen
from service.http.deps import (
    AdminDep,
    AdminUseCaseDep,
    EventsDep,
    ForgetDep,
    MetricsDep,
    SettingsDep,
    started,
)
from service.http.middleware import (
    ARRIVED,
    JSONResponse,
    error_response,
    parse_body,
    validation_error,
)
from service.http.protocol import (
    USER_ID_PATTERN,
    ErrorBody,
    EventsRequest,
    EventsResponse,
    ForgetResponse,
    ModelInfo,
    RankRequest,
    RankResponse,
    ReloadRequest,
    RolloutRequest,
    rank_answer,
)
from service.http.rank_body import parse_rank_body
from service.settings import Settings
from service.store.redis_store import IdempotencyConflict, StoreUnavailable
from service.usecases.admin import rollout_spec
from service.usecases.rank import Overloaded, RankUseCase

ERRORS: Final[dict[int | str, dict[str, Any]]] = {
    408: {"model": ErrorBody, "description": "body not received within IFA_BODY_TIMEOUT_S"},
    413: {"model": ErrorBody, "description": "body larger than IFA_MAX_BODY_BYTES"},
    422: {"model": ErrorBody, "description": "validation error; `error` names the field"},
    503: {"model": ErrorBody, "description": "overloaded or not ready; see Retry-After"},
}


def body_doc(model: type[BaseModel], required: bool = True) -> dict[str, Any]:
    """The OpenAPI request body of a route that parses its body itself. Nested models are
    inlined: pydantic's `#/$defs/...` references would resolve against the root of the
    OpenAPI document, where there is no `$defs`."""
    schema = model.model_json_schema()
    defs = schema.pop("$defs", {})

    def inline(node: Any) -> Any:
        if isinstance(node, dict):
            ref = node.get("$ref")
            if isinstance(ref, str) and ref.startswith("#/$defs/"):
                return inline(defs[ref.removeprefix("#/$defs/")])
            return {k: inline(v) for k, v in node.items()}
        if isinstance(node, list):
            return [inline(v) for v in node]
        return node

    return {
        "requestBody": {
            "required": required,
            "content": {"application/json": {"schema": inline(schema)}},
        }
    }


RANK_BODY_DOC: Final = body_doc(RankRequest)

router = APIRouter()


def _unavailable(detail: str, retry_after_s: int) -> JSONResponse:
    return error_response(503, detail, headers={"Retry-After": str(retry_after_s)})


@router.post(
    "/rank",
    response_model=RankResponse,
    responses=ERRORS,
    summary="Score a candidate set for a user, best first",
    openapi_extra=RANK_BODY_DOC,
)
async def rank(request: Request) -> Response:
    return await answer_rank(request.app.state, request.scope, await request.body())


async def answer_rank(state: State, scope: Scope, raw: bytes) -> Response:
    """POST /rank's answer to its raw body: the route's, and the fast path's
    (service/http/inline_rank.py). What the metrics read of it goes in the scope's state."""
    # One pydantic-core pass over the body (see parse_rank_body); the serving objects come
    # from app.state: no dependency resolution per request.
    use_case: RankUseCase = started(state, "rank")
    settings: Settings = state.settings
    body, items = parse_rank_body(raw)
    if len(items) > settings.max_candidates:
        raise validation_error(
            "candidates", f"at most {settings.max_candidates} candidates", "too_long"
        )
    notes = scope.setdefault("state", {})
    try:
        result = await use_case.rank(
            body.user_id,
            items,
            body.top_k,
            body.budget_ms,
            body.request_id,
            arrived=notes.get(ARRIVED),
        )
    except Overloaded as e:
        notes["model_version"] = e.version
        return _unavailable(str(e), e.retry_after_s)
    except ModelNotReady as e:
        return _unavailable(str(e), e.retry_after_s)
    t = time.perf_counter()
    payload = rank_answer(result)
    result.timings.serialize = (time.perf_counter() - t) * 1e3
    notes["degraded"] = result.degraded
    notes["model_version"] = result.model_version

    def account() -> None:  # once the answer is sent
        use_case.answered(result.context)
        state.metrics.observe_rank(result.context)  # the one place an answer's metrics go
        if state.impressions is not None:  # queued only: the log is written off the path
            state.impressions.offer_impression(
                result.request_id,
                result.user_id,
                result.model_version,
                result.degraded,
                result.item_ids,
                result.scores,
            )
        if use_case.registry.rollout is not None:  # no rollout: one attribute check
            state.shadow.offer(result.request_id, result.user_id, items)

    return AnsweredThen(payload, account)


@router.post(
    "/events",
    response_model=EventsResponse,
    responses={**ERRORS, 409: {"model": ErrorBody, "description": "idempotency key reused"}},
    summary="Append behaviour events to a user's sequence (idempotent with a key)",
    openapi_extra=body_doc(EventsRequest),
)
async def events(request: Request, use_case: EventsDep, settings: SettingsDep) -> Response:
    # parsed here, as /rank does: an unparseable body is the same 422 on both routes
    body = parse_body(EventsRequest, await request.body())
    if len(body.events) > settings.max_events_per_call:
        raise validation_error(
            "events", f"at most {settings.max_events_per_call} events per call", "too_long"
        )
    evs = body.events
    try:
        result = await use_case.append(
            body.user_id,
            [e.item_id for e in evs],
            [e.ts for e in evs],
            [e.category for e in evs],
            [e.action for e in evs],
            body.idempotency_key,
            [e.request_id for e in evs],
        )
    except StoreUnavailable:
        return _unavailable("event store unavailable; retry with the same idempotency_key", 1)
    except IdempotencyConflict as e:
        return error_response(409, str(e), "idempotency_key: reused with different events")
    return JSONResponse(
        {"user_id": body.user_id, "appended": result.appended, "length": result.length}
    )


@router.get("/healthz", summary="Liveness: the process runs")
async def healthz() -> Response:
    return JSONResponse({"status": "ok"})


@router.get(
    "/readyz",
    summary="Readiness: a model is loaded and warm and Redis answers",
    responses={503: {"description": "not ready; `reason` says why"}},
)
async def readyz(request: Request, admin: AdminUseCaseDep) -> Response:
    ready, info = await admin.readiness()
    info["redis_mode"] = request.app.state.redis_mode
    if getattr(request.app.state, "shutting_down", False):
        ready = False
        info["reason"] = "shutting down"
    info["status"] = "ready" if ready else "not_ready"
    return JSONResponse(info, status_code=200 if ready else 503)


@router.get(
    "/metrics",
    summary="Prometheus metrics (text format)",
    response_class=PlainTextResponse,
    responses={200: {"content": {"text/plain": {}}}},
)
async def metrics_endpoint(metrics: MetricsDep) -> Response:
    body, content_type = metrics.render()
    return Response(body, media_type=content_type)


@router.get(
    "/v1/model",
    response_model=ModelInfo,
    responses={503: {"model": ErrorBody}},
    summary="The model being served",
)
async def model_info(admin: AdminUseCaseDep) -> Response:
    try:
        slot = admin.model()
    except ModelNotReady as e:
        return _unavailable(str(e), e.retry_after_s)
    versions = [
        {
            "version": s.version,
            "role": role,
            "share": share,
            "provider": s.runtime.provider,
            "loaded_at": s.loaded_at,
        }
        for role, s, share in admin.registry.served()
    ]
    rt = slot.runtime
    manifest = rt.manifest
    h, f, d = rt.dims
    summary = {
        k: manifest[k]
        for k in ("version", "created_at", "model_type", "config", "opset", "training", "files")
        if k in manifest
    }
    return JSONResponse(
        {
            "version": rt.version,
            "provider": rt.provider,
            "providers": rt.providers,
            "dims": {"heads": h, "d_phi": f, "d_head": d},
            "manifest": summary,
            "loaded_at": slot.loaded_at,
            "versions": versions,
        }
    )


@router.post(
    "/admin/reload",
    responses={
        401: {"model": ErrorBody},
        404: {"model": ErrorBody, "description": "no admin token configured, or no such version"},
        422: {"model": ErrorBody, "description": "the artifact fails verification"},
    },
    summary="Load, verify and warm another model version; swap it in atomically",
    openapi_extra=body_doc(ReloadRequest, required=False),
)
async def reload(request: Request, _: AdminDep, admin: AdminUseCaseDep) -> Response:
    # The body is read here, after the token check (a body parameter would be parsed
    # before any dependency, and a token-less call with a bad body would get a 400/422).
    raw = await request.body()
    body = parse_body(ReloadRequest, raw) if raw.strip() else ReloadRequest()
    version = body.version
    try:
        slot, previous = await admin.reload(version)
    except ArtifactMissing as e:
        return error_response(404, str(e), "version: not found")
    except (ArtifactError, ValueError, OSError, RuntimeError) as e:
        return error_response(422, f"artifact cannot be served: {e}", "version: not servable")
    return JSONResponse(
        {"version": slot.version, "previous": previous, "provider": slot.runtime.provider}
    )


ADMIN_ERRORS: Final[dict[int | str, dict[str, Any]]] = {
    401: {"model": ErrorBody},
    404: {"model": ErrorBody, "description": "no admin token configured, or no such version"},
    409: {"model": ErrorBody, "description": "no rollout to promote"},
    422: {"model": ErrorBody, "description": "invalid body, or an artifact fails verification"},
    503: {"model": ErrorBody, "description": "no model loaded yet"},
}


@router.post(
    "/admin/rollout",
    responses=ADMIN_ERRORS,
    summary="Start (or change) a rollout: a candidate version for a share of users, a "
    "shadow version scored on a sample of requests",
    openapi_extra=body_doc(RolloutRequest),
)
async def rollout(request: Request, _: AdminDep, admin: AdminUseCaseDep) -> Response:
    body = parse_body(RolloutRequest, await request.body())
    if body.shadow is not None and request.app.state.impressions is None:
        raise validation_error(
            "shadow", "a shadow's scores go to the impression log: set IFA_IMPRESSION_LOG=true"
        )
    try:
        await admin.rollout(body.candidate, body.share, body.shadow, body.shadow_rate)
    except ModelNotReady as e:
        return _unavailable(str(e), e.retry_after_s)
    except ArtifactMissing as e:
        return error_response(404, str(e), "version: not found")
    except (ArtifactError, ValueError, OSError, RuntimeError) as e:
        return error_response(422, f"rollout refused: {e}", "version: not servable")
    return JSONResponse(admin.rollout_status())


@router.post(
    "/admin/rollout/promote",
    responses=ADMIN_ERRORS,
    summary="Make the candidate the stable version (its warm cache and all); ends the rollout",
)
async def promote(_: AdminDep, admin: AdminUseCaseDep) -> Response:
    try:
        previous = (await admin.promote())[1]
    except NoRollout as e:
        return error_response(409, str(e), "rollout: none")
    return JSONResponse({**admin.rollout_status(), "previous": previous})


@router.post(
    "/admin/rollout/drop",
    responses=ADMIN_ERRORS,
    summary="End the rollout: the stable version answers every user again",
)
async def drop(_: AdminDep, admin: AdminUseCaseDep) -> Response:
    ro = await admin.drop()
    return JSONResponse(
        {**admin.rollout_status(), "dropped": rollout_spec(ro) if ro is not None else None}
    )


@router.delete(
    "/users/{user_id}",
    response_model=ForgetResponse,
    responses={
        401: {"model": ErrorBody, "description": "missing or wrong bearer token"},
        404: {"model": ErrorBody, "description": "no admin token configured"},
        422: {"model": ErrorBody, "description": "not a valid user id; `error` says why"},
        503: {
            "model": ErrorBody,
            "description": "Redis unavailable: retry (some data may be gone; a forget is idempotent)",
        },
    },
    summary="Forget a user: sequence, states, idempotency keys, impression log entries; "
    "every replica's cache",
)
async def forget_user(
    _: AdminDep,  # first: a token-less call is a 401 whatever its user id
    use_case: ForgetDep,
    user_id: Annotated[
        str,
        Path(
            min_length=1,
            max_length=128,
            pattern=USER_ID_PATTERN,
            description="1..128 characters of [A-Za-z0-9_.:@-]",
            examples=["u42"],
        ),
    ],
) -> Response:
    try:
        result = await use_case.forget(user_id)
    except StoreUnavailable:
        return _unavailable("user store unavailable; retry (forgetting is idempotent)", 1)
    return JSONResponse(
        {
            "user_id": result.user,
            "removed": result.removed,
            "cached_states_dropped": result.cached_states_dropped,
        }
    )
