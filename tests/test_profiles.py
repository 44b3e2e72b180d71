from __future__ import annotations

from pathlib import Path

import pytest

from device_profiles import ProfileError, builtin_profile_dir, get_profile, load_profile, load_profiles
from device_profiles.detect import HostFacts, detect_profile

REQUIRED = {
    "jetson-orin-nano-8gb",
    "jetson-agx-orin",
    "jetson-xavier-nx",
    "raspberry-pi-5",
    "raspberry-pi-4",
    "x86-64-generic",
    "x86-64-avx512-vnni",
    "arm64-server",
    "cloud-gpu",
}
VALID = Path(builtin_profile_dir() / "raspberry-pi-5.toml").read_text()


@pytest.mark.parametrize("path", sorted(builtin_profile_dir().glob("*.toml")), ids=lambda p: p.stem)
def test_every_profile_file_loads(path: Path) -> None:
    profile = load_profile(path)
    assert profile.id == path.stem
    assert profile.runtimes and profile.precisions and profile.max_artifact_bytes > 0


def test_required_device_classes_exist() -> None:
    assert set(load_profiles()) >= REQUIRED
    assert get_profile("jetson-orin-nano-8gb").gpu_compute_capability == "8.7"
    assert get_profile("jetson-xavier-nx").tensorrt == "8.5.2"


@pytest.mark.parametrize(
    ("old", "new", "field"),
    [
        ("cpu_cores = 4", 'cpu_cores = "four"', "cpu_cores"),
        ("memory_mb = 8192\n", "", "memory_mb"),
        ('arch = "aarch64"', 'arch = "sparc"', "arch"),
        ('runtimes = ["tflite", "onnxruntime"]', 'runtimes = ["tflite", "caffe"]', "runtimes"),
        ("latency_budget_ms = 50.0", "latency_budget_ms = -1.0", "latency_budget_ms"),
        ('accelerator = "none"', 'accelerator = "nvidia-gpu"', "gpu_compute_capability"),
        ("max_artifact_mb = 256", "max_artifact_mb = 256\nintra_op_threads = -2", "intra_op_threads"),
        ("max_artifact_mb = 256", 'max_artifact_mb = 256\ngraph_optimization = "max"', "graph_optimization"),
    ],
)
def test_bad_profile_names_file_and_field(tmp_path: Path, old: str, new: str, field: str) -> None:
    path = tmp_path / "raspberry-pi-5.toml"
    assert old in VALID
    path.write_text(VALID.replace(old, new))
    with pytest.raises(ProfileError) as info:
        load_profile(path)
    assert info.value.field == field
    assert str(path) in str(info.value) and "Fix:" in str(info.value)


def test_user_profile_directory_adds_profiles(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / "my-board.toml").write_text(VALID.replace('id = "raspberry-pi-5"', 'id = "my-board"'))
    monkeypatch.setenv("EDGEFED_PROFILE_PATH", str(tmp_path))
    assert get_profile("my-board").arch == "aarch64"
    with pytest.raises(ProfileError, match="unknown profile"):
        get_profile("no-such-board")


def _host(**kw: object) -> HostFacts:
    base: dict[str, object] = {"arch": "x86_64", "cpu_cores": 2, "cpu_flags": frozenset({"avx2"})}
    return HostFacts(**{**base, **kw})  # type: ignore[arg-type]


def test_detection_picks_the_most_specific_profile() -> None:
    profiles = load_profiles()
    found = detect_profile(profiles, _host())
    assert found is not None and found.profile.id == "x86-64-generic"
    vnni = detect_profile(profiles, _host(cpu_flags=frozenset({"avx2", "avx512f", "avx512_vnni"})))
    assert vnni is not None and vnni.profile.id == "x86-64-avx512-vnni"
    pi = detect_profile(
        profiles,
        _host(
            arch="aarch64",
            cpu_cores=4,
            cpu_flags=frozenset({"asimd"}),
            device_tree_model="Raspberry Pi 5 Model B Rev 1.0",
        ),
    )
    assert pi is not None and pi.profile.id == "raspberry-pi-5"
    assert any("device tree" in r for r in pi.reasons)
    jetson = detect_profile(
        profiles,
        _host(
            arch="aarch64",
            cpu_cores=6,
            cpu_flags=frozenset({"asimd"}),
            is_jetson=True,
            device_tree_model="NVIDIA Jetson Orin Nano Developer Kit",
        ),
    )
    assert jetson is not None and jetson.profile.id == "jetson-orin-nano-8gb"
    gpu = detect_profile(profiles, _host(gpu_compute_capability="9.0", gpu_name="NVIDIA H100"))
    assert gpu is not None and gpu.profile.id == "cloud-gpu"
