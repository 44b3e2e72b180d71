"""Issue 14, observation 7: key and flag mistakes are clear errors (exit 2, the flag and the fix named),
never a traceback, and a private key is never copied anywhere. Real CLI invocations (the installed
console scripts), except the compile timing, which is measured in-process so interpreter start-up
does not count."""

from __future__ import annotations

import socket
import stat
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from conftest import gemm_onnx, make_artifact
from typer.testing import CliRunner

BIN = Path(sys.executable).parent


def cli(tool: str, *args: str | Path, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    done = subprocess.run([str(BIN / tool), *map(str, args)], capture_output=True, text=True, timeout=timeout)
    assert "Traceback" not in done.stderr + done.stdout, done.stderr
    return done


def init_args(state: Path, *extra: str | Path) -> list[str | Path]:
    return ["init", "--device-id", "dev-1", "--profile", "x86-64-generic", "--state-dir", state, *extra]


def test_init_refuses_a_private_key_and_never_copies_it(keys: tuple[Path, Path], tmp_path: Path) -> None:
    state = tmp_path / "state"
    done = cli("edge-agent", *init_args(state, "--trust", keys[0]))
    assert done.returncode == 2, done.stderr
    assert "that is a private key; give the .pub" in done.stderr and str(keys[0]) in done.stderr
    copied = [p for p in state.rglob("*") if p.is_file() and b"PRIVATE KEY" in p.read_bytes()]
    assert copied == [] and not (state / "agent.json").exists()


def test_init_names_a_missing_trust_file(tmp_path: Path) -> None:
    done = cli("edge-agent", *init_args(tmp_path / "state", "--trust", tmp_path / "nope.pub"))
    assert done.returncode == 2 and "--trust" in done.stderr and "no such file" in done.stderr, done.stderr


def test_init_refuses_a_garbage_trust_file(tmp_path: Path) -> None:
    garbage = tmp_path / "garbage.pub"
    garbage.write_text("not a key\n")
    done = cli("edge-agent", *init_args(tmp_path / "state", "--trust", garbage))
    assert done.returncode == 2 and "not an Ed25519 public key" in done.stderr, done.stderr
    assert not (tmp_path / "state" / "trust" / "garbage.pub").exists()


def test_init_writes_the_trusted_key_as_pub(keys: tuple[Path, Path], tmp_path: Path) -> None:
    """A public key given under another name is stored as NAME.pub (the agent trusts only *.pub)."""
    other = tmp_path / "hub-signing.pem"
    other.write_bytes(keys[1].read_bytes())
    done = cli("edge-agent", *init_args(tmp_path / "state", "--trust", other))
    assert done.returncode == 0, done.stderr
    assert (tmp_path / "state" / "trust" / "hub-signing.pub").read_bytes() == keys[1].read_bytes()


def test_a_garbage_pub_in_the_trust_directory_is_named(keys: tuple[Path, Path], tmp_path: Path) -> None:
    state = tmp_path / "state"
    assert cli("edge-agent", *init_args(state, "--trust", keys[1])).returncode == 0
    (state / "trust" / "junk.pub").write_text("garbage\n")
    artifact = make_artifact(tmp_path / "a", keys[0])
    for args in (["install", artifact], ["run"], init_args(state, "--trust", keys[1])):
        done = cli("edge-agent", *args, "--state-dir", state) if args[0] != "init" else cli("edge-agent", *args)
        assert done.returncode == 2, (args, done.stderr)
        assert "junk.pub" in done.stderr and "not a usable trusted key" in done.stderr, (args, done.stderr)


def test_init_names_a_missing_cloud_ca(keys: tuple[Path, Path], tmp_path: Path) -> None:
    done = cli("edge-agent", *init_args(tmp_path / "state", "--trust", keys[1], "--cloud", "grpcs://hub:8001",
                                        "--cloud-ca", tmp_path / "ca.pem"))  # fmt: skip
    assert done.returncode == 2 and "--cloud-ca" in done.stderr and "no such file" in done.stderr, done.stderr


def test_init_names_a_bad_broker_url(keys: tuple[Path, Path], tmp_path: Path) -> None:
    done = cli("edge-agent", *init_args(tmp_path / "state", "--trust", keys[1], "--broker", "http://x:1883"))
    assert done.returncode == 2 and "mqtt://host:port" in done.stderr, done.stderr


def serve_args(tmp_path: Path, *extra: str | Path) -> list[str | Path]:
    return ["serve", "--state-dir", tmp_path / "hub", "--broker-port", "0", "--grpc-port", "0", "--admin-port", "0",
            *extra]  # fmt: skip


def test_serve_names_missing_tls_files(tmp_path: Path) -> None:
    done = cli("cloud-hub", *serve_args(tmp_path, "--tls-cert", tmp_path / "c.pem", "--tls-key", tmp_path / "k.pem"))
    assert done.returncode == 2 and "--tls-cert" in done.stderr and "No such file" in done.stderr, done.stderr


def test_serve_names_a_bad_broker_url(tmp_path: Path) -> None:
    done = cli("cloud-hub", *serve_args(tmp_path, "--broker", "mqtt://host:99999"))
    assert done.returncode == 2 and "--broker" in done.stderr and "bad port" in done.stderr, done.stderr


def test_serve_names_a_taken_admin_port(tmp_path: Path) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        args = ["serve", "--state-dir", tmp_path / "hub", "--broker-port", "0", "--grpc-port", "0",
                "--admin-port", str(port)]  # fmt: skip
        done = cli("cloud-hub", *args)
    assert done.returncode == 2, done.stderr
    assert f"--admin-port {port}" in done.stderr and "choose another" in done.stderr, done.stderr


def test_serve_refuses_a_private_trust_key(keys: tuple[Path, Path], tmp_path: Path) -> None:
    done = cli("cloud-hub", *serve_args(tmp_path, "--trust", keys[0]))
    assert done.returncode == 2 and "that is a private key; give the .pub" in done.stderr, done.stderr
    trust = tmp_path / "hub" / "trust"
    assert not trust.exists() or not any(b"PRIVATE" in p.read_bytes() for p in trust.iterdir())


def test_keygen_writes_the_private_key_0600_from_creation(tmp_path: Path) -> None:
    done = cli("model-compiler", "keygen", "--out", tmp_path / "k")
    assert done.returncode == 0, done.stderr
    assert stat.S_IMODE((tmp_path / "k" / "signing.key").stat().st_mode) == 0o600


@pytest.mark.parametrize(
    ("flag", "value"), [("--version", "1.0 beta"), ("--version", "1.0.0\n"), ("--name", "../m"), ("--release", "-5")]
)
def test_compile_checks_name_version_release_before_any_export(keys: tuple[Path, Path], tmp_path: Path, flag: str,
                                                               value: str) -> None:  # fmt: skip
    from model_compiler.cli import app

    gemm_onnx(tmp_path / "m.onnx", 0)
    x = np.random.default_rng(0).standard_normal((16, 32)).astype(np.float32)
    np.savez(tmp_path / "d.npz", x=x)
    args = {"--name": "m", "--version": "1.0.0", "--release": "0", flag: value}
    command = ["compile", str(tmp_path / "m.onnx"), "--profile", "x86-64-generic", "--calib", str(tmp_path / "d.npz"),
               "--val", str(tmp_path / "d.npz"), "--out", str(tmp_path / "out"), "--key", str(keys[0]),
               *(part for pair in args.items() for part in pair)]  # fmt: skip
    started = time.monotonic()
    result = CliRunner().invoke(app, command)
    elapsed = time.monotonic() - started
    assert result.exit_code == 2, result.output
    assert flag in result.output and ("not allowed" in result.output or "positive whole number" in result.output)
    assert elapsed < 0.5, f"took {elapsed:.2f} s: validated after compiling"
    assert not (tmp_path / "out").exists()
