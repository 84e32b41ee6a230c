"""The real-model packages: assembling chunks, checking the result, and the errors when they are absent."""
import struct

import pytest

from tp_engine import cli, model_files
from tp_engine.model_files import ModelFile, ModelFilesMissing, check_header, locate

HEADER = b"GGUF" + struct.pack("<IQQ", 3, 2, 5)


def _fake_packages(root, prefix, chunks):
    """Chunk packages ``<prefix>1..n`` on ``root`` (put on sys.path by the caller)."""
    for i, data in enumerate(chunks, 1):
        pkg = root / f"{prefix.replace('-', '_')}{i}"
        (pkg / "data").mkdir(parents=True)
        (pkg / "__init__.py").write_text("")
        (pkg / "data" / f"part{i:02d}.bin").write_bytes(data)


@pytest.fixture
def fake_model(tmp_path, monkeypatch):
    chunks = [HEADER + b"a" * 10, b"b" * 7, b"c" * 3]
    _fake_packages(tmp_path / "site", "tpfake-part", chunks)
    monkeypatch.syspath_prepend(str(tmp_path / "site"))
    monkeypatch.setenv("TP_ENGINE_MODELS_DIR", str(tmp_path / "models"))
    model = ModelFile("fake", "fake.gguf", "tpfake-part", 3, sum(map(len, chunks)), "a fake model")
    monkeypatch.setitem(model_files.MODELS, "fake", model)
    return model, b"".join(chunks)


def test_chunks_are_concatenated_in_part_order_and_cached(fake_model, tmp_path):
    model, whole = fake_model
    path = locate("fake")
    assert path == tmp_path / "models" / "fake.gguf"
    assert path.read_bytes() == whole
    assert locate("fake") == path  # the cached file is reused


def test_missing_packages_name_the_command_to_run(fake_model, monkeypatch):
    monkeypatch.setitem(model_files.MODELS, "absent", ModelFile("absent", "absent.gguf", "tpabsent-part", 2, 10, "x"))
    with pytest.raises(ModelFilesMissing, match=r"tpabsent-part1, tpabsent-part2 are not installed; run `make models`"):
        locate("absent")


def test_wrong_total_size_is_refused(fake_model, monkeypatch):
    model, whole = fake_model
    monkeypatch.setitem(model_files.MODELS, "fake", ModelFile("fake", "fake.gguf", "tpfake-part", 3, len(whole) + 1, "x"))
    with pytest.raises(ValueError, match="expected"):
        locate("fake")


def test_header_check(tmp_path):
    good = tmp_path / "good.gguf"
    good.write_bytes(HEADER + b"x")
    check_header(good, len(HEADER) + 1)
    with pytest.raises(ValueError, match="bytes, expected"):
        check_header(good, 3)
    bad = tmp_path / "bad.gguf"
    bad.write_bytes(b"PK\x03\x04" + bytes(40))
    with pytest.raises(ValueError, match="not a GGUF file"):
        check_header(bad)


def test_unknown_name_and_cli(fake_model, capsys):
    with pytest.raises(ValueError, match="unknown model"):
        locate("nope")
    assert cli.main(["models", "path", "fake"]) == 0
    assert capsys.readouterr().out.strip().endswith("fake.gguf")
    assert cli.main(["models", "path", "nope"]) == 2
    assert "unknown model" in capsys.readouterr().err


def test_the_real_pair_when_installed():
    """The packages CI installs (`make models`) give valid files of the declared sizes."""
    for name, model in model_files.MODELS.items():
        try:
            path = locate(name)
        except ModelFilesMissing as exc:
            pytest.skip(str(exc))
        check_header(path, model.size)
