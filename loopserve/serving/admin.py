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
from loopserve.errors import FailedPrecondition, InvalidArgument, NotFoundError, quote
from loopserve.models.slot import ModelSlot
from loopserve.serving.shadow_control import ShadowControl, ShadowEvidence


class ModelAdminServicer(admin_pb2_grpc.ModelAdminServicer):
    def __init__(
        self,
        slots: Mapping[str, ModelSlot],  # type: ignore[type-arg]
        shadows: Mapping[str, ShadowControl] | None = None,
    ) -> None:
        self.slots = dict(slots)
        self.shadows = dict(shadows or {})

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

    # ---- shadow mode (policy_service/shadow.py) --------------------------------------------------

    def _shadow(self, model: str) -> ShadowControl:
        slot = self._slot(model)
        shadow = self.shadows.get(slot.name)
        if shadow is None:
            raise FailedPrecondition(f"this service has no shadow mode for {slot.name}")
        return shadow

    def _shadow_status(self, shadow: ShadowControl, ev: ShadowEvidence) -> pb.ShadowStatus:
        return pb.ShadowStatus(
            model=shadow.model_name,
            candidate_version=ev.candidate,
            serving_version=self.slots[shadow.model_name].current.version,
            items=ev.items,
            dropped=ev.dropped,
            agreement=ev.agreement,
            mean_confidence=ev.mean_confidence,
            serving_mean_confidence=ev.serving_mean_confidence,
            promoted_version=ev.promoted,
            pending=ev.pending,
        )

    async def StartShadow(self, request: pb.StartShadowRequest, context: aio.ServicerContext) -> pb.ShadowStatus:
        shadow = self._shadow(request.model)
        if not request.version:
            raise InvalidArgument("version is empty; ListVersions shows the versions")
        return self._shadow_status(shadow, await shadow.start(request.version))

    async def GetShadow(self, request: pb.GetShadowRequest, context: aio.ServicerContext) -> pb.ShadowStatus:
        shadow = self._shadow(request.model)
        return self._shadow_status(shadow, shadow.status())

    async def PromoteShadow(self, request: pb.PromoteShadowRequest, context: aio.ServicerContext) -> pb.ModelStatus:
        shadow = self._shadow(request.model)
        previous, _ = await shadow.promote()
        return self._status(self.slots[shadow.model_name], previous)

    async def StopShadow(self, request: pb.StopShadowRequest, context: aio.ServicerContext) -> pb.ShadowStatus:
        shadow = self._shadow(request.model)
        return self._shadow_status(shadow, await shadow.stop())
