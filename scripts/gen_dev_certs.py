"""Development TLS material: a dev CA, a gateway server certificate, per-hospital client certs.

    python scripts/gen_dev_certs.py --out .fedllm/certs [--hosts localhost 127.0.0.1]
        [--hospitals st_mary city_general northside] [--days 30]

Writes ca.pem/ca.key, server.pem/server.key and client-<id>.pem/.key (keys mode 0600). For
development and tests only: production certificates come from the hospital PKI.
"""

from __future__ import annotations

import argparse
import datetime as dt
import ipaddress
import os
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

DEFAULT_HOSPITALS = ("st_mary", "city_general", "northside")


def _key() -> ec.EllipticCurvePrivateKey:
    return ec.generate_private_key(ec.SECP256R1())


def _write_key(path: Path, key: ec.EllipticCurvePrivateKey) -> None:
    path.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    os.chmod(path, 0o600)


def _write_cert(path: Path, cert: x509.Certificate) -> None:
    path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))


def _name(cn: str, org: str = "fedllm dev") -> x509.Name:
    return x509.Name(
        [
            x509.NameAttribute(NameOID.ORGANIZATION_NAME, org),
            x509.NameAttribute(NameOID.COMMON_NAME, cn),
        ]
    )


def make_ca(
    *, days: int, cn: str = "fedllm dev CA"
) -> tuple[ec.EllipticCurvePrivateKey, x509.Certificate]:
    key = _key()
    now = dt.datetime.now(dt.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(_name(cn))
        .issuer_name(_name(cn))
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + dt.timedelta(days=days))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                key_cert_sign=True,
                crl_sign=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .sign(key, hashes.SHA256())
    )
    return key, cert


def issue(
    *,
    ca_key: ec.EllipticCurvePrivateKey,
    ca_cert: x509.Certificate,
    cn: str,
    days: int,
    server: bool,
    hosts: tuple[str, ...] = (),
) -> tuple[ec.EllipticCurvePrivateKey, x509.Certificate]:
    """A leaf certificate for a server (with SANs) or a client (CN = hospital id)."""
    key = _key()
    now = dt.datetime.now(dt.UTC)
    usage = ExtendedKeyUsageOID.SERVER_AUTH if server else ExtendedKeyUsageOID.CLIENT_AUTH
    builder = (
        x509.CertificateBuilder()
        .subject_name(_name(cn))
        .issuer_name(ca_cert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + dt.timedelta(days=days))
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.ExtendedKeyUsage([usage]), critical=False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()), critical=False
        )
    )
    if hosts:
        sans: list[x509.GeneralName] = []
        for h in hosts:
            try:
                sans.append(x509.IPAddress(ipaddress.ip_address(h)))
            except ValueError:
                sans.append(x509.DNSName(h))
        builder = builder.add_extension(x509.SubjectAlternativeName(sans), critical=False)
    return key, builder.sign(ca_key, hashes.SHA256())


def generate(
    out: Path,
    *,
    hosts: tuple[str, ...] = ("localhost", "127.0.0.1"),
    hospitals: tuple[str, ...] = DEFAULT_HOSPITALS,
    days: int = 30,
) -> dict[str, Path]:
    """Write the whole set under `out`; returns the paths by role."""
    out.mkdir(parents=True, exist_ok=True)
    ca_key, ca_cert = make_ca(days=days)
    _write_key(out / "ca.key", ca_key)
    _write_cert(out / "ca.pem", ca_cert)
    paths = {"ca": out / "ca.pem", "ca_key": out / "ca.key"}
    key, cert = issue(
        ca_key=ca_key, ca_cert=ca_cert, cn=hosts[0], days=days, server=True, hosts=hosts
    )
    _write_key(out / "server.key", key)
    _write_cert(out / "server.pem", cert)
    paths.update(server=out / "server.pem", server_key=out / "server.key")
    for h in hospitals:
        key, cert = issue(ca_key=ca_key, ca_cert=ca_cert, cn=h, days=days, server=False)
        _write_key(out / f"client-{h}.key", key)
        _write_cert(out / f"client-{h}.pem", cert)
        paths[f"client-{h}"] = out / f"client-{h}.pem"
        paths[f"client-{h}-key"] = out / f"client-{h}.key"
    return paths


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path(".fedllm/certs"))
    parser.add_argument("--hosts", nargs="+", default=["localhost", "127.0.0.1"])
    parser.add_argument("--hospitals", nargs="+", default=list(DEFAULT_HOSPITALS))
    parser.add_argument("--days", type=int, default=30)
    args = parser.parse_args(argv)
    paths = generate(
        args.out, hosts=tuple(args.hosts), hospitals=tuple(args.hospitals), days=args.days
    )
    for role, path in sorted(paths.items()):
        print(f"{role}: {path}")  # noqa: T201 - a developer script, not a service
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
