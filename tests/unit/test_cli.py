"""`wgpy genkey|pubkey|genpsk`: byte-for-byte what `wg` does."""

from __future__ import annotations

import base64
import os
import shutil
import stat
import subprocess
import sys

import pytest

WGPY = [sys.executable, "-m", "tunnel.cli"]
needs_wg = pytest.mark.skipif(shutil.which("wg") is None, reason="wireguard-tools (wg) not installed")


def run(args, stdin: bytes | None = None, cmd=WGPY, **kw) -> subprocess.CompletedProcess:
    return subprocess.run(cmd + args, input=stdin, capture_output=True, timeout=30, **kw)


def test_genkey_format_and_clamping():
    out = run(["genkey"]).stdout
    assert out.endswith(b"\n") and len(out) == 45
    key = base64.b64decode(out)
    assert key[0] & 7 == 0 and key[31] & 0x80 == 0 and key[31] & 0x40


def test_genpsk_format():
    out = run(["genpsk"]).stdout
    assert len(out) == 45 and len(base64.b64decode(out)) == 32
    assert run(["genpsk"]).stdout != out


@needs_wg
@pytest.mark.parametrize("source", ["wgpy", "wg"])
def test_pubkey_matches_wg(source):
    for _ in range(5):
        key = run(["genkey"]).stdout if source == "wgpy" else run(["genkey"], cmd=["wg"]).stdout
        ours = run(["pubkey"], key)
        theirs = run(["pubkey"], key, cmd=["wg"])
        assert ours.returncode == theirs.returncode == 0
        assert ours.stdout == theirs.stdout


@needs_wg
@pytest.mark.parametrize("stdin", [
    b"", b"garbage\n", b"A" * 43 + b"=junk\n", b"A" * 44 + b"\n",
    b"!" * 43 + b"=\n", b"A" * 42 + b"==\n",
    b"  " + b"A" * 43 + b"=\n", b"A" * 43 + b"= extra\n", b"A" * 43 + b"=\n\n  \n",
    b"A" * 43 + b"=", b"A" * 42 + b"B=\n",
])
def test_pubkey_bad_and_edge_input_like_wg(stdin):
    ours = run(["pubkey"], stdin)
    theirs = run(["pubkey"], stdin, cmd=["wg"])
    assert ours.returncode == theirs.returncode
    assert ours.stdout == theirs.stdout
    if ours.returncode:
        assert ours.returncode == 1
        lines = ours.stderr.decode().splitlines()
        assert len(lines) == 1 and lines[0].startswith("wgpy: ")
        assert "Traceback" not in ours.stderr.decode()
        assert lines[0][len("wgpy: "):] == theirs.stderr.decode().strip()[len("wg: "):]


def test_key_file_created_0600(tmp_path):
    path = tmp_path / "private.key"
    old = os.umask(0)
    try:
        assert run(["genkey", "-o", str(path)]).returncode == 0
    finally:
        os.umask(old)
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    pub = run(["pubkey"], path.read_bytes())
    assert pub.returncode == 0 and len(pub.stdout) == 45


def test_key_file_permissions_tightened(tmp_path):
    path = tmp_path / "psk"
    path.write_text("old")
    path.chmod(0o644)
    assert run(["genpsk", "--output", str(path)]).returncode == 0
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert len(path.read_bytes()) == 45


def test_unwritable_output_is_one_line_error(tmp_path):
    r = run(["genkey", "-o", str(tmp_path / "missing" / "k")])
    assert r.returncode == 1
    assert r.stderr.decode().count("\n") == 1 and "Traceback" not in r.stderr.decode()


# ---------------------------------------------------------------- issue 12: messages and exits

def test_version():
    for module, name in (("tunnel.cli", "wgpy"), ("tunnel.daemon", "wgpy-daemon")):
        r = run(["--version"], cmd=[sys.executable, "-m", module])
        assert r.returncode == 0 and r.stdout.decode().startswith(f"{name} "), r.stderr


@pytest.fixture
def no_root_check(monkeypatch):
    from tunnel import netconfig

    monkeypatch.setattr(netconfig, "have_net_admin", lambda: True, raising=False)


@pytest.mark.parametrize("argv", [["show"], ["show", "all"]])
def test_show_without_interfaces_says_so(monkeypatch, capsys, no_root_check, argv):
    """Issue 12, item 15: not a blank line (wg's), one line that says there are none."""
    from tunnel import cli, uapi

    monkeypatch.setattr(uapi, "list_interfaces", lambda *a: [])
    assert cli.main(argv) == 0
    out, err = capsys.readouterr()
    assert out == "no WireGuard interfaces (no control socket in /var/run/wireguard)\n" and err == ""
    assert cli.main(argv + ["--json"]) == 0
    assert capsys.readouterr().out == "[]\n"  # machine-readable: an empty list, no prose


def test_show_all_and_failures(monkeypatch, capsys, no_root_check):
    from tunnel import cli, uapi

    def status(name, *a):
        if name == "dead":
            raise uapi.ControlError(f"{name}: cannot connect")
        return uapi.InterfaceStatus(name)

    monkeypatch.setattr(uapi, "list_interfaces", lambda *a: ["wgx"])
    monkeypatch.setattr(uapi, "get_status", status)
    assert cli.main(["show", "all"]) == 0
    assert "interface: wgx" in capsys.readouterr().out
    monkeypatch.setattr(uapi, "list_interfaces", lambda *a: ["dead", "wgx"])
    assert cli.main(["show"]) == 1  # shows the others, but does not pretend all went well
    out, err = capsys.readouterr()
    assert "interface: wgx" in out and err == "wgpy: dead: cannot connect\n"


@pytest.mark.parametrize("failure", [KeyError("private_key"), "net"])
def test_down_rolls_back_when_save_config_fails(monkeypatch, tmp_path, capsys, no_root_check, failure):
    """SaveConfig that raises (no private key, `ip` failing...) is reported; the rollback runs."""
    from tunnel import cli, netconfig, quick

    ifname = "wgtsave0"
    left = tmp_path / "made-by-up"
    left.write_text("x")
    journal = netconfig.Journal(ifname, str(tmp_path / "state"))
    journal.meta = {"config": str(tmp_path / f"{ifname}.conf"), "save_config": True}
    journal.undo = [{"restore_file": str(left), "absent": True}]
    journal.save()
    monkeypatch.setattr(quick.Journal, "load", classmethod(lambda cls, name, *a, **k: journal))
    exc = failure if isinstance(failure, Exception) else netconfig.NetError("`ip -o address show` failed")

    def save_config(*a):
        raise exc

    monkeypatch.setattr(quick, "save_config", save_config)
    monkeypatch.setattr(quick.uapi, "socket_path", lambda name, *a: str(tmp_path / f"{name}.sock"))
    assert cli.main(["down", ifname]) == 1
    err = capsys.readouterr().err
    assert "SaveConfig" in err and err.count("\n") == 1, err
    assert not left.exists()  # undone all the same
    assert not os.path.exists(journal.path)
