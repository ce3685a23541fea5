"""TLS and mTLS on the real grpc.aio server (service tier): a policy service on loopback with a throwaway
CA, server and client certificates made at test time.

What a user would notice: a client that trusts the CA gets answers (by IP and by name); a plaintext
client, or one that trusts another CA, fails fast with UNAVAILABLE instead of hanging; with client
certificates required, a client without one (or with one from another CA) is refused and one with a
certificate from the configured CA is served; grpc.health.v1 answers over TLS and mTLS.
"""

from __future__ import annotations

import asyncio
import datetime
import ipaddress
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

import grpc
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID
from grpc import aio
from grpc_health.v1 import health_pb2, health_pb2_grpc

from loopserve.client import AsyncClient, RetryPolicy, wait_until_serving
from loopserve.config import POLICY_SERVICE
from tests.support.policy_harness import Running, policy_config, start_policy

NO_RETRY = RetryPolicy(attempts=1)
DEADLINE_S = 10.0  # a refused connection must end as UNAVAILABLE well before this, never hang


# ---- a throwaway PKI ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class KeyPair:
    key: bytes  # PEM private key
    cert: bytes  # PEM certificate


def _pem_key(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )


def _name(cn: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)])


def _builder(cn: str, issuer: x509.Name, key: ec.EllipticCurvePrivateKey) -> x509.CertificateBuilder:
    """Subject, issuer, key, serial and a validity of a day (from five minutes ago: clock skew)."""
    now = datetime.datetime.now(datetime.UTC)
    return (
        x509.CertificateBuilder()
        .subject_name(_name(cn))
        .issuer_name(issuer)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
    )


def make_ca(cn: str) -> tuple[KeyPair, ec.EllipticCurvePrivateKey, x509.Certificate]:
    key = ec.generate_private_key(ec.SECP256R1())
    cert = (
        _builder(cn, _name(cn), key)
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=True,
                crl_sign=True,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .sign(key, hashes.SHA256())
    )
    return KeyPair(_pem_key(key), cert.public_bytes(serialization.Encoding.PEM)), key, cert


def issue(ca_key: ec.EllipticCurvePrivateKey, ca_cert: x509.Certificate, cn: str, *, server: bool) -> KeyPair:
    key = ec.generate_private_key(ec.SECP256R1())
    builder = (
        _builder(cn, ca_cert.subject, key)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(
            x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH if server else ExtendedKeyUsageOID.CLIENT_AUTH]),
            critical=False,
        )
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()),
            critical=False,
        )
    )
    if server:
        builder = builder.add_extension(
            x509.SubjectAlternativeName(
                [x509.DNSName("localhost"), x509.IPAddress(ipaddress.IPv4Address("127.0.0.1"))]
            ),
            critical=False,
        )
    cert = builder.sign(ca_key, hashes.SHA256())
    return KeyPair(_pem_key(key), cert.public_bytes(serialization.Encoding.PEM))


@dataclass(frozen=True)
class Pki:
    ca: bytes  # PEM: the CA that signed the server and the good client
    server: KeyPair
    client: KeyPair
    other_ca: bytes  # PEM: a CA the server knows nothing about
    stranger: KeyPair  # a client certificate signed by other_ca
    dir: Path  # the server's files: server.key, server.crt, ca.crt


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    ca, ca_key, ca_cert = make_ca("loopserve test CA")
    other, other_key, other_cert = make_ca("some other CA")
    server = issue(ca_key, ca_cert, "loopserve policy", server=True)
    d = tmp_path_factory.mktemp("pki")
    (d / "server.key").write_bytes(server.key)
    (d / "server.crt").write_bytes(server.cert)
    (d / "ca.crt").write_bytes(ca.cert)
    return Pki(
        ca=ca.cert,
        server=server,
        client=issue(ca_key, ca_cert, "loopserve client", server=False),
        other_ca=other.cert,
        stranger=issue(other_key, other_cert, "stranger", server=False),
        dir=d,
    )


# ---- servers ------------------------------------------------------------------------------------------


def _client(svc: Running, **kw: object) -> AsyncClient:
    return svc.client(timeout_s=DEADLINE_S, **kw)  # type: ignore[arg-type]


async def _start(data_dir: Path, pki: Pki, *, mtls: bool) -> Running:
    cfg = policy_config(
        data_dir,
        generator=False,  # the transport is under test, not the models
        tls_cert=pki.dir / "server.crt",
        tls_key=pki.dir / "server.key",
        tls_client_ca=pki.dir / "ca.crt" if mtls else None,
    )
    return await start_policy(cfg)


@pytest.fixture
async def tls_svc(tiny_data_dir: Path, pki: Pki) -> AsyncIterator[Running]:
    running = await _start(tiny_data_dir, pki, mtls=False)
    yield running
    await running.app.stop(0)


@pytest.fixture
async def mtls_svc(tiny_data_dir: Path, pki: Pki) -> AsyncIterator[Running]:
    running = await _start(tiny_data_dir, pki, mtls=True)
    yield running
    await running.app.stop(0)


