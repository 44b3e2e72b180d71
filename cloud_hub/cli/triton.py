"""`cloud-hub export-triton NAME@VERSION DIR`: a registered ONNX model version as a Triton model repository."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.markup import escape

from cloud_hub.api_client import AdminClient
from cloud_hub.cli import AsJson, HubUrl, StateDir, Token, app, client, fail, out, run
from cloud_hub.errors import HubError, NotFound
from cloud_hub.triton import MODEL_FILE, ExportError, TritonModel, triton_model, write_model
from edge_agent.protocol.errors import ArtifactRejected
from edge_agent.protocol.manifest import Manifest, manifest_from_wire


@app.command("export-triton")
def export_triton(
    model: Annotated[str, typer.Argument(help="NAME@VERSION: a registered version name, or a release number")],
    directory: Annotated[Path, typer.Argument(help="Triton model repository to write into (created if missing)")],
    max_batch_size: Annotated[
        int | None,
        typer.Option(
            min=0,
            help="Triton's max_batch_size (0: no batching by Triton, full shapes); default: the manifest's "
            "max_batch when every input and output has a dynamic first axis, else 0",
        ),
    ] = None,
    force: Annotated[bool, typer.Option(help="Replace DIR/NAME/RELEASE when it was exported before")] = False,
    hub: HubUrl = None,
    token: Token = None,
    state_dir: StateDir = Path("hub-state"),
    as_json: AsJson = False,
) -> None:
    """Write Triton Inference Server's model repository layout for a registered ONNX model version:
    DIR/NAME/config.pbtxt (platform onnxruntime_onnx; input and output names, data types and dims from the
    manifest, -1 for a dynamic axis) and DIR/NAME/RELEASE/model.onnx, where RELEASE, the Triton version, is
    the artifact's release number (the hub's OIP server also reads an integer version as a release). The
    artifact is the one the hub's own inference server runs for that version (its serving profile); a
    version with only TFLite or other non-ONNX artifacts is refused. Reads from the running hub through the
    admin API (viewer token is enough); then run `tritonserver --model-repository DIR`."""
    name, _, version = model.partition("@")
    if not name or not version:
        raise fail(f"{model!r}: give NAME@VERSION, e.g. digits-cnn@1.0.0 (see 'cloud-hub models list')")
    admin = client(hub, token, state_dir)
    served = _served(admin, name, version)
    manifest = manifest_from_wire(served["manifest"])
    onnx_file = directory / f".download-{served['artifact_id'][:16]}.onnx"
    try:
        triton = triton_model(manifest, max_batch_size)
        directory.mkdir(parents=True, exist_ok=True)
        _download(admin, served["artifact_id"], manifest, onnx_file)
        final = write_model(directory, triton, manifest.release, onnx_file, force)
    except (ExportError, ArtifactRejected, OSError) as exc:
        raise fail(exc) from None
    finally:
        onnx_file.unlink(missing_ok=True)
    _report(_result(served, manifest, triton, final), as_json)


def _served(admin: AdminClient, name: str, version: str) -> dict[str, Any]:
    try:
        served: dict[str, Any] = admin.request("GET", f"/v1/models/{name}/{version}/served")
    except NotFound as exc:
        raise fail(f"cannot export {name}@{version} to Triton (its onnxruntime backend needs an ONNX artifact "
                   f"the hub can serve): {exc}") from None  # fmt: skip
    except HubError as exc:
        raise fail(exc) from None
    return served


def _download(admin: AdminClient, artifact_id: str, manifest: Manifest, target: Path) -> None:
    """Stream model.onnx from the hub to ``target``, refused unless its size and sha256 are the manifest's."""
    entry = manifest.file(MODEL_FILE)
    with target.open("wb") as sink:
        run(lambda: admin.request("GET", f"/v1/artifacts/{artifact_id}/files/{MODEL_FILE}", sink=sink))
    digest = hashlib.sha256()
    with target.open("rb") as f:
        while block := f.read(1 << 20):
            digest.update(block)
    if target.stat().st_size != entry.size or digest.hexdigest() != entry.sha256:
        raise ArtifactRejected("sha256", f"the {MODEL_FILE} the hub sent does not match its manifest; try again")


def _result(served: dict[str, Any], manifest: Manifest, triton: TritonModel, final: Path) -> dict[str, Any]:
    def tensor(spec: Any) -> dict[str, Any]:
        return {"name": spec.name, "dtype": spec.dtype, "dims": triton.dims(spec)}

    return {
        "model": manifest.name, "version": manifest.version, "triton_version": manifest.release,
        "artifact_id": served["artifact_id"], "profile": manifest.hardware.profile,
        "config": str(final.parent / "config.pbtxt"), "model_file": str(final / MODEL_FILE),
        "max_batch_size": triton.max_batch_size, "inputs": [tensor(s) for s in triton.inputs],
        "outputs": [tensor(s) for s in triton.outputs],
    }  # fmt: skip


def _report(result: dict[str, Any], as_json: bool) -> None:
    if as_json:
        print(json.dumps(result, indent=2))
        return
    out().print(
        f"exported {escape(result['model'])}@{escape(result['version'])} (artifact {result['artifact_id'][:12]}, "
        f"{escape(result['profile'])}) as Triton version {result['triton_version']}:\n"
        f"  {escape(result['config'])}\n  {escape(result['model_file'])}\n"
        f"max_batch_size {result['max_batch_size']}; serve it with: tritonserver --model-repository "
        f"{escape(str(Path(result['config']).parent.parent))}"
    )
