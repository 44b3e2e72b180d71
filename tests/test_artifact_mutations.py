"""Mutation test of the artifact check (issue 14): 1,000 seeded random mutations of signed artifacts,
each through ``edge-agent install`` (the real CLI, in-process) onto a device that has a valid version
installed and active, and through the hub's artifact store the way ``cloud-hub models add`` reaches it
(the upload tar, ``ArtifactStore.add_tar``) and as a directory (``ArtifactStore.add``).

Every mutation must be refused: exit code 2 with an ``artifact rejected (CHECK)`` message (never a
traceback or exit 1), the device's state directory byte-identical after each refusal (one state
directory, never restored), and nothing stored by the hub (its store's tree byte-identical).

Kinds: bytes flipped, inserted and removed in ``manifest.json``, ``signature`` and the payload files;
manifest fields edited and left with the old signature; fields edited to values the checks must
refuse and re-signed with the *trusted* key (so the checks after the signature are reached); re-signed
with an unknown key (its own key id, or claiming the trusted one); signed by a revoked key (one the
device's key set revokes although a copy of it sits in its trust/ directory); files swapped between valid
artifacts; files removed, replaced by a directory or by a symlink. A mutation that leaves the signed
content unchanged (e.g. a flipped byte that only turns a space into a newline of the manifest) is not
a mutation: it is drawn again, and counted.

Not covered: a *revoked* key — key revocation does not exist yet (issue 14, "Signing keys that can
change"); add that kind when it does.
"""

from __future__ import annotations

import base64
import copy
import json
import os
import random
import shutil
import tarfile
import time
from collections import Counter
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from conftest import make_artifact, tree_digest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from typer.testing import CliRunner

from cloud_hub.artifacts import ArtifactStore
from edge_agent.cli import app as agent_cli
from edge_agent.protocol.canonical import canonical_json, strict_loads
from edge_agent.protocol.errors import ArtifactRejected
from edge_agent.protocol.keyset import build, sign, to_message
from edge_agent.protocol.manifest import format_time
from edge_agent.protocol.signing import (
    TrustStore,
    generate_keypair,
    key_id,
    load_private_key,
    load_public_key,
    sign_document,
)
from edge_agent.trust import take_keyset

MUTATIONS = 1000
SEED = 14
PAYLOAD = ("model.onnx", "golden.npz")
Entry = bytes | tuple[str, str]  # file bytes, ("dir", ""), ("fifo", "") or ("symlink", target)
Artifact = dict[str, Entry]


def _load(directory: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(directory.iterdir())}


def _write(artifact: Artifact, directory: Path) -> None:
    if directory.exists():
        shutil.rmtree(directory)
    directory.mkdir()
    for name, entry in artifact.items():
        if isinstance(entry, bytes):
            (directory / name).write_bytes(entry)
        elif entry[0] == "dir":
            (directory / name).mkdir()
        elif entry[0] == "fifo":  # an old verifier blocked on it for good
            os.mkfifo(directory / name)
        else:
            os.symlink(entry[1], directory / name)


def _dump(document: Any) -> bytes:
    return json.dumps(document, indent=2, sort_keys=True).encode()


def _equivalent(mutated: Artifact, base: dict[str, bytes]) -> bool:
    """The mutated artifact carries exactly the signed content of ``base`` (same document, same
    signature record, same payload bytes): not a mutation at all."""
    if set(mutated) != set(base) or any(mutated[n] != base[n] for n in base if n not in ("manifest.json", "signature")):
        return False
    try:
        document, signature = strict_loads(mutated["manifest.json"]), strict_loads(mutated["signature"])  # type: ignore[arg-type]
        same_document = canonical_json(document) == canonical_json(strict_loads(base["manifest.json"]))
    except (ValueError, TypeError):
        return False
    return same_document and signature == strict_loads(base["signature"])


