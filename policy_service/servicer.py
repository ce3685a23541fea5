"""PolicyServicer: protobuf in, PolicyFrontend call, protobuf out. Nothing else lives here."""

from __future__ import annotations

from collections.abc import AsyncIterator

from grpc import aio

from loopserve.policy.v1 import policy_pb2 as pb
from loopserve.policy.v1 import policy_pb2_grpc
from loopserve.serving.context import client_id
from policy_service.frontend import PolicyFrontend
from policy_service.types import AnnotateCall, GenerateCall


class PolicyServicer(policy_pb2_grpc.PolicyServiceServicer):
    def __init__(self, frontend: PolicyFrontend) -> None:
        self.frontend = frontend

    async def Annotate(self, request: pb.AnnotateRequest, context: aio.ServicerContext) -> pb.AnnotateResponse:
        call = AnnotateCall.from_pb(request, self.frontend.limits, self.frontend.cfg.task)
        result = await self.frontend.annotate(call, client_id(context))
        return result.to_pb()

    async def Generate(self, request: pb.GenerateRequest, context: aio.ServicerContext) -> pb.GenerateResponse:
        call = GenerateCall.from_pb(request, self.frontend.limits)
        result = await self.frontend.generate(call, client_id(context))
        return result.to_pb()

    async def GenerateStream(
        self, request: pb.GenerateRequest, context: aio.ServicerContext
    ) -> AsyncIterator[pb.GenerateStreamResponse]:
        call = GenerateCall.from_pb(request, self.frontend.limits, stream=True)
        async for version, event_id, delta in self.frontend.generate_stream(call, client_id(context)):
            yield pb.GenerateStreamResponse(
                model_version=version,
                event_id=event_id,
                text=delta.text,
                logprob=delta.logprob,
                done=delta.done,
                finish_reason=delta.finish_reason,
                num_tokens=delta.num_tokens,
            )

    async def GetModelInfo(self, request: pb.GetModelInfoRequest, context: aio.ServicerContext) -> pb.ModelInfo:
        return self.frontend.model_info().to_pb()
