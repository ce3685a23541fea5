"""ModelAdmin and grpc.health.v1 as a Ray Serve deployment answers them through Ray's gRPC proxy: the
methods, named after the RPCs, that both deployments (policy_service/ray_app.py, reward_service/ray_app.py)
inherit. Kept apart from loopserve/serving/ray.py, which the CLI imports without grpc."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

from loopserve.admin.v1 import admin_pb2 as apb
from loopserve.config import ADMIN_SERVICE
from loopserve.serving.ray import ReplicaAdmin, ReplicaHealth, rpc


class AdminAndHealthMethods:
    """Mixed into a deployment that sets `admin` (ReplicaAdmin: changes only on a single replica),
    `health` (ReplicaHealth) and `tokens` (the auth table `rpc` checks; health needs no token, as on the
    embedded server, since probes carry none)."""

    admin: ReplicaAdmin
    health: ReplicaHealth
    tokens: Any

    @rpc(ADMIN_SERVICE, apb.ListVersionsResponse)
    async def ListVersions(self, request: apb.ListVersionsRequest, grpc_context: Any) -> apb.ListVersionsResponse:
        return await self.admin.servicer.ListVersions(request, grpc_context)

    @rpc(ADMIN_SERVICE, apb.ModelStatus)
    async def LoadVersion(self, request: apb.LoadVersionRequest, grpc_context: Any) -> apb.ModelStatus:
        return await self.admin.writable().LoadVersion(request, grpc_context)

    @rpc(ADMIN_SERVICE, apb.ModelStatus)
    async def Rollback(self, request: apb.RollbackRequest, grpc_context: Any) -> apb.ModelStatus:
        return await self.admin.writable().Rollback(request, grpc_context)

    @rpc(ADMIN_SERVICE, apb.ModelStatus)
    async def Pin(self, request: apb.PinRequest, grpc_context: Any) -> apb.ModelStatus:
        return await self.admin.writable().Pin(request, grpc_context)

    @rpc(ADMIN_SERVICE, apb.ModelStatus)
    async def Unpin(self, request: apb.UnpinRequest, grpc_context: Any) -> apb.ModelStatus:
        return await self.admin.writable().Unpin(request, grpc_context)

    async def Check(self, request: Any, grpc_context: Any) -> Any:
        return self.health.status()

    async def Watch(self, request: Any, grpc_context: Any) -> AsyncIterator[Any]:
        async for status in self.health.watch():
            yield status