class Mutator:
    """Seeded random mutations of a few valid artifacts."""

    def __init__(self, rng: random.Random, bases: dict[str, dict[str, bytes]], trusted: Ed25519PrivateKey,
                 unknown: Ed25519PrivateKey, revoked: Ed25519PrivateKey, installed_release: int) -> None:  # fmt: skip
        self.rng, self.bases, self.trusted, self.unknown, self.revoked = rng, bases, trusted, unknown, revoked
        self.installed_release = installed_release
        self.kinds: list[tuple[str, Callable[[dict[str, bytes]], tuple[Artifact, bool]]]] = [
            ("flip", self.flip),
            ("insert", self.insert),
            ("remove", self.remove),
            ("field-unsigned", self.field_unsigned),
            ("field-resigned", self.field_resigned),
            ("unknown-key", self.unknown_key),
            ("revoked-key", self.revoked_key),
            ("swap", self.swap),
            ("file-kind", self.file_kind),
        ]

    def draw(self) -> tuple[str, str, Artifact, bool]:
        """(kind, base name, mutated artifact, whether the hub may legitimately store it)."""
        kind, make = self.rng.choice(self.kinds)
        base_name = self.rng.choice(["new", "new", "new", "installed"])
        mutated, hub_valid = make(self.bases[base_name])
        return kind, base_name, mutated, hub_valid

    def _target(self) -> str:
        return self.rng.choice(["manifest.json", "manifest.json", "signature", "signature", *PAYLOAD])

    def _bytes(self, count: int) -> bytes:
        if self.rng.random() < 0.5:  # JSON-ish bytes get further into the parser
            return "".join(self.rng.choice('{}[]",: 0123456789abcdefe-.tnul\\') for _ in range(count)).encode()
        return bytes(self.rng.randrange(256) for _ in range(count))

    def flip(self, base: dict[str, bytes]) -> tuple[Artifact, bool]:
        target, out = self._target(), dict[str, Entry](base)
        data = bytearray(base[target])
        for _ in range(self.rng.randint(1, 4)):
            data[self.rng.randrange(len(data))] ^= self.rng.randint(1, 255)
        out[target] = bytes(data)
        return out, False

    def insert(self, base: dict[str, bytes]) -> tuple[Artifact, bool]:
        target, out = self._target(), dict[str, Entry](base)
        at = self.rng.randrange(len(base[target]) + 1)
        out[target] = base[target][:at] + self._bytes(self.rng.randint(1, 16)) + base[target][at:]
        return out, False

    def remove(self, base: dict[str, bytes]) -> tuple[Artifact, bool]:
        target, out = self._target(), dict[str, Entry](base)
        data = base[target]
        if self.rng.random() < 0.2:
            out[target] = data[: self.rng.randrange(len(data))]  # truncated
        else:
            at = self.rng.randrange(len(data))
            out[target] = data[:at] + data[at + self.rng.randint(1, 16) :]
        return out, False

    def _edit(self, document: dict[str, Any], refusable_only: bool) -> tuple[dict[str, Any], bool]:
        """Edit one field. ``refusable_only``: only values every device check must refuse (the result
        is re-signed with the trusted key); the flag returned says the hub may store it (the hub does
        not check profiles or releases against installed ones)."""
        doc, rng = copy.deepcopy(document), self.rng
        files = doc["files"]
        entry = rng.choice(files)
        past = format_time(datetime.now(UTC) - timedelta(seconds=rng.randint(1, 10**6)))
        choice = rng.choice(["release", "sha256", "size", "chunk", "path", "name", "version", "expires", "profile",
                             "chunk_size", "schema", "dtype", "files"])  # fmt: skip
        hub_valid = False
        if choice == "release":
            values: list[Any] = [0, -1, "3", 2.5, True, None]
            if refusable_only:
                values.append(self.installed_release)
            else:
                values += [doc["release"] + 1, 2**63, doc["release"] - 1]
            doc["release"] = rng.choice(values)
            hub_valid = doc["release"] == self.installed_release
        elif choice == "sha256":
            entry["sha256"] = rng.choice([f"{rng.getrandbits(256):064x}", entry["sha256"].upper(), entry["sha256"][:-1],
                                          "0" * 64])  # fmt: skip
        elif choice == "size":
            entry["size"] = rng.choice([entry["size"] + 1, entry["size"] - 1, 0, -1, 2**40, str(entry["size"])])
        elif choice == "chunk":
            chunks = entry["chunks"]
            how = rng.choice(["replace", "drop", "add", "swap"])
            if how == "replace":
                chunks[rng.randrange(len(chunks))] = f"{rng.getrandbits(256):064x}"
            elif how == "drop":
                chunks.pop(rng.randrange(len(chunks)))
            elif how == "add":
                chunks.insert(rng.randrange(len(chunks) + 1), f"{rng.getrandbits(256):064x}")
            elif len(chunks) > 1:
                i, j = rng.sample(range(len(chunks)), 2)
                chunks[i], chunks[j] = chunks[j], chunks[i]
            else:
                chunks[0] = chunks[0][::-1]
        elif choice == "path":
            other = next(f["path"] for f in files if f is not entry) if len(files) > 1 else "x"
            paths = ["../model.onnx", "", "a/b", ".hidden", "nothere.bin", "manifest.json", "signature", other,
                     "/etc/passwd", "model.onnx\x00", entry["path"] + "\n"]  # fmt: skip
            entry["path"] = rng.choice(paths)
        elif choice == "name":
            doc["name"] = rng.choice(["../evil", "", "a b", "x" * 200, "-x", "gemm/1", "gemm\n"])
        elif choice == "version":
            values = ["1.0.0/..", "", "..", "v 2", doc["version"] + "\n"]
            if refusable_only:
                values.append("1.0.0")  # the installed version, other content
            doc["version"] = rng.choice(values)
            hub_valid = doc["version"] == "1.0.0"
        elif choice == "expires":
            doc["expires_at"] = rng.choice([past, "not a time", "2099-01-01T00:00:00", 4102444800, None])
        elif choice == "profile":
            doc["hardware"] = {"profile": "jetson-orin-nano", "arch": "aarch64", "accelerator": "cuda"}
            hub_valid = True
        elif choice == "chunk_size":
            doc["chunk_size"] = rng.choice([0, -1, 512, 4096, "1024", 1.5])
        elif choice == "schema":
            doc["schema"] = rng.choice(["edgefed.manifest/3", "", None])
        elif choice == "dtype":
            doc["inputs"][0]["dtype"] = rng.choice(["float128", "", None, "object"])
        else:
            doc["files"] = rng.choice([[], [*files, files[0]]])
        return doc, hub_valid

    def field_unsigned(self, base: dict[str, bytes]) -> tuple[Artifact, bool]:
        document, _ = self._edit(json.loads(base["manifest.json"]), refusable_only=False)
        return dict[str, Entry]({**base, "manifest.json": _dump(document)}), False

    def field_resigned(self, base: dict[str, bytes]) -> tuple[Artifact, bool]:
        document, hub_valid = self._edit(json.loads(base["manifest.json"]), refusable_only=True)
        signature = json.dumps(sign_document(document, self.trusted)).encode()
        return dict[str, Entry]({**base, "manifest.json": _dump(document), "signature": signature}), hub_valid

    def unknown_key(self, base: dict[str, bytes]) -> tuple[Artifact, bool]:
        document = json.loads(base["manifest.json"])
        if self.rng.random() < 0.5:
            document, _ = self._edit(document, refusable_only=False)
        record = sign_document(document, self.unknown)
        if self.rng.random() < 0.5:  # claim to be the trusted key
            record["key_id"] = json.loads(base["signature"])["key_id"]
        signature = json.dumps(record).encode()
        return dict[str, Entry]({**base, "manifest.json": _dump(document), "signature": signature}), False

    def revoked_key(self, base: dict[str, bytes]) -> tuple[Artifact, bool]:
        document = json.loads(base["manifest.json"])
        if self.rng.random() < 0.5:
            document, _ = self._edit(document, refusable_only=False)
        signature = json.dumps(sign_document(document, self.revoked)).encode()
        return dict[str, Entry]({**base, "manifest.json": _dump(document), "signature": signature}), False

    def swap(self, base: dict[str, bytes]) -> tuple[Artifact, bool]:
        other = self.bases[self.rng.choice([n for n, b in self.bases.items() if b is not base])]
        names = list(base)
        taken = self.rng.sample(names, self.rng.randint(1, len(names) - 1))
        return dict[str, Entry]({n: (other[n] if n in taken else base[n]) for n in names}), False

    def file_kind(self, base: dict[str, bytes]) -> tuple[Artifact, bool]:
        out: Artifact = dict(base)
        target = self.rng.choice(list(base))
        how = self.rng.choice(["missing", "dir", "fifo", "symlink", "empty"])
        if how == "missing":
            del out[target]
        elif how in ("dir", "fifo"):
            out[target] = (how, "")
        elif how == "symlink":  # (/dev/zero: see test_an_endless_payload_file_is_refused_unread)
            links = ["/etc/passwd", "/dev/null", "/nonexistent", ".", "manifest.json"]
            out[target] = ("symlink", self.rng.choice(links))
        else:
            out[target] = b""
        return out, False


