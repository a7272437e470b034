"""`dvc push` / `dvc pull` through dvc-ssh against a real OpenSSH server on 127.0.0.1."""

from __future__ import annotations

import asyncio
import os
import subprocess
from pathlib import Path

import asyncssh
import pytest

from tests.sshd import (
    SSHServer,
    configure_ssh_remote,
    run,
)

pytestmark = pytest.mark.slow


@pytest.fixture
def sshd(sshd_server: SSHServer) -> SSHServer:
    """The running test sshd (conftest's `sshd_server`)."""
    return sshd_server


def _sftp_listdir(server: SSHServer, known_hosts: Path, path: Path) -> list[str]:
    async def go() -> list[str]:
        async with (
            asyncssh.connect(
                server.host,
                port=server.port,
                username=server.user,
                client_keys=[str(server.keyfile)],
                known_hosts=str(known_hosts),
                agent_path=None,
                config=None,
            ) as conn,
            conn.start_sftp_client() as sftp,
        ):
            return sorted(await sftp.listdir(str(path)))

    return asyncio.run(asyncio.wait_for(go(), timeout=30))


def test_server_key_matches_known_hosts(sshd: SSHServer, tmp_path: Path) -> None:
    probe = tmp_path / "probe"
    probe.mkdir()
    (probe / "a.txt").write_text("a")
    assert "a.txt" in _sftp_listdir(sshd, sshd.known_hosts, probe)

    # a known_hosts naming another key for the same host:port must be refused
    other = tmp_path / "other_host_key"
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(other)], check=True)
    wrong = tmp_path / "wrong_known_hosts"
    key = " ".join(other.with_name(other.name + ".pub").read_text().split()[:2])
    wrong.write_text(f"[{sshd.host}]:{sshd.port} {key}\n")
    with pytest.raises(asyncssh.HostKeyNotVerifiable):
        _sftp_listdir(sshd, wrong, probe)


def _files(root: Path) -> dict[str, bytes]:
    return {
        p.relative_to(root).as_posix(): p.read_bytes()
        for p in sorted(root.rglob("*"))
        if p.is_file()
    }


def test_push_then_pull_in_a_clone(sshd: SSHServer, tmp_path: Path) -> None:
    repo = tmp_path / "repo"
    repo.mkdir()
    run(["git", "init", "-q", "-b", "main"], repo, sshd)
    run(["dvc", "init", "-q"], repo, sshd)
    blob = os.urandom(1 << 20)
    (repo / "weights.bin").write_bytes(blob)
    (repo / "shards").mkdir()
    for i in range(3):
        (repo / "shards" / f"part-{i}.bin").write_bytes(os.urandom(1000 + i))
    expected = {"weights.bin": blob} | {
        f"shards/{k}": v for k, v in _files(repo / "shards").items()
    }
    run(["dvc", "add", "weights.bin", "shards"], repo, sshd)
    run(["git", "add", "-A"], repo, sshd)
    run(["git", "commit", "-qm", "data"], repo, sshd)

    remote_dir = tmp_path / "remote"
    configure_ssh_remote(repo, "storage", sshd, remote_dir)
    run(["dvc", "push"], repo, sshd)
    # DVC 3 layout: files/md5/<2 hex>/<rest>; 1 MB file + 3 files + the .dir manifest
    objects = [p for p in (remote_dir / "files" / "md5").rglob("*") if p.is_file()]
    assert len(objects) == 5, objects
    assert blob in {p.read_bytes() for p in objects}

    clone = tmp_path / "clone"
    run(["git", "clone", "-q", str(repo), str(clone)], tmp_path, sshd)
    assert not (clone / "weights.bin").exists()
    # the README's advice: a credential goes to the git-ignored local config, never to git
    run(
        ["dvc", "remote", "modify", "--local", "storage", "keyfile", str(sshd.keyfile)], clone, sshd
    )
    assert str(sshd.keyfile) in (clone / ".dvc" / "config.local").read_text()
    assert run(["git", "status", "--porcelain"], clone, sshd).stdout.strip() == ""
    run(["dvc", "pull"], clone, sshd)
    got = {"weights.bin": (clone / "weights.bin").read_bytes()} | {
        f"shards/{k}": v for k, v in _files(clone / "shards").items()
    }
    assert got == expected

    status = run(["dvc", "status"], clone, sshd)
    assert "up to date" in status.stdout, status.stdout
    cloud = run(["dvc", "status", "--cloud"], clone, sshd)
    assert "in sync" in cloud.stdout, cloud.stdout
