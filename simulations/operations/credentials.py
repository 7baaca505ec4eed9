"""Development credentials for a Flower deployment: a CA and a SuperLink server certificate
for TLS, and SuperNode authentication key pairs (EC on a NIST curve, OpenSSH format, the way
`flwr supernode register` and `flower-supernode --auth-supernode-private-key` read them).

Operator tooling (`nextquill certs`, `nextquill keys`, the loopback deployment): not part of
the app bundle. The certificates are for development and tests only (`make_dev_certificates`).
"""

from __future__ import annotations

import datetime as dt
import ipaddress
import os
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.exceptions import InvalidSignature, UnsupportedAlgorithm
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from shared.paths import atomic_write_bytes, refuse_to_replace

# Certificates older than this are rejected by a peer whose clock runs a little behind.
_CLOCK_SKEW = dt.timedelta(minutes=5)
# A certificate set that expires sooner than this is made anew instead of reused.
_RENEW_MARGIN = dt.timedelta(days=1)
_NIST_CURVES = (ec.SECP256R1, ec.SECP384R1, ec.SECP521R1)
_NODE_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]*")

def make_dev_certificates(
    out_dir: Path, hosts: Sequence[str] = ("127.0.0.1", "localhost"), *, valid_days: int = 365,
    overwrite: bool = False,
) -> dict[str, Path]:
    """A self-signed CA and a SuperLink server certificate/key signed by it, with a subject
    alternative name for each of `hosts` (IP addresses or DNS names).

    DEVELOPMENT AND TESTS ONLY: the CA is trusted by nothing but the files returned here, and
    its private key is discarded after signing, so it cannot mint further certificates. A real
    deployment uses certificates from the operator's own CA.

    Returns `{"ca_cert": ca.crt, "server_cert": server.pem, "server_key": server.key}` in
    `out_dir`, the names Flower's guides use (`--ssl-ca-certfile`, `--ssl-certfile`,
    `--ssl-keyfile`; `ca.crt` is also the SuperNodes' and the CLI's `root-certificates`).
    A set already in `out_dir` is reused when it is complete, consistent, covers `hosts` and
    is not about to expire. Otherwise all three files are written anew, each atomically (the
    key mode 0600); where one of them exists already (half-written, expired, other hosts, or
    the operator's own) only when `overwrite`, so that nothing is replaced by surprise.
    """
    if not hosts:
        raise ValueError("make_dev_certificates needs at least one host")
    out_dir = Path(out_dir)
    paths = {
        "ca_cert": out_dir / "ca.crt",
        "server_cert": out_dir / "server.pem",
        "server_key": out_dir / "server.key",
    }
    if _certificates_reusable(paths, hosts):
        return paths
    for path in paths.values():
        refuse_to_replace(path, overwrite, why=f"that is not part of a sound development set for {', '.join(hosts)}")

    now = dt.datetime.now(dt.UTC)
    not_after = now + dt.timedelta(days=valid_days)
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "NextQuill-Fed development CA")])
    ca_key_id = x509.SubjectKeyIdentifier.from_public_key(ca_key.public_key())
    ca_cert = (
        x509.CertificateBuilder()
        .subject_name(ca_name)
        .issuer_name(ca_name)
        .public_key(ca_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - _CLOCK_SKEW)
        .not_valid_after(not_after)
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(_key_usage(key_cert_sign=True), critical=True)
        .add_extension(ca_key_id, critical=False)
        .sign(ca_key, hashes.SHA256())
    )
    server_key = ec.generate_private_key(ec.SECP256R1())
    # Key identifiers on both certificates: Python 3.13+ verifies with X509 strict mode,
    # which rejects a chain without them.
    server_cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, hosts[0])]))
        .issuer_name(ca_name)
        .public_key(server_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - _CLOCK_SKEW)
        .not_valid_after(not_after)
        .add_extension(x509.SubjectAlternativeName(_general_names(hosts)), critical=False)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(_key_usage(digital_signature=True), critical=True)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(server_key.public_key()), critical=False)
        .add_extension(x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(ca_key_id), critical=False)
        .sign(ca_key, hashes.SHA256())
    )
    _write_private(
        paths["server_key"],
        server_key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
        ),
    )
    _write_public(paths["server_cert"], server_cert.public_bytes(serialization.Encoding.PEM))
    _write_public(paths["ca_cert"], ca_cert.public_bytes(serialization.Encoding.PEM))
    return paths


@dataclass(frozen=True)
class SuperNodeKeys:
    """One SuperNode's authentication key pair (EC P-384, OpenSSH format, as flwr 1.41 loads it)."""

    private_key: Path  # `flower-supernode --auth-supernode-private-key`; mode 0600
    public_key: Path  # `flwr supernode register <public_key> <connection>`