def _upload_tar(directory: Path, tar_path: Path) -> None:
    """The tar ``cloud-hub models add`` uploads (cloud_hub.api_client.AdminClient.add_artifact)."""
    with tarfile.open(tar_path, mode="w") as tar:
        for path in sorted(directory.iterdir()):
            if path.is_file():
                tar.add(path, arcname=path.name)


@pytest.fixture(scope="module")
def setup(tmp_path_factory: pytest.TempPathFactory, keys: tuple[Path, Path]) -> dict[str, Any]:
    root = tmp_path_factory.mktemp("mutations")
    unknown_key, _ = generate_keypair(root / "unknown")
    installed = make_artifact(root / "v1", keys[0], version="1.0.0", release=1, seed=0, golden=True)
    new = make_artifact(root / "v2", keys[0], version="2.0.0", release=2, seed=1, golden=True)
    other = make_artifact(root / "v3", keys[0], version="2.0.1", release=3, seed=2, golden=True)
    state = root / "device"
    runner = CliRunner()
    revoked_key, revoked_pub = generate_keypair(root / "revoked", "revoked")
    hub_key, hub_pub = generate_keypair(root / "hub-key", "hub")
    result = runner.invoke(agent_cli, ["init", "--device-id", "dev-m", "--profile", "x86-64-generic", "--trust",
                                       str(keys[1]), "--trust", str(revoked_pub), "--hub-key", str(hub_pub),
                                       "--state-dir", str(state)])  # fmt: skip
    assert result.exit_code == 0, result.output
    # the key set the hub sent: the signing key trusted, the other revoked (its copy in trust/ is not enough)
    keyset = build(1, "2026-12-01T00:00:00Z", [load_public_key(hub_pub)], [load_public_key(keys[1])],
                   {key_id(load_public_key(revoked_pub))})  # fmt: skip
    assert take_keyset(state, to_message([sign(keyset, [load_private_key(hub_key)])])) is not None
    result = runner.invoke(agent_cli, ["install", str(installed), "--state-dir", str(state)])
    assert result.exit_code == 0, result.output
    return {"root": root, "state": state, "runner": runner, "unknown": unknown_key, "revoked": revoked_pub,
            "revoked_key": revoked_key, "dirs": {"installed": installed, "new": new, "other": other}}  # fmt: skip


