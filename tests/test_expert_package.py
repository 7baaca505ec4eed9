"""The expert is cached by digest; a mismatch or a corrupt file is refused, never used."""

import pytest

from shared.adapter_files import ADAPTER_FILES, adapter_digest
from shared.expert_package import ExpertDigestError, cached_expert, pack_expert, unpack_expert
from shared.paths import DATA_DIR_ENV


@pytest.fixture(autouse=True)
def own_data_dir(tmp_path, monkeypatch):
    monkeypatch.setenv(DATA_DIR_ENV, str(tmp_path / "home"))


@pytest.fixture
def expert_dir(tmp_path):
    path = tmp_path / "expert"
    path.mkdir()
    (path / "adapter_config.json").write_text('{"r": 2}')
    (path / "adapter_model.safetensors").write_bytes(b"weights" * 10)
    return path


def test_an_expert_round_trips_and_is_cached_by_digest(expert_dir):
    package = pack_expert(expert_dir)
    assert cached_expert(package["digest"]) is None
    path = unpack_expert(package)
    assert adapter_digest(path) == package["digest"] and cached_expert(package["digest"]) == path
    assert all((path / name).read_bytes() == package[name] for name in ADAPTER_FILES)


def test_a_corrupt_expert_is_refused_and_nothing_is_cached(expert_dir):
    package = pack_expert(expert_dir)
    package["adapter_model.safetensors"] = b"weights" * 9 + b"WEIGHTS"
    with pytest.raises(ExpertDigestError, match="not the announced"):
        unpack_expert(package)
    assert cached_expert(package["digest"]) is None


def test_a_cached_expert_that_changed_on_disk_is_refused(expert_dir):
    package = pack_expert(expert_dir)
    path = unpack_expert(package)
    (path / "adapter_model.safetensors").write_bytes(b"tampered")
    with pytest.raises(ExpertDigestError, match="no longer matches"):
        cached_expert(package["digest"])


def test_packages_without_digest_or_files_are_refused(expert_dir):
    package = pack_expert(expert_dir)
    with pytest.raises(ExpertDigestError, match="lacks"):
        unpack_expert({k: v for k, v in package.items() if k != "adapter_config.json"})
    with pytest.raises(ExpertDigestError, match="without a digest"):
        unpack_expert({k: v for k, v in package.items() if k != "digest"})
    with pytest.raises(ExpertDigestError, match="not a sha256"):
        unpack_expert({**package, "digest": "../../etc"})


def test_a_corrupt_cached_copy_is_replaced_by_a_verified_delivery(expert_dir):
    package = pack_expert(expert_dir)
    path = unpack_expert(package)
    (path / "adapter_model.safetensors").write_bytes(b"tampered")
    assert unpack_expert(package) == path and cached_expert(package["digest"]) == path
