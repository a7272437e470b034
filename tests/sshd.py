"""A throwaway OpenSSH server on 127.0.0.1 for DVC SSH-remote tests.

Everything lives under the caller's temp dir: sshd_config, host key, client key,
authorized_keys, known_hosts, pid file and log. Nothing reads or writes the user's ~/.ssh.

Host-key checking: dvc-ssh 4.x builds its connection arguments from a fixed set of remote
options (no known_hosts key in DVC's config schema), and sshfs then calls
`asyncssh.connect(..., known_hosts=None)`, which turns host-key verification off. A
`UserKnownHostsFile` in ~/.ssh/config cannot turn it back on (asyncssh only reads it when
`known_hosts` is left at its default). So `dvc push` never checks the server's key today;
`env` still points HOME at a temp dir holding a correct `.ssh/known_hosts` and `.ssh/config`,
so the dvc subprocess reads no user ssh config and a future dvc-ssh that honours known_hosts
keeps working. `tests/test_remote_ssh.py` checks that known_hosts file with asyncssh directly.
"""

from __future__ import annotations

import os
import pwd
import shutil
import socket
import subprocess
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

from tests.repo_utils import env as base_env

HOST = "127.0.0.1"
START_TIMEOUT_S = 10.0
PRIVSEP_DIR = Path("/run/sshd")


class SSHDError(RuntimeError):
    """sshd is missing or did not come up; the message says why and holds its log."""


@dataclass(frozen=True)
class SSHServer:
    host: str
    port: int
    user: str
    keyfile: Path  # client private key, authorised on the server
    known_hosts: Path  # "[127.0.0.1]:port <host key>"
    env: dict[str, str] = field(default_factory=dict)  # overrides for dvc/ssh subprocesses
    log: Path | None = None  # sshd's own stderr (-e)

    def url(self, path: Path | str) -> str:
        """`ssh://user@127.0.0.1:port/abs/path` for an absolute path on this machine."""
        p = Path(path)
        if not p.is_absolute():
            raise ValueError(f"SSH remote path must be absolute, got {path!r}")
        return f"ssh://{self.user}@{self.host}:{self.port}{p.as_posix()}"


def find_sshd() -> Path:
    # sshd re-executes itself for every connection and refuses a relative argv[0]
    found = shutil.which("sshd") or shutil.which("sshd", path="/usr/sbin:/usr/local/sbin:/sbin")
    if not found:
        raise SSHDError(
            "OpenSSH server not found (no `sshd` on PATH or in /usr/sbin): "
            "install it with `apt-get install -y openssh-server` (.ci/run does)"
        )
    return Path(found).resolve()


def _keygen(path: Path, comment: str) -> str:
    """New passphrase-less ed25519 key pair at `path`; returns the public key line."""
    try:
        subprocess.run(
            ["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", comment, "-f", str(path)],
            check=True,
            capture_output=True,
            timeout=30,
        )
    except (OSError, subprocess.SubprocessError) as e:
        err = getattr(e, "stderr", b"") or b""
        raise SSHDError(
            f"ssh-keygen could not create {path}: {e} {err.decode(errors='replace')}"
        ) from e
    return path.with_name(path.name + ".pub").read_text().strip()


def _free_port() -> int:
    # The kernel picks; another process may take it before sshd binds, so the caller retries.
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((HOST, 0))
        return s.getsockname()[1]


def _sshd_config(d: Path, port: int, user: str) -> str:
    return "\n".join(
        [
            f"Port {port}",
            f"ListenAddress {HOST}",
            f"HostKey {d / 'host_ed25519'}",
            f"PidFile {d / 'sshd.pid'}",
            f"AuthorizedKeysFile {d / 'authorized_keys'}",
            f"AllowUsers {user}",
            "PubkeyAuthentication yes",
            "PasswordAuthentication no",
            "KbdInteractiveAuthentication no",
            # no PAM stack or session setup for a throwaway server
            "UsePAM no",
            # pytest's tmp dirs may be group/world-readable; sshd would reject the key files
            "StrictModes no",
            # CI runs as root; keys only
            "PermitRootLogin prohibit-password",
            # in-process SFTP: no dependency on where the distro put sftp-server
            "Subsystem sftp internal-sftp",
            "UseDNS no",
            "PrintMotd no",
            "X11Forwarding no",
            "AllowAgentForwarding no",
            "LogLevel VERBOSE",
            "",
        ]
    )


def _client_home(d: Path, port: int, keyfile: Path, known_hosts: Path) -> Path:
    """A HOME with .ssh/{config,known_hosts} so clients never read the user's ~/.ssh."""
    home = d / "home"
    ssh_dir = home / ".ssh"
    ssh_dir.mkdir(parents=True)
    ssh_dir.chmod(0o700)
    shutil.copy(known_hosts, ssh_dir / "known_hosts")
    (ssh_dir / "config").write_text(
        f"Host {HOST}\n"
        f"  Port {port}\n"
        f"  IdentityFile {keyfile}\n"
        f"  IdentitiesOnly yes\n"
        f"  UserKnownHostsFile {known_hosts}\n"
        f"  StrictHostKeyChecking yes\n"
    )
    return home