def _mutations(keys: tuple[Path, Path], setup: dict[str, Any]) -> list[tuple[str, str, Artifact, bool]]:
    bases = {name: _load(path) for name, path in setup["dirs"].items()}
    mutator = Mutator(random.Random(SEED), bases, load_private_key(keys[0]), load_private_key(setup["unknown"]),
                      load_private_key(setup["revoked_key"]), 1)  # fmt: skip
    found: list[tuple[str, str, Artifact, bool]] = []
    redrawn = 0
    while len(found) < MUTATIONS:
        kind, base_name, mutated, hub_valid = mutator.draw()
        if _equivalent(mutated, bases[base_name]):
            redrawn += 1
            continue
        found.append((kind, base_name, mutated, hub_valid))
    setup["redrawn"] = redrawn
    return found


def test_no_mutation_installs_on_a_device_or_reaches_the_hub_store(
    keys: tuple[Path, Path], setup: dict[str, Any]
) -> None:
    started = time.monotonic()
    runner, state, root = setup["runner"], setup["state"], setup["root"]
    revoked = load_public_key(setup["revoked"])  # the hub holds it too, revoked
    trust = TrustStore({**TrustStore.from_dir(keys[1].parent).keys, key_id(revoked): revoked},
                       frozenset({key_id(revoked)}))  # fmt: skip
    hub = ArtifactStore(root / "hub" / "artifacts", trust)
    hub.add(setup["dirs"]["installed"])  # the hub holds the installed version too (its re-add path)
    mutations = _mutations(keys, setup)
    device_before, hub_before = tree_digest(state), tree_digest(hub.root)
    work, tar_path = root / "work", root / "upload.tar"
    reasons: Counter[str] = Counter()
    kinds: Counter[str] = Counter()
    hub_checked = 0
    for index, (kind, base_name, mutated, hub_valid) in enumerate(mutations):
        kinds[kind] += 1
        _write(mutated, work)
        what = f"mutation {index} ({kind} of {base_name})"
        result = runner.invoke(agent_cli, ["install", str(work), "--state-dir", str(state)])
        assert isinstance(result.exception, SystemExit) and result.exit_code == 2, (
            f"{what}: exit {result.exit_code}, {result.exception!r}\n{result.output}"
        )
        assert "Traceback" not in result.output and "artifact rejected (" in result.output, f"{what}: {result.output}"
        reasons[result.output.split("artifact rejected (", 1)[1].split(")", 1)[0]] += 1
        assert tree_digest(state) == device_before, f"{what} changed the device's state directory"
        if hub_valid:  # an artifact the hub may legitimately store (another profile, a lower release)
            continue
        hub_checked += 1
        for through_tar in (False, True):
            with pytest.raises(ArtifactRejected):
                if through_tar:
                    _upload_tar(work, tar_path)
                    hub.add_tar(tar_path)
                else:
                    hub.add(work)
            assert tree_digest(hub.root) == hub_before, f"{what} changed the hub's artifact store"
    elapsed = time.monotonic() - started
    print(f"\n{MUTATIONS} mutations ({setup['redrawn']} redrawn as equivalent), {hub_checked} through the hub, "
          f"{elapsed:.1f} s; kinds {dict(sorted(kinds.items()))}; "
          f"device reasons {dict(sorted(reasons.items()))}")  # fmt: skip
    # the harness refuses for the mutation, not for itself: the unmutated artifact installs and is stored
    result = runner.invoke(agent_cli, ["install", str(setup["dirs"]["new"]), "--state-dir", str(state)])
    assert result.exit_code == 0, result.output
    assert hub.add(setup["dirs"]["new"]).version == "2.0.0"


