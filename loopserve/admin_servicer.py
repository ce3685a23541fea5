"""ModelAdmin: list, load, roll back, pin and unpin the versions of a service's model slots.

The same servicer runs in both services over their slots; the admin role is enforced by the auth
interceptor. Loads run on a thread beside serving, so requests keep flowing during a swap.
"""

from __future__ import annotations

import asyncio
from collections.abc import Mapping

from grpc import aio

from loopserve.admin.v1 import admin_pb2 as pb
from loopserve.admin.v1 import admin_pb2_grpc
from loopserve.errors import InvalidArgument, NotFoundError
from loopserve.model_slot import ModelSlot


class ModelAdminServicer(admin_pb2_grpc.ModelAdminServicer):
    def __init__(self, slots: Mapping[str, ModelSlot]) -> None:  # type: ignore[type-arg]
        self.slots = dict(slots)

    def _slot(self, model: str) -> ModelSlot:  # type: ignore[type-arg]
        if not model and len(self.slots) == 1:
            return next(iter(self.slots.values()))
        if not model:
            raise InvalidArgument(f"model is empty; this service serves {', '.join(sorted(self.slots))}")
        if model not in self.slots:
            raise NotFoundError(f"unknown model {model!r}; this service serves {', '.join(sorted(self.slots))}")
        return self.slots[model]

    @staticmethod
    def _status(slot: ModelSlot, previous: str = "") -> pb.ModelStatus:  # type: ignore[type-arg]
        return pb.ModelStatus(
            model=slot.name,
            model_version=slot.current.version,
            previous_version=previous,
            pinned_version=slot.pinned or "",
        )

    async def ListVersions(self, request: pb.ListVersionsRequest, context: aio.ServicerContext) -> pb.ListVersionsResponse:
        slot = self._slot(request.model)
        store = slot.store
        serving = slot.current.version
        latest = store.latest(slot.name)
        versions = []
        for v in await asyncio.to_thread(store.list, slot.name):
            m = store.get(slot.name, v)
            versions.append(
                pb.VersionInfo(
                    version=v,
                    parent=m.parent or "",
                    created=m.created,
                    serving=v == serving,
                    pinned=v == slot.pinned,
                    latest=v == latest,
                    metrics=m.metrics,
                )
            )
        return pb.ListVersionsResponse(model=slot.name, serving_version=serving, versions=versions)

    async def LoadVersion(self, request: pb.LoadVersionRequest, context: aio.ServicerContext) -> pb.ModelStatus:
        slot = self._slot(request.model)
        if not request.version:
            raise InvalidArgument("version is empty; ListVersions shows the versions")
        previous = slot.current.version
        await asyncio.to_thread(slot.load_version, request.version)
        if slot.pinned is not None:
            slot.pin(request.version)  # an explicit push moves an existing pin with it
        return self._status(slot, previous)

    async def Rollback(self, request: pb.RollbackRequest, context: aio.ServicerContext) -> pb.ModelStatus:
        slot = self._slot(request.model)
        previous = slot.current.version
        await asyncio.to_thread(slot.rollback)
        return self._status(slot, previous)

    async def Pin(self, request: pb.PinRequest, context: aio.ServicerContext) -> pb.ModelStatus:
        slot = self._slot(request.model)
        previous = slot.current.version
        await asyncio.to_thread(slot.pin, request.version or None)
        return self._status(slot, previous)

    async def Unpin(self, request: pb.UnpinRequest, context: aio.ServicerContext) -> pb.ModelStatus:
        slot = self._slot(request.model)
        slot.unpin()
        return self._status(slot, slot.current.version)