async def _refused(client: AsyncClient) -> aio.AioRpcError:
    async with client as c:
        with pytest.raises(aio.AioRpcError) as e:
            await c.annotate(["should not be served"], timeout_s=DEADLINE_S)
    return e.value


async def _health(target: str, creds: grpc.ChannelCredentials, service: str) -> int:
    async with aio.secure_channel(target, creds) as ch:
        r = await health_pb2_grpc.HealthStub(ch).Check(
            health_pb2.HealthCheckRequest(service=service), timeout=DEADLINE_S
        )
        return r.status


# ---- TLS (server authentication only) -----------------------------------------------------------------


async def test_a_client_that_trusts_the_ca_is_served_by_ip_and_by_name(tls_svc: Running, pki: Pki) -> None:
    async with _client(tls_svc, root_certificates=pki.ca) as c:
        r = await c.annotate(["lovely tea", "stale coffee"])
        assert r.model_version == "v0" and [a.item_id for a in r.annotations] == ["0", "1"]
        assert (await c.model_info()).annotator_version == "v0"
    # The certificate names localhost too (a DNS SAN), not only 127.0.0.1.
    async with _client(tls_svc, target=f"localhost:{tls_svc.port}", root_certificates=pki.ca) as c:
        assert (await c.annotate(["by name"])).annotations


async def test_a_plaintext_client_fails_fast_with_unavailable(tls_svc: Running) -> None:
    err = await _refused(_client(tls_svc))  # no root certificates: an insecure channel
    assert err.code() == grpc.StatusCode.UNAVAILABLE, err.details()


async def test_a_client_that_trusts_another_ca_is_refused(tls_svc: Running, pki: Pki) -> None:
    err = await _refused(_client(tls_svc, root_certificates=pki.other_ca))
    assert err.code() == grpc.StatusCode.UNAVAILABLE, err.details()
    # ...and the server still serves a client that does trust it.
    async with _client(tls_svc, root_certificates=pki.ca) as c:
        assert (await c.annotate(["after the refusal"])).annotations


async def test_health_answers_over_tls(tls_svc: Running, pki: Pki) -> None:
    creds = grpc.ssl_channel_credentials(pki.ca)
    for service in ("", POLICY_SERVICE):
        assert await _health(tls_svc.target, creds, service) == health_pb2.HealthCheckResponse.SERVING


# ---- mTLS (client certificates required) --------------------------------------------------------------


async def test_mtls_serves_a_client_with_a_certificate_from_the_ca(mtls_svc: Running, pki: Pki) -> None:
    async with _client(
        mtls_svc, root_certificates=pki.ca, private_key=pki.client.key, certificate_chain=pki.client.cert
    ) as c:
        r = await c.annotate(["with a client certificate"])
        assert r.model_version == "v0" and len(r.annotations) == 1


async def test_mtls_refuses_a_client_without_a_certificate(mtls_svc: Running, pki: Pki) -> None:
    err = await _refused(_client(mtls_svc, root_certificates=pki.ca))
    assert err.code() == grpc.StatusCode.UNAVAILABLE, err.details()


async def test_mtls_refuses_a_client_certificate_from_another_ca(mtls_svc: Running, pki: Pki) -> None:
    err = await _refused(
        _client(mtls_svc, root_certificates=pki.ca, private_key=pki.stranger.key, certificate_chain=pki.stranger.cert)
    )
    assert err.code() == grpc.StatusCode.UNAVAILABLE, err.details()
    async with _client(
        mtls_svc, root_certificates=pki.ca, private_key=pki.client.key, certificate_chain=pki.client.cert
    ) as c:
        assert (await c.annotate(["after the refusals"])).annotations


async def test_mtls_refuses_a_plaintext_client(mtls_svc: Running) -> None:
    err = await _refused(_client(mtls_svc))
    assert err.code() == grpc.StatusCode.UNAVAILABLE, err.details()


async def test_health_answers_over_mtls_with_a_client_certificate(mtls_svc: Running, pki: Pki) -> None:
    creds = grpc.ssl_channel_credentials(pki.ca, pki.client.key, pki.client.cert)
    for service in ("", POLICY_SERVICE):
        assert await _health(mtls_svc.target, creds, service) == health_pb2.HealthCheckResponse.SERVING


async def test_readiness_waits_work_over_tls_and_mtls(tls_svc: Running, mtls_svc: Running, pki: Pki) -> None:
    """`wait_until_serving` (what the CLI, the demo and the benchmarks wait on) speaks TLS when told to."""
    await asyncio.to_thread(wait_until_serving, tls_svc.target, 30, root_certificates=pki.ca)
    await asyncio.to_thread(
        wait_until_serving,
        mtls_svc.target,
        30,
        root_certificates=pki.ca,
        private_key=pki.client.key,
        certificate_chain=pki.client.cert,
    )
    with pytest.raises(TimeoutError):  # plaintext against TLS never becomes ready: refused, not hung
        await asyncio.to_thread(wait_until_serving, tls_svc.target, 2)
