"""Development certificates and SuperNode keys for the loopback deployment: valid for what Flower
and Python's TLS check, reused when sound, replaced whole when not."""

from __future__ import annotations

import ipaddress
import socket
import ssl
import stat
import threading

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec
from flwr.cli.supernode.register import try_load_public_key
from flwr.supercore.primitives.asymmetric import public_key_to_bytes

from shared.paths import OutputExistsError
from simulations.operations.credentials import make_dev_certificates, make_supernode_keys


def _handshake(paths: dict, server_hostname: str) -> str:
    """A TLS handshake between the SuperLink's certificate and a client trusting only our CA."""
    server_context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    server_context.load_cert_chain(paths["server_cert"], paths["server_key"])
    client_context = ssl.create_default_context(cafile=str(paths["ca_cert"]))
    server_side, client_side = socket.socketpair()
    server_side.settimeout(10)
    client_side.settimeout(10)

    def serve() -> None:
        # The server's half fails too when the client rejects the certificate; only the client's verdict matters.
        try:
            server_context.wrap_socket(server_side, server_side=True).close()
        except (ssl.SSLError, OSError):
            server_side.close()

    server = threading.Thread(target=serve)
    server.start()
    try:
        with client_context.wrap_socket(client_side, server_hostname=server_hostname) as tls:
            return tls.version()
    finally:
        server.join(timeout=10)


def test_dev_certificates_are_ca_signed_and_valid_for_loopback(tmp_path):
    paths = make_dev_certificates(tmp_path / "tls")
    assert {path.name for path in paths.values()} == {"ca.crt", "server.pem", "server.key"}

    ca_cert = x509.load_pem_x509_certificate(paths["ca_cert"].read_bytes())
    server_cert = x509.load_pem_x509_certificate(paths["server_cert"].read_bytes())
    server_key = serialization.load_pem_private_key(paths["server_key"].read_bytes(), password=None)
    server_cert.verify_directly_issued_by(ca_cert)
    assert ca_cert.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    assert not server_cert.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    sans = server_cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert ipaddress.ip_address("127.0.0.1") in sans.get_values_for_type(x509.IPAddress)
    assert "localhost" in sans.get_values_for_type(x509.DNSName)
    assert server_key.public_key() == server_cert.public_key()
    assert stat.S_IMODE(paths["server_key"].stat().st_mode) == 0o600

    assert _handshake(paths, "127.0.0.1").startswith("TLS")
    assert _handshake(paths, "localhost").startswith("TLS")
    with pytest.raises(ssl.SSLCertVerificationError):
        _handshake(paths, "example.org")


def test_existing_certificates_are_reused_when_sound_and_replaced_only_when_asked(tmp_path):
    out_dir = tmp_path / "tls"
    out_dir.mkdir()
    (out_dir / "notes.txt").write_text("not ours")
    paths = make_dev_certificates(out_dir)
    first = {name: path.read_bytes() for name, path in paths.items()}

    assert make_dev_certificates(out_dir) == paths
    assert {name: path.read_bytes() for name, path in paths.items()} == first

    # A half-written certificate (as a crash mid-copy by hand would leave) is not replaced by
    # surprise; with overwrite it makes a fresh, whole set.
    paths["server_cert"].write_bytes(first["server_cert"][: len(first["server_cert"]) // 2])
    before = {path.name: path.read_bytes() for path in out_dir.iterdir()}
    with pytest.raises(OutputExistsError, match="ca.crt already holds a file .* pass --overwrite"):
        make_dev_certificates(out_dir)
    assert {path.name: path.read_bytes() for path in out_dir.iterdir()} == before
    make_dev_certificates(out_dir, overwrite=True)
    second = {name: path.read_bytes() for name, path in paths.items()}
    assert all(second[name] != first[name] for name in first)
    x509.load_pem_x509_certificate(second["server_cert"]).verify_directly_issued_by(
        x509.load_pem_x509_certificate(second["ca_cert"])
    )

    # Other hosts than the set covers: a new set, valid for them, when asked for.
    with pytest.raises(OutputExistsError, match="not part of a sound development set for 10.0.0.7"):
        make_dev_certificates(out_dir, hosts=("10.0.0.7", "superlink.example"))
    make_dev_certificates(out_dir, hosts=("10.0.0.7", "superlink.example"), overwrite=True)
    assert _handshake(paths, "10.0.0.7").startswith("TLS")
    assert _handshake(paths, "superlink.example").startswith("TLS")

    assert sorted(path.name for path in out_dir.iterdir()) == ["ca.crt", "notes.txt", "server.key", "server.pem"]
    with pytest.raises(ValueError, match="at least one host"):
        make_dev_certificates(out_dir, hosts=())


def test_supernode_keys_load_the_way_flower_loads_them(tmp_path):
    pairs = make_supernode_keys(tmp_path / "keys", ["supernode-0", "supernode-1"])

    for pair in pairs.values():
        # As `flower-supernode --auth-supernode-private-key` loads it.
        private = serialization.load_ssh_private_key(pair.private_key.read_bytes(), password=None)
        assert isinstance(private, ec.EllipticCurvePrivateKey)
        assert isinstance(private.curve, ec.SECP384R1)
        assert stat.S_IMODE(pair.private_key.stat().st_mode) == 0o600
        # `flwr supernode register` uses this very function on the public key file.
        assert try_load_public_key(pair.public_key) == public_key_to_bytes(private.public_key())
    assert pairs["supernode-0"].public_key.read_bytes() != pairs["supernode-1"].public_key.read_bytes()


def test_supernode_keys_are_kept_across_calls_and_a_broken_pair_is_replaced_only_when_asked(tmp_path):
    pairs = make_supernode_keys(tmp_path / "keys", ["a", "b"])
    before = {name: (pair.private_key.read_bytes(), pair.public_key.read_bytes()) for name, pair in pairs.items()}

    assert make_supernode_keys(tmp_path / "keys", ["a", "b"]) == pairs
    pairs["a"].public_key.write_text("ecdsa-sha2-nistp384 truncated")
    # The private key may be a device's only identity: never replaced by surprise, and a
    # refusal for one pair writes no other (c stays unmade).
    with pytest.raises(OutputExistsError, match="a.key already holds a file .* pass --overwrite"):
        make_supernode_keys(tmp_path / "keys", ["c", "a", "b"])
    assert pairs["a"].private_key.read_bytes() == before["a"][0]
    assert not (tmp_path / "keys" / "c.key").exists()
    make_supernode_keys(tmp_path / "keys", ["a", "b"], overwrite=True)

    assert (pairs["b"].private_key.read_bytes(), pairs["b"].public_key.read_bytes()) == before["b"]
    assert pairs["a"].private_key.read_bytes() != before["a"][0]
    private = serialization.load_ssh_private_key(pairs["a"].private_key.read_bytes(), password=None)
    assert try_load_public_key(pairs["a"].public_key) == public_key_to_bytes(private.public_key())
    assert sorted(path.name for path in (tmp_path / "keys").iterdir()) == ["a.key", "a.pub", "b.key", "b.pub"]


@pytest.mark.parametrize("names", [["a", "a"], ["../escape"], [""], ["has space"]])
def test_supernode_names_that_are_not_plain_file_names_are_rejected(tmp_path, names):
    with pytest.raises(ValueError, match="SuperNode name"):
        make_supernode_keys(tmp_path, names)
