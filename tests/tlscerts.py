"""Throw-away TLS material for tests, made with the `openssl` CLI: a CA and a server
certificate for `sessionstore`, `localhost` and 127.0.0.1, valid for one day.

Keys only ever live in a test's work directory; none is committed.
"""

from __future__ import annotations

import subprocess
from dataclasses import dataclass
from pathlib import Path

import yaml

SDS_TEMPLATE = Path(__file__).resolve().parent.parent / "envoy/tls/sds.yaml"
SAN = "subjectAltName=DNS:sessionstore,DNS:localhost,IP:127.0.0.1\nextendedKeyUsage=serverAuth\n"


@dataclass
class Certs:
    dir: Path
    ca: Path
    cert: Path
    key: Path


def _openssl(*args: str, cwd: Path) -> None:
    result = subprocess.run(["openssl", *args], cwd=cwd, capture_output=True, text=True,
                            timeout=60)
    if result.returncode != 0:
        raise RuntimeError(f"openssl {' '.join(args)}: {result.stderr}")


def make_certs(workdir: Path) -> Certs:
    """CA + server certificate (ECDSA P-256) under workdir/tls, named as in a
    Kubernetes `kubernetes.io/tls` Secret (tls.crt, tls.key)."""
    d = workdir / "tls"
    d.mkdir(exist_ok=True)
    ec = ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256", "-nodes"]
    _openssl("req", "-x509", *ec, "-days", "1", "-subj", "/CN=sessionguard test CA",
             "-keyout", "ca.key", "-out", "ca.crt", cwd=d)
    _openssl("req", *ec, "-subj", "/CN=sessionstore", "-keyout", "tls.key", "-out", "tls.csr",
             cwd=d)
    (d / "san.ext").write_text(SAN)
    _openssl("x509", "-req", "-in", "tls.csr", "-CA", "ca.crt", "-CAkey", "ca.key",
             "-CAcreateserial", "-days", "1", "-extfile", "san.ext", "-out", "tls.crt", cwd=d)
    return Certs(d, d / "ca.crt", d / "tls.crt", d / "tls.key")


def downstream_tls_contexts(config: dict):
    """Every DownstreamTlsContext (dicts, mutable in place) of an Envoy config's listeners."""
    for listener in config.get("static_resources", {}).get("listeners", []):
        for chain in listener.get("filter_chains", []):
            ts = chain.get("transport_socket", {}).get("typed_config", {})
            if ts.get("@type", "").endswith("DownstreamTlsContext"):
                yield ts


def sds_file(certs: Certs, template: Path = SDS_TEMPLATE) -> Path:
    """The shipped SDS file (envoy/tls/sds.yaml) with its file names pointed at `certs`,
    written into `certs.dir` as sds.yaml."""
    sds = yaml.safe_load(template.read_text())
    for secret in sds["resources"]:
        tls = secret["tls_certificate"]
        tls["certificate_chain"] = {"filename": str(certs.cert)}
        tls["private_key"] = {"filename": str(certs.key)}
    path = certs.dir / "sds.yaml"
    tmp = certs.dir / ".sds.yaml.tmp"
    tmp.write_text(yaml.safe_dump(sds))
    tmp.rename(path)
    return path


def localize_tls(config: dict, certs: Certs) -> dict:
    """Points every listener certificate of a shipped config at `certs`: inline
    `tls_certificates`, or SDS files (`path_config_source`), for which it writes the
    SDS file into `certs.dir`."""
    for ctx in downstream_tls_contexts(config):
        common = ctx["common_tls_context"]
        for c in common.get("tls_certificates", []):
            c["certificate_chain"] = {"filename": str(certs.cert)}
            c["private_key"] = {"filename": str(certs.key)}
        for sds in common.get("tls_certificate_sds_secret_configs", []):
            source = sds["sds_config"]["path_config_source"]
            source["path"] = str(sds_file(certs))
            if "watched_directory" in source:
                source["watched_directory"] = {"path": str(certs.dir)}
    return config
