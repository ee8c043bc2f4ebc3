"""Files meshvm reads are refused in one line when they are wrong: a key given twice, a CA that is not a valid
certificate. Each case: exit 2, the file and what is wrong named, nothing else printed."""

from __future__ import annotations

import datetime as dt
import subprocess
from pathlib import Path

import pytest
import yaml
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from meshvm import pki

AGENT = """node: vm1
address: 198.51.100.11
services:
  - name: web
    port: 8080
    mesh_port: 21000
"""


def run(*argv: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(argv, capture_output=True, text=True, check=False, timeout=60)


@pytest.mark.parametrize(
    ("command", "text", "key"),
    [
        ("validate", AGENT + "node: vm2\n", "node"),
        ("validate", AGENT.replace("    port: 8080\n", "    port: 8080\n    port: 8081\n"), "port"),
        ("policy", "version: 1\nauthorization:\n  default_action: allow\n  default_action: deny\n", "default_action"),
    ],
)
def test_a_key_given_twice_is_refused_with_its_line(
    meshvm_cli: str, tmp_path: Path, command: str, text: str, key: str
) -> None:
    path = tmp_path / "file.yaml"
    path.write_text(text)
    argv = (
        [meshvm_cli, "validate", "-c", str(path)]
        if command == "validate"
        else [meshvm_cli, "policy", "validate", "-f", str(path)]
    )
    done = run(*argv)
    assert done.returncode == 2, done.stdout + done.stderr
    assert f"duplicate key {key!r}" in done.stderr
    assert "line" in done.stderr
    assert len(done.stderr.strip().splitlines()) == 1
    assert yaml.safe_load(text), "plain PyYAML would have taken it (the last value wins)"


def test_bootstrap_file_refuses_duplicate_keys(tmp_path: Path) -> None:
    from meshvm import bootstrap
    from meshvm.errors import ConfigError

    path = tmp_path / "bootstrap.yml"
    path.write_text("datacenter: a\ndatacenter: b\nretry_join: [x:1]\ngossip_key: k\nacl_token: t\n")
    with pytest.raises(ConfigError, match="duplicate key 'datacenter'"):
        bootstrap.from_file(path)


def _certificate(tmp_path: Path, *, days: int) -> Path:
    key = ec.generate_private_key(ec.SECP256R1())
    now = dt.datetime.now(dt.UTC)
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "test root")])
    start = now - dt.timedelta(days=10)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(start)
        .not_valid_after(now + dt.timedelta(days=days))
        .sign(key, hashes.SHA256())
    )
    path = tmp_path / f"ca-{days}.pem"
    path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    return path


@pytest.mark.parametrize(
    ("content", "fragment"),
    [("expired", "expired on"), ("garbage", "not a PEM certificate"), ("missing", "No such file")],
)
def test_validate_refuses_a_bad_ca_file(meshvm_cli: str, tmp_path: Path, content: str, fragment: str) -> None:
    ca = tmp_path / "ca.pem"
    if content == "expired":
        ca = _certificate(tmp_path, days=-1)
    elif content == "garbage":
        ca.write_text("-----BEGIN CERTIFICATE-----\nnot base64\n-----END CERTIFICATE-----\n")
    config = tmp_path / "agent.yaml"
    config.write_text(AGENT + f"consul:\n  ca_file: {ca}\n")
    done = run(meshvm_cli, "validate", "-c", str(config))
    assert done.returncode == 2, done.stdout + done.stderr
    assert "consul.ca_file" in done.stderr
    assert fragment in done.stderr
    assert len(done.stderr.strip().splitlines()) == 1


def test_validate_accepts_a_current_ca(meshvm_cli: str, tmp_path: Path) -> None:
    config = tmp_path / "agent.yaml"
    config.write_text(AGENT + f"consul:\n  ca_file: {_certificate(tmp_path, days=30)}\n")
    done = run(meshvm_cli, "validate", "-c", str(config))
    assert done.returncode == 0, done.stderr
    assert len(pki.check_certificates(_certificate(tmp_path, days=5), "x")) == 1
