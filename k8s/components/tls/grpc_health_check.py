"""grpc.health.v1 check over TLS (and mTLS), for exec probes.

The kubelet's native gRPC probe speaks plaintext only, so once the policy server's port is TLS the
k8s/components/tls component replaces the native probes with this script. It asks one health service
and exits 0 when it is SERVING, 1 otherwise (NOT_SERVING, unknown service, timeout, TLS failure).

    python grpc_health_check.py --port 50051 --service loopserve.policy.v1.PolicyService

Environment (set by the component):
  LOOPSERVE_PROBE_CA           CA that signed the server certificate (PEM)
  LOOPSERVE_PROBE_SERVER_NAME  name to verify in the server certificate (default: localhost)
  LOOPSERVE_TLS_CLIENT_CA      when the server requires client certificates (mTLS), the probe
  LOOPSERVE_TLS_CERT/KEY       presents the server's own certificate, which must then allow client
                               authentication (k8s/secrets/make-secrets.sh issues it that way)
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc


def check(port: int, service: str, timeout_s: float) -> int:
    ca = Path(os.environ["LOOPSERVE_PROBE_CA"]).read_bytes()
    key = cert = None
    if os.environ.get("LOOPSERVE_TLS_CLIENT_CA"):
        key = Path(os.environ["LOOPSERVE_TLS_KEY"]).read_bytes()
        cert = Path(os.environ["LOOPSERVE_TLS_CERT"]).read_bytes()
    creds = grpc.ssl_channel_credentials(root_certificates=ca, private_key=key, certificate_chain=cert)
    name = os.environ.get("LOOPSERVE_PROBE_SERVER_NAME", "localhost")
    options = [("grpc.ssl_target_name_override", name)]
    with grpc.secure_channel(f"127.0.0.1:{port}", creds, options=options) as channel:
        try:
            reply = health_pb2_grpc.HealthStub(channel).Check(
                health_pb2.HealthCheckRequest(service=service), timeout=timeout_s
            )
        except grpc.RpcError as e:
            print(f"health check failed: {e.code().name}: {e.details()}")
            return 1
    status = health_pb2.HealthCheckResponse.ServingStatus.Name(reply.status)
    print(f"{service or '(server)'}: {status}")
    return 0 if reply.status == health_pb2.HealthCheckResponse.SERVING else 1


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--service", default="", help='health service name; "" is the whole server')
    parser.add_argument("--timeout", type=float, default=3.0)
    args = parser.parse_args()
    return check(args.port, args.service, args.timeout)


if __name__ == "__main__":
    sys.exit(main())