def _wait_for_banner(proc: subprocess.Popen, port: int, log: Path) -> None:
    """Until our sshd answers with an SSH banner; raise if it exits or takes too long."""
    deadline = time.monotonic() + START_TIMEOUT_S
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise SSHDError(
                f"sshd exited with status {proc.returncode} at start-up; log {log}:\n"
                f"{log.read_text(errors='replace')[-3000:]}"
            )
        try:
            with socket.create_connection((HOST, port), timeout=0.5) as s:
                # the banner proves it is an SSH server, not whatever else holds the port
                if s.recv(64).startswith(b"SSH-2.0-"):
                    return
        except OSError:
            pass
        time.sleep(0.05)
    raise SSHDError(
        f"sshd did not accept connections on {HOST}:{port} within {START_TIMEOUT_S:.0f} s; "
        f"log {log}:\n{log.read_text(errors='replace')[-3000:]}"
    )


def _stop(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(timeout=5)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=5)


@contextmanager
def running_sshd(tmp_path: Path, *, attempts: int = 3) -> Iterator[SSHServer]:
    """Start `sshd -D -e -f <config>` on a free 127.0.0.1 port; stop it on exit.

    Raises SSHDError (with sshd's log) if the server is missing or does not come up.
    """
    sshd = find_sshd()
    d = (tmp_path / "sshd").resolve()
    d.mkdir(parents=True)
    # the account sshd will see, not $USER (which may be stale under su/sudo)
    user = pwd.getpwuid(os.geteuid()).pw_name
    if os.geteuid() == 0 and not PRIVSEP_DIR.is_dir():
        # root sshd chroots its pre-auth child into this directory and refuses to start without it
        PRIVSEP_DIR.mkdir(mode=0o755, parents=True, exist_ok=True)

    host_pub = _keygen(d / "host_ed25519", "fcn-test-host")
    keyfile = d / "id_ed25519"
    (d / "authorized_keys").write_text(_keygen(keyfile, "fcn-test-client") + "\n")
    host_key = " ".join(host_pub.split()[:2])  # "ssh-ed25519 AAAA...", no comment

    for attempt in range(1, attempts + 1):
        port = _free_port()
        config = d / "sshd_config"
        config.write_text(_sshd_config(d, port, user))
        log = d / f"sshd.{attempt}.log"
        with open(log, "wb") as log_f:
            proc = subprocess.Popen(
                [str(sshd), "-D", "-e", "-f", str(config)],
                stdin=subprocess.DEVNULL,
                stdout=log_f,
                stderr=subprocess.STDOUT,
            )
        try:
            _wait_for_banner(proc, port, log)
            break
        except SSHDError:
            _stop(proc)
            lost_port = "Address already in use" in log.read_text(errors="replace")
            if not lost_port or attempt == attempts:
                raise
    try:
        known_hosts = d / "known_hosts"
        known_hosts.write_text(f"[{HOST}]:{port} {host_key}\n")
        home = _client_home(d, port, keyfile, known_hosts)
        env = {
            "HOME": str(home),
            # no agent: only the throwaway key may authenticate
            "SSH_AUTH_SOCK": "",
        }
        yield SSHServer(HOST, port, user, keyfile, known_hosts, env, log)
    finally:
        _stop(proc)


def dvc_env(server: SSHServer) -> dict[str, str]:
    """Environment for git/dvc subprocesses that talk to `server` (git identity, no analytics)."""
    e = base_env()
    e.update(server.env)
    return e


def run(
    args: list[str], cwd: Path, server: SSHServer, timeout: float = 300
) -> subprocess.CompletedProcess:
    """Run a git/dvc command with the server's environment; fail with its output."""
    p = subprocess.run(
        args, cwd=cwd, env=dvc_env(server), capture_output=True, text=True, timeout=timeout
    )
    if p.returncode != 0:
        log = server.log.read_text(errors="replace")[-2000:] if server.log else ""
        raise AssertionError(
            f"{' '.join(args)} failed ({p.returncode}) in {cwd}\n"
            f"--- stdout\n{p.stdout[-4000:]}\n--- stderr\n{p.stderr[-4000:]}\n"
            f"--- sshd log\n{log}"
        )
    return p


def configure_ssh_remote(
    repo: Path, name: str, server: SSHServer, remote_dir: Path, *, commit: bool = True
) -> None:
    """Make `name` the default DVC remote at `remote_dir` through `server`.

    Everything goes into the committed .dvc/config (it is a temp repo) and, with `commit`,
    is committed, so a `git clone` of `repo` can `dvc pull` without further setup.
    """
    run(["dvc", "remote", "add", "-d", "-f", name, server.url(remote_dir.resolve())], repo, server)
    run(["dvc", "remote", "modify", name, "keyfile", str(server.keyfile)], repo, server)
    # fail fast in tests rather than DVC's default 30-minute connect timeout
    run(["dvc", "remote", "modify", name, "timeout", "30"], repo, server)
    if commit:
        run(["git", "add", ".dvc/config"], repo, server)
        run(["git", "commit", "-qm", f"dvc remote {name} over ssh"], repo, server)
