"""A throwaway PostgreSQL cluster from the Postgres binaries on this machine (initdb + pg_ctl).

Used by the tests and by ``pgproxy demo``. Binaries are found on PATH or under
``/usr/lib/postgresql/*/bin`` (Debian's layout). initdb refuses to run as root, so as root the
cluster runs as the ``postgres`` system user when there is one, else as ``nobody``.

The cluster listens on 127.0.0.1 only, with TLS (a self-signed certificate made here), and a
pg_hba that exercises every upstream authentication method pgproxy supports: role ``trust_user``
trusts, ``password_user`` uses cleartext, ``md5_user`` md5, everything else SCRAM-SHA-256.
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import os
import pwd
import shutil
import socket
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

SUPERUSER = "postgres"
SUPERUSER_PASSWORD = "pgproxy-test-superuser"
AUTH_ROLES = {"trust_user": "trust", "password_user": "password", "md5_user": "md5"}
AUTH_ROLE_PASSWORD = "auth-role-pw"


class ClusterUnavailable(RuntimeError):
    """No usable Postgres binaries here."""


def find_bindir() -> Path:
    found = shutil.which("initdb")
    if found and shutil.which("pg_ctl"):
        return Path(os.path.realpath(found)).parent
    candidates = sorted(
        Path("/usr/lib/postgresql").glob("*/bin"),
        key=lambda p: int(p.parent.name) if p.parent.name.isdigit() else 0,
    )
    for cand in reversed(candidates):
        if (cand / "initdb").exists() and (cand / "pg_ctl").exists():
            return cand
    raise ClusterUnavailable("no initdb/pg_ctl on PATH or under /usr/lib/postgresql/*/bin")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _make_cert(directory: Path, cn: str = "localhost") -> tuple[Path, Path]:
    """A self-signed certificate for 127.0.0.1/localhost (also serves as its own CA)."""
    import ipaddress

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)])
    now = _dt.datetime.now(_dt.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - _dt.timedelta(days=1))
        .not_valid_after(now + _dt.timedelta(days=30))
        .add_extension(
            x509.SubjectAlternativeName(
                [x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]
            ),
            critical=False,
        )
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(key, hashes.SHA256())
    )
    cert_path, key_path = directory / "server.crt", directory / "server.key"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.TraditionalOpenSSL,
            serialization.NoEncryption(),
        )
    )
    key_path.chmod(0o600)
    return cert_path, key_path


def _run_as() -> str | None:
    """initdb and postgres refuse to run as root: pick an unprivileged system user."""
    if os.geteuid() != 0:
        return None
    try:
        pwd.getpwnam("postgres")
        return "postgres"
    except KeyError:
        return "nobody"


@dataclass
class Cluster:
    """One running throwaway cluster."""

    base: Path
    port: int
    bindir: Path
    run_as: str | None

    @property
    def datadir(self) -> Path:
        return self.base / "data"

    @property
    def ca_file(self) -> Path:
        return self.base / "server.crt"

    def dsn(
        self,
        user: str = SUPERUSER,
        password: str | None = SUPERUSER_PASSWORD,
        dbname: str = "postgres",
    ) -> str:
        auth = f"{user}:{password}@" if password is not None else f"{user}@"
        return f"postgresql://{auth}127.0.0.1:{self.port}/{dbname}"

    def _cmd(self, *args: str) -> list[str]:
        if self.run_as:
            return ["runuser", "-u", self.run_as, "--", *args]
        return list(args)

    def _run(self, *args: str) -> None:
        proc = subprocess.run(self._cmd(*args), capture_output=True, text=True, timeout=120)
        if proc.returncode != 0:
            raise RuntimeError(f"{args[0]} failed: {proc.stdout}\n{proc.stderr}")

    @classmethod
    def create(cls, base: Path, port: int | None = None) -> Cluster:
        """initdb a new cluster in ``base`` (not started)."""
        base.mkdir(parents=True, exist_ok=True)
        cluster = cls(base=base, port=port or free_port(), bindir=find_bindir(), run_as=_run_as())
        cluster._init()
        (base / "port").write_text(str(cluster.port))
        return cluster

    @classmethod
    def open_existing(cls, base: Path) -> Cluster | None:
        """A cluster ``create`` made earlier in ``base``, or None if there is none."""
        if not (base / "data" / "PG_VERSION").exists() or not (base / "port").exists():
            return None
        port = int((base / "port").read_text())
        return cls(base=base, port=port, bindir=find_bindir(), run_as=_run_as())

    def _init(self) -> None:
        pwfile = self.base / "pwfile"
        pwfile.write_text(SUPERUSER_PASSWORD + "\n")
        _make_cert(self.base)
        if self.run_as:
            entry = pwd.getpwnam(self.run_as)
            os.chown(self.base, entry.pw_uid, entry.pw_gid)
            for path in self.base.iterdir():
                os.chown(path, entry.pw_uid, entry.pw_gid)
        self._run(
            str(self.bindir / "initdb"),
            "-D",
            str(self.datadir),
            "-U",
            SUPERUSER,
            "--pwfile",
            str(pwfile),
            "--auth-local=trust",
            "--auth-host=scram-sha-256",
            "-E",
            "UTF8",
            "--locale=C",
        )
        hba = "".join(
            f"host all {role} 127.0.0.1/32 {method}\n" for role, method in AUTH_ROLES.items()
        )
        hba_path = self.datadir / "pg_hba.conf"
        hba_path.write_text(
            "local all all trust\n" + hba + "host all all 127.0.0.1/32 scram-sha-256\n"
        )
        conf = self.datadir / "postgresql.conf"
        with conf.open("a") as fh:
            fh.write(
                f"\nlisten_addresses = '127.0.0.1'\nport = {self.port}\n"
                f"unix_socket_directories = '{self.base}'\n"
                "max_connections = 400\nshared_buffers = 128MB\nfsync = off\n"
                "synchronous_commit = off\nfull_page_writes = off\n"
                f"ssl = on\nssl_cert_file = '{self.base / 'server.crt'}'\n"
                f"ssl_key_file = '{self.base / 'server.key'}'\n"
            )

    def start(self) -> None:
        self._run(
            str(self.bindir / "pg_ctl"),
            "-D",
            str(self.datadir),
            "-l",
            str(self.base / "postgres.log"),
            "-w",
            "-t",
            "60",
            "start",
        )
        self._wait_ready()
        self._setup_roles()

    def _wait_ready(self) -> None:
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            with (
                contextlib.suppress(OSError),
                socket.create_connection(("127.0.0.1", self.port), timeout=1),
            ):
                return
            time.sleep(0.1)
        raise RuntimeError("postgres did not start listening")

    def psql(self, sql: str, dbname: str = "postgres") -> str:
        psql = self.bindir / "psql"
        exe = str(psql) if psql.exists() else (shutil.which("psql") or "psql")
        proc = subprocess.run(
            [exe, "-X", "-q", "-A", "-t", "-v", "ON_ERROR_STOP=1", "-h", str(self.base),
             "-p", str(self.port), "-U", SUPERUSER, "-d", dbname, "-c", sql],
            capture_output=True, text=True, timeout=120,
        )  # fmt: skip
        if proc.returncode != 0:
            raise RuntimeError(f"psql failed: {proc.stderr.strip()}")
        return proc.stdout

    def _setup_roles(self) -> None:
        stmts = []
        for role, method in AUTH_ROLES.items():
            enc = "md5" if method == "md5" else "scram-sha-256"
            stmts.append(
                f"SET password_encryption = '{enc}'; "
                f"DO $$BEGIN IF NOT EXISTS (SELECT FROM pg_roles WHERE rolname = '{role}') THEN "
                f"CREATE ROLE {role} LOGIN; END IF; END$$; "
                f"ALTER ROLE {role} PASSWORD '{AUTH_ROLE_PASSWORD}';"
            )
        self.psql(" ".join(stmts))

    def stop(self, mode: str = "immediate") -> None:
        with contextlib.suppress(Exception):
            self._run(str(self.bindir / "pg_ctl"), "-D", str(self.datadir), "-m", mode, "stop")
