"""RewardServicer: protobuf in, RewardFrontend call, protobuf out. Nothing else lives here."""

from __future__ import annotations

from grpc import aio

from loopserve.reward.v1 import reward_pb2 as pb
from loopserve.reward.v1 import reward_pb2_grpc
from reward_service.frontend import RewardFrontend
from reward_service.types import CompareCall, ScoreCall


class RewardServicer(reward_pb2_grpc.RewardServiceServicer):
    def __init__(self, frontend: RewardFrontend) -> None:
        self.frontend = frontend

    async def Score(self, request: pb.ScoreRequest, context: aio.ServicerContext) -> pb.ScoreResponse:
        call = ScoreCall.from_pb(request, self.frontend.limits)
        result = await self.frontend.score(call)
        return result.to_pb()

    async def Compare(self, request: pb.CompareRequest, context: aio.ServicerContext) -> pb.CompareResponse:
        call = CompareCall.from_pb(request, self.frontend.limits)
        result = await self.frontend.compare(call)
        return result.to_pb()

    async def GetModelInfo(self, request: pb.GetModelInfoRequest, context: aio.ServicerContext) -> pb.ModelInfo:
        return self.frontend.model_info().to_pb()
