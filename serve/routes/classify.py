"""POST /v1/classify: label probabilities from one classification adapter or an ensemble."""

from __future__ import annotations

import asyncio
from typing import Annotated

from fastapi import APIRouter, Depends, Request

from lorastack.adapters.ensembles import EnsembleManifest
from lorastack.adapters.manifest import AdapterError
from lorastack.serve.crashes import shape_of
from lorastack.serve.protocol import ApiError, ClassifyRequest, ClassifyResponse
from lorastack.serve.routes.common import GatewayDep, documented, json_body, require_api_key
from lorastack.serve.scoring import (
    build_rows,
    check_batch,
    check_classifiers,
    classify_response,
    score,
)

router = APIRouter(dependencies=[Depends(require_api_key)])
Body = Annotated[ClassifyRequest, json_body(ClassifyRequest, code="invalid_request")]


@router.post("/v1/classify", response_model=ClassifyResponse, response_model_exclude_none=True,
             openapi_extra=documented(ClassifyRequest))
async def classify(request: Request, gw: GatewayDep, req: Body) -> ClassifyResponse:
    requested = ",".join(req.models)
    request.state.model = ",".join(sorted(set(req.models)))  # one metric label per set
    s, reg = gw.settings, gw.reg
    check_batch(req.records, s.max_batch)
    models, ensemble = _expand(reg, req.models)
    for name in models:
        if name == reg.base_name and reg.merged is None:  # served, but it has no label set
            raise ApiError(400, f"{name!r} is the base model, which has no labels; /v1/classify "
                           f"needs a classification adapter (GET /v1/models lists them)",
                           "not_a_classifier", "model")
    # 404 with the available names; the base when it is a merged classifier (lorastack export)
    members = [reg.merged if name == reg.base_name and reg.merged else reg.get(name)
               for name in models]
    labels = check_classifiers(members, req.records)
    checked = dict(zip(models, members, strict=True))

    async def one(name: str):
        async with reg.use(name) as (served, engine):  # this version's manifest and weights
            if served is not checked[name]:  # swapped since the check: check what is held
                check_classifiers([served], req.records)
                if set(served.manifest.labels) != set(labels):
                    raise ApiError(409, f"{name!r} was replaced in the store by a version with "
                                   f"the labels {list(served.manifest.labels)} (not {labels}) "
                                   f"while this request was served; send it again",
                                   "adapter_changed", "model")
            rows = await asyncio.to_thread(build_rows, gw.tok, served, req.records,
                                           s.max_prompt_tokens)  # PromptTooLong: app.py

            async def send(body: dict):  # watched: a death is retried or answered (crashes.py)
                return await gw.guard.post(engine, "/v1/completions", body,
                                           shape_of("classify", body, adapter=True))

            sums = await score(send, served.identity, rows)
        return rows.prompt_tokens(), [served.manifest.probabilities(row) for row in sums]

    async def replayable(name: str):
        answer = await gw.guard.retry_once(lambda: one(name), wait_s=s.start_timeout_s)
        gw.metrics.adapter_requests.labels(name).inc()
        return answer

    answers = await asyncio.gather(*(replayable(name) for name in models))
    gw.metrics.tokens.labels(request.state.model, "prompt").inc(sum(t for t, _ in answers))
    return classify_response(requested, labels, models, answers, len(req.records),
                             req.top_k, ensemble)


def _expand(reg, names: list[str]) -> tuple[list[str], EnsembleManifest | None]:
    """The adapters to score: the request's, or a stored ensemble's members (with it)."""
    found = [n for n in names if n in reg.ensembles and n not in reg.current]
    if not found:
        return names, None
    if len(names) > 1:
        members = ", ".join(reg.ensembles[found[0]].weights)
        raise ApiError(400, f"{found[0]!r} is a stored ensemble: request it alone (model: "
                       f"{found[0]!r}), or list its members ({members}) with the other "
                       f"adapters", "ensemble_in_ensemble", "model")
    try:
        ensemble = reg.ensemble_members(found[0])
    except AdapterError as exc:
        raise ApiError(503, f"ensemble {found[0]!r} cannot be served now: {exc}",
                       "ensemble_unavailable", "model") from None
    assert ensemble is not None
    return [m.adapter for m in ensemble.members], ensemble
