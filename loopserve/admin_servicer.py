"""ModelAdmin: list, load, roll back, pin and unpin the versions of a service's model slots.

The same servicer runs in both services over their slots; the admin role is enforced by the auth
interceptor, and domain errors become status codes there (an unknown version is NOT_FOUND, a version
that fails verification FAILED_PRECONDITION with the reason). Every operation that changes a slot runs
on that slot's loader thread, in arrival order, so requests keep flowing during a swap and a Pin can
never interleave with a load.
"""

from __future__ import annotations

from collections.abc import Mapping

from grpc import aio

from loopserve.admin.v1 import admin_pb2 as pb
from loopserve.admin.v1 import admin_pb2_grpc
from loopserve.errors import InvalidArgument, NotFoundError, quote
from loopserve.model_slot import ModelSlot


class ModelAdminServicer(admin_pb2_grpc.ModelAdminServicer):
    def __init__(self, slots: Mapping[str, ModelSlot]) -> None:  # type: ignore[type-arg]
        self.slots = dict(slots)

    def _slot(self, model: str) -> ModelSlot:  # type: ignore[type-arg]
        if not model and len(self.slots) == 1:
            return next(iter(self.slots.values()))
        served = ", ".join(sorted(self.slots))
        if not model:
            raise InvalidArgument(f"model is empty; this service serves {served}")
        if model not in self.slots:
            raise NotFoundError(f"unknown model {quote(model)}; this service serves {served}")
        return self.slots[model]

    @staticmethod
    def _status(slot: ModelSlot, previous: str) -> pb.ModelStatus:  # type: ignore[type-arg]
        return pb.ModelStatus(
            model=slot.name,
            model_version=slot.current.version,
            previous_version=previous,
            pinned_version=slot.pinned or "",
        )

    async def ListVersions(
        self, request: pb.ListVersionsRequest, context: aio.ServicerContext
    ) -> pb.ListVersionsResponse:
        slot = self._slot(request.model)
        serving = slot.current.version

        def read() -> list[pb.VersionInfo]:
            store = slot.store
            latest = store.latest(slot.name)
            out = []
            for v in store.list(slot.name):
                try:
                    m = store.get(slot.name, v)
                except NotFoundError:  # pruned while we listed
                    continue
                out.append(
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
            return out

        versions = await slot.call(read)
        return pb.ListVersionsResponse(model=slot.name, serving_version=serving, versions=versions)

    async def LoadVersion(self, request: pb.LoadVersionRequest, context: aio.ServicerContext) -> pb.ModelStatus:
        slot = self._slot(request.model)
        if not request.version:
            raise InvalidArgument("version is empty; ListVersions shows the versions")
        previous = slot.current.version

        def load() -> None:
            slot.load_version(request.version)
            if slot.pinned is not None:
                slot.pin(request.version)  # an explicit push moves an existing pin with it

        await slot.call(load)
        return self._status(slot, previous)

    async def Rollback(self, request: pb.RollbackRequest, context: aio.ServicerContext) -> pb.ModelStatus:
        slot = self._slot(request.model)
        previous = slot.current.version
        await slot.call(slot.rollback)
        return self._status(slot, previous)

    async def Pin(self, request: pb.PinRequest, context: aio.ServicerContext) -> pb.ModelStatus:
        slot = self._slot(request.model)
        previous = slot.current.version
        await slot.call(slot.pin, request.version or None)
        return self._status(slot, previous)

    async def Unpin(self, request: pb.UnpinRequest, context: aio.ServicerContext) -> pb.ModelStatus:
        slot = self._slot(request.model)
        previous = slot.current.version
        await slot.call(slot.unpin)
        return self._status(slot, previous)