def make_supernode_keys(out_dir: Path, names: Sequence[str], overwrite: bool = False) -> dict[str, SuperNodeKeys]:
    """An authentication key pair per SuperNode name: `<name>.key` and `<name>.pub` in `out_dir`,
    unencrypted, of the kind `ssh-keygen -t ecdsa -b 384 -N ""` makes in Flower's guide.

    A pair already there is reused when both files load and belong together, so a SuperNode
    keeps its identity across sessions; otherwise it is made anew, each file written atomically,
    replacing an existing file (half a pair, another kind of key) only when `overwrite`: a
    private key is an identity that nothing can restore.
    """
    if len(set(names)) != len(names):
        raise ValueError(f"SuperNode names must be distinct, got {list(names)}")
    for name in names:
        if not _NODE_NAME.fullmatch(name):
            raise ValueError(f"SuperNode name {name!r} must be letters, digits, '_', '.' or '-'")
    out_dir = Path(out_dir)
    pairs = {name: SuperNodeKeys(private_key=out_dir / f"{name}.key", public_key=out_dir / f"{name}.pub")
             for name in names}
    fresh = [name for name, pair in pairs.items() if not _keys_reusable(pair)]
    for name in fresh:  # every refusal before any key is written
        for path in (pairs[name].private_key, pairs[name].public_key):
            refuse_to_replace(path, overwrite, why="that is not part of a matching SuperNode key pair")
    for name in fresh:
        key = ec.generate_private_key(ec.SECP384R1())
        _write_private(
            pairs[name].private_key,
            key.private_bytes(
                serialization.Encoding.PEM, serialization.PrivateFormat.OpenSSH, serialization.NoEncryption()
            ),
        )
        public = key.public_key().public_bytes(serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH)
        _write_public(pairs[name].public_key, public + f" {name}\n".encode())
    return pairs


def _key_usage(*, digital_signature: bool = False, key_cert_sign: bool = False) -> x509.KeyUsage:
    return x509.KeyUsage(
        digital_signature=digital_signature,
        content_commitment=False,
        key_encipherment=False,
        data_encipherment=False,
        key_agreement=False,
        key_cert_sign=key_cert_sign,
        crl_sign=key_cert_sign,
        encipher_only=False,
        decipher_only=False,
    )


def _general_names(hosts: Sequence[str]) -> list[x509.GeneralName]:
    names: list[x509.GeneralName] = []
    for host in hosts:
        try:
            names.append(x509.IPAddress(ipaddress.ip_address(host)))
        except ValueError:
            names.append(x509.DNSName(host))
    return names


def _certificates_reusable(paths: Mapping[str, Path], hosts: Sequence[str]) -> bool:
    try:
        ca_cert = x509.load_pem_x509_certificate(paths["ca_cert"].read_bytes())
        server_cert = x509.load_pem_x509_certificate(paths["server_cert"].read_bytes())
        server_key = serialization.load_pem_private_key(paths["server_key"].read_bytes(), password=None)
        server_cert.verify_directly_issued_by(ca_cert)
        sans = server_cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except (OSError, ValueError, TypeError, InvalidSignature, UnsupportedAlgorithm, x509.ExtensionNotFound):
        return False
    now = dt.datetime.now(dt.UTC)
    return (
        _public_bytes(server_key.public_key()) == _public_bytes(server_cert.public_key())
        and all(name in sans for name in _general_names(hosts))
        and all(cert.not_valid_after_utc > now + _RENEW_MARGIN for cert in (ca_cert, server_cert))
    )


def _keys_reusable(pair: SuperNodeKeys) -> bool:
    try:
        private = serialization.load_ssh_private_key(pair.private_key.read_bytes(), password=None)
        public = serialization.load_ssh_public_key(pair.public_key.read_bytes())
    except (OSError, ValueError, TypeError, UnsupportedAlgorithm):  # TypeError: a passphrase-protected key
        return False
    return (
        isinstance(private, ec.EllipticCurvePrivateKey)
        and isinstance(private.curve, _NIST_CURVES)
        and _public_bytes(private.public_key()) == _public_bytes(public)
    )


def _public_bytes(key: object) -> bytes:
    return key.public_bytes(  # type: ignore[attr-defined]
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )


def _write_private(path: Path, payload: bytes) -> None:
    # `atomic_write_bytes` stages in a mkstemp file, created 0600, so the key is never readable by
    # others, not even before the rename; the chmod states the final mode instead of relying on that.
    atomic_write_bytes(path, payload)
    os.chmod(path, 0o600)


def _write_public(path: Path, payload: bytes) -> None:
    atomic_write_bytes(path, payload)
    os.chmod(path, 0o644)