def test_base64_and_record_malleability_is_refused(keys: tuple[Path, Path], tmp_path: Path) -> None:
    """A signature record that verifies but is not the one the signer wrote (non-canonical base64 with
    the same bytes, an extra field, a non-string key id) is refused: the signature file is not malleable."""
    artifact = make_artifact(tmp_path / "a", keys[0])
    trust = TrustStore.from_dir(keys[1].parent)
    record = json.loads((artifact / "signature").read_text())
    raw = base64.b64decode(record["sig"])
    assert len(raw) == 64 and record["sig"].endswith("==")
    last = record["sig"][-3]  # the final data character carries 4 unused bits
    alphabet = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/"
    twin = alphabet[alphabet.index(last) ^ 1]
    assert base64.b64decode(record["sig"][:-3] + twin + "==") == raw
    variants = [
        {**record, "sig": record["sig"][:-3] + twin + "=="},
        {**record, "extra": 1},
        {**record, "sig": record["sig"].rstrip("=")},
    ]
    store = ArtifactStore(tmp_path / "hub", trust)
    for variant in variants:
        (artifact / "signature").write_text(json.dumps(variant))
        with pytest.raises(ArtifactRejected) as info:
            store.add(artifact)
        assert info.value.reason == "signature", variant
    assert load_public_key(keys[1])  # the key itself is fine


