import hashlib
import os

import pytest

from lite_influence import fingerprint
from lite_influence.fingerprint import fingerprint_files, fingerprint_path


@pytest.fixture(autouse=True)
def cache_dir(tmp_path, monkeypatch):
    monkeypatch.setenv("LITE_INFLUENCE_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache"


def _folder(tmp_path):
    root = tmp_path / "model"
    root.mkdir()
    (root / "weights.bin").write_bytes(os.urandom(3000))
    (root / "tokenizer.json").write_text('{"vocab": 1}')
    return root


def test_second_call_reads_no_file(tmp_path, monkeypatch):
    root = _folder(tmp_path)
    first = fingerprint_path(root)
    reads = []
    monkeypatch.setattr(fingerprint, "_digest", lambda p: reads.append(p) or "00")
    assert fingerprint_path(root) == first and reads == []


def test_any_change_is_seen_even_with_the_old_mtime(tmp_path):
    root = _folder(tmp_path)
    first = fingerprint_path(root)
    st = (root / "tokenizer.json").stat()
    (root / "tokenizer.json").write_text('{"vocab": 2}')  # same size
    os.utime(root / "tokenizer.json", ns=(st.st_atime_ns, st.st_mtime_ns))  # mtime set back
    assert fingerprint_path(root) != first


def test_matches_an_independent_sha256(tmp_path):
    root = _folder(tmp_path)
    h = hashlib.sha256()
    for name in ("tokenizer.json", "weights.bin"):
        data = (root / name).read_bytes()
        h.update(name.encode() + b"\0" + len(data).to_bytes(8, "little") + hashlib.sha256(data).digest())
    assert fingerprint_files(root, list(root.iterdir())) == "sha256:" + h.hexdigest()


def test_renaming_a_file_changes_it(tmp_path):
    root = _folder(tmp_path)
    first = fingerprint_path(root)
    (root / "tokenizer.json").rename(root / "tokenizer2.json")
    assert fingerprint_path(root) != first


def test_a_damaged_cache_is_ignored(tmp_path, cache_dir):
    root = _folder(tmp_path)
    first = fingerprint_path(root)
    (cache_dir / "file-hashes.json").write_text("{not json")
    assert fingerprint_path(root) == first


def test_cache_off(tmp_path, monkeypatch, cache_dir):
    monkeypatch.setenv("LITE_INFLUENCE_CACHE", "off")
    fingerprint_path(_folder(tmp_path))
    assert not cache_dir.exists()
