import pytest

from diffusers_speedup.utils import atomic_folder, atomic_write


def test_atomic_write_replaces_on_success_and_keeps_the_old_file_on_error(tmp_path):
    path = tmp_path / "state.json"
    path.write_text("old")
    with pytest.raises(RuntimeError):
        with atomic_write(path) as temporary:
            temporary.write_text("half")
            raise RuntimeError("killed")
    assert path.read_text() == "old"
    with atomic_write(path) as temporary:
        assert temporary.parent == tmp_path and temporary != path
        temporary.write_text("new")
    assert path.read_text() == "new"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["state.json"]


def test_atomic_folder_replaces_an_existing_folder_only_when_complete(tmp_path):
    target = tmp_path / "export"
    target.mkdir()
    (target / "a.txt").write_text("old")
    with pytest.raises(RuntimeError):
        with atomic_folder(target) as staging:
            (staging / "b.txt").write_text("half")
            raise RuntimeError("killed")
    assert [p.name for p in target.iterdir()] == ["a.txt"]
    with atomic_folder(target) as staging:
        (staging / "b.txt").write_text("new")
    assert [p.name for p in target.iterdir()] == ["b.txt"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["export"]