# Each defect the mutation test found, on its own (each failed before the fix).


def _cli_install(artifact: Path, state: Path) -> tuple[int, str]:
    result = CliRunner().invoke(agent_cli, ["install", str(artifact), "--state-dir", str(state)])
    return result.exit_code, result.output


def test_an_endless_payload_file_is_refused_unread(keys: tuple[Path, Path], setup: dict[str, Any],
                                                   tmp_path: Path) -> None:  # fmt: skip
    """A payload file that is a symlink to /dev/zero was copied without end (the disk filled up: ENOSPC
    at mutation 40 of the first run). Run in a subprocess with a 64 MiB file-size limit, so a
    regression dies of SIGXFSZ instead of filling the disk."""
    import resource
    import subprocess
    import sys

    artifact = tmp_path / "a"
    shutil.copytree(setup["dirs"]["new"], artifact)
    (artifact / "model.onnx").unlink()
    os.symlink("/dev/zero", artifact / "model.onnx")
    before = tree_digest(setup["state"])

    def limit() -> None:
        resource.setrlimit(resource.RLIMIT_FSIZE, (64 << 20, 64 << 20))

    code = "from edge_agent.cli import main; main()"
    done = subprocess.run([sys.executable, "-c", code, "install", str(artifact), "--state-dir", str(setup["state"])],
                          capture_output=True, text=True, timeout=120, preexec_fn=limit)  # fmt: skip
    assert done.returncode == 2, (done.returncode, done.stderr)
    assert "artifact rejected (missing-file)" in done.stderr and "not a regular file" in done.stderr, done.stderr
    assert tree_digest(setup["state"]) == before


@pytest.mark.parametrize("how", ["payload-missing", "payload-dir", "payload-fifo", "manifest-dir"])
def test_unreadable_files_are_a_refusal_not_an_os_error(keys: tuple[Path, Path], setup: dict[str, Any],
                                                        tmp_path: Path, how: str) -> None:  # fmt: skip
    """A missing payload file, a directory or FIFO in its place, or a directory as manifest.json ended
    in a bare OSError ('[Errno 2]', '[Errno 21]': a 500 on the hub) or blocked for good (FIFO)."""
    artifact = tmp_path / "a"
    shutil.copytree(setup["dirs"]["new"], artifact)
    target = artifact / ("manifest.json" if how == "manifest-dir" else "model.onnx")
    target.unlink()
    if how in ("payload-dir", "manifest-dir"):
        target.mkdir()
    elif how == "payload-fifo":
        os.mkfifo(target)
    before = tree_digest(setup["state"])
    code, output = _cli_install(artifact, setup["state"])
    assert code == 2 and "artifact rejected (missing-file)" in output, output
    assert tree_digest(setup["state"]) == before
    with pytest.raises(ArtifactRejected) as info:
        ArtifactStore(tmp_path / "hub", TrustStore.from_dir(keys[1].parent)).add(artifact)
    assert info.value.reason == "missing-file"


@pytest.mark.parametrize("field", ["name", "version", "path"])
def test_a_trailing_newline_is_not_a_valid_name(keys: tuple[Path, Path], setup: dict[str, Any], tmp_path: Path,
                                                field: str) -> None:  # fmt: skip
    """The name pattern ended in '$', which also matches before a final newline: 'gemm\\n', signed by the
    trusted key, was installed as a new model (a directory named with a newline)."""
    artifact = tmp_path / "a"
    shutil.copytree(setup["dirs"]["new"], artifact)
    document = json.loads((artifact / "manifest.json").read_text())
    if field == "path":
        document["files"][0]["path"] += "\n"
    else:
        document[field] += "\n"
    (artifact / "manifest.json").write_bytes(_dump(document))
    (artifact / "signature").write_text(json.dumps(sign_document(document, load_private_key(keys[0]))))
    before = tree_digest(setup["state"])
    code, output = _cli_install(artifact, setup["state"])
    assert code == 2 and "artifact rejected (manifest)" in output, output
    assert tree_digest(setup["state"]) == before
