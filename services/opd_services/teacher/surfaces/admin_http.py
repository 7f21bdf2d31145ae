"""Experiment management over HTTP, for the admin key; an experiment may read its own usage.

  GET    /v1/admin/experiments                   list
  POST   /v1/admin/experiments                   create -> credentials, shown once
  GET    /v1/admin/experiments/{name}            record + usage
  PATCH  /v1/admin/experiments/{name}            weight / quotas
  POST   /v1/admin/experiments/{name}/rotate-key new API key, the old one stops working
  DELETE /v1/admin/experiments/{name}            revoke credentials
  GET    /v1/experiments/{name}/usage            admin, or that experiment's own key
The operations are the registry's (`opd experiments` runs the same code); this module only
maps HTTP onto them. An experiment key gets 403 on admin routes and on other experiments.
"""
from __future__ import annotations

import asyncio
from dataclasses import asdict

from fastapi import APIRouter, Depends
from pydantic import BaseModel, ConfigDict, Field

from opd_services.errors import PermissionDenied
from opd_services.teacher.surfaces.common import Int, Number
from opd_services.tenancy.auth import Tenant
from opd_services.tenancy.registry import Registry


class ExperimentSpec(BaseModel):
    model_config = ConfigDict(extra="forbid")
    name: str
    weight: Number = Field(1.0, description="Share of teacher time relative to other experiments.")
    max_inflight_tokens: Int | None = Field(None, description="Tokens in flight at the teacher; over it -> 429.")
    max_backlog: Int | None = Field(None, description="Rollouts waiting + being scored; over it -> QueueFull.")
    teacher: str | None = Field(None, description="Default teacher of its rollouts (a name in the scorers' OPD_TEACHERS); unset = the scorers' default.")


class ExperimentPatch(BaseModel):
    model_config = ConfigDict(extra="forbid")
    weight: Number | None = None
    max_inflight_tokens: Int | None = None
    max_backlog: Int | None = None
    teacher: str | None = None


def admin_router(registry: Registry, tenant_dep) -> APIRouter:
    router = APIRouter()

    async def admin(who: Tenant = Depends(tenant_dep)) -> Tenant:
        if not who.admin:
            raise PermissionDenied(f"experiment {who.name!r} may not manage experiments; use the admin key")
        return who

    def run(fn, *args, **kw):
        return asyncio.to_thread(fn, *args, **kw)

    @router.get("/v1/admin/experiments", dependencies=[Depends(admin)])
    async def list_experiments():
        return {"experiments": [e.public() for e in await run(registry.list)]}

    @router.post("/v1/admin/experiments", status_code=201, dependencies=[Depends(admin)])
    async def create(spec: ExperimentSpec):
        return asdict(await run(registry.create, spec.name, weight=spec.weight,
                                max_inflight_tokens=spec.max_inflight_tokens, max_backlog=spec.max_backlog,
                                teacher=spec.teacher))

    @router.get("/v1/admin/experiments/{name}", dependencies=[Depends(admin)])
    async def show(name: str):
        exp = await run(registry.require, name)
        return {**exp.public(), "usage": await run(registry.usage, name)}

    @router.patch("/v1/admin/experiments/{name}", dependencies=[Depends(admin)])
    async def update(name: str, patch: ExperimentPatch):
        return (await run(registry.update, name, **patch.model_dump())).public()

    @router.post("/v1/admin/experiments/{name}/rotate-key", dependencies=[Depends(admin)])
    async def rotate(name: str):
        return asdict(await run(registry.rotate_key, name))

    @router.delete("/v1/admin/experiments/{name}", dependencies=[Depends(admin)])
    async def delete(name: str):
        await run(registry.delete, name)
        return {"deleted": name}

    @router.get("/v1/experiments/{name}/usage")
    async def usage(name: str, who: Tenant = Depends(tenant_dep)):
        if not who.admin and who.name != name:
            raise PermissionDenied(f"experiment {who.name!r} may not read experiment {name!r}")
        await run(registry.require, name)
        return {"experiment": name, "usage": await run(registry.usage, name)}

    return router
