"""Adapters by hand: list what is served, load and unload (admin key)."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Depends

from lorastack.adapters.manifest import AdapterError, AdapterNotFoundError
from lorastack.serve.protocol import (
    AdapterAction,
    AdapterList,
    AdapterLoaded,
    AdapterStatus,
    AdapterUnloaded,
    ApiError,
)
from lorastack.serve.registry import Served, UnknownModelError
from lorastack.serve.routes.common import (
    GatewayDep,
    documented,
    json_body,
    require_admin,
    require_api_key,
)

router = APIRouter()
Action = Annotated[AdapterAction, json_body(AdapterAction, code="invalid_request")]


@router.get("/v1/adapters", dependencies=[Depends(require_api_key)])
async def list_adapters(gw: GatewayDep) -> AdapterList:
    reg = gw.reg
    return AdapterList(capacity=reg.capacity, data=[_status(reg.current[n]) for n in reg.names()],
                       draining=[s.identity for s in reg.draining],
                       unloaded=sorted(reg.disabled), refused=reg.problems)


@router.post("/v1/adapters/load", dependencies=[Depends(require_admin)],
             openapi_extra=documented(AdapterAction))
async def load(gw: GatewayDep, action: Action) -> AdapterLoaded:
    try:
        served = await gw.reg.add(action.name, eager=True)
    except AdapterNotFoundError as exc:
        raise ApiError(404, str(exc), "adapter_not_found", "name") from None
    except AdapterError as exc:
        raise ApiError(422, f"cannot serve it: {exc}", "adapter_not_servable", "name") from None
    gw.metrics.adapters_served.set(len(gw.reg.current))
    return AdapterLoaded(**_status(served).model_dump())


@router.post("/v1/adapters/unload", dependencies=[Depends(require_admin)],
             openapi_extra=documented(AdapterAction))
async def unload(gw: GatewayDep, action: Action) -> AdapterUnloaded:
    name = action.name
    if not await gw.reg.remove(name, by_hand=True):
        gw.reg.disabled.discard(name)
        raise UnknownModelError(name, [gw.reg.base_name, *gw.reg.names()])
    gw.metrics.adapters_served.set(len(gw.reg.current))
    return AdapterUnloaded(name=name, note="requests already running on it finish first; it "
                           "stays unloaded until loaded again or rewritten in the store")


def _status(s: Served) -> AdapterStatus:
    return AdapterStatus(name=s.name, identity=s.identity, task=s.manifest.task,
                         labels=list(s.manifest.labels),
                         loaded_on=[e.url for e in s.loaded if s.is_loaded(e)],
                         inflight=s.inflight)
