"""adapters.io: atomic outputs take the user's umask, as any other file does, so that others can read a study's
outputs on a shared filesystem (tempfile alone makes them 0600 files in 0700 directories)."""
import os
import stat

import pytest
import torch
from safetensors.torch import save_file

from adapters import io
from adapters.errors import AdapterError
from analysis import svd_cache


@pytest.fixture
def set_umask():
    """Set the process's umask for one test; the old one is restored after it."""
    old = os.umask(0o022)
    yield os.umask
    os.umask(old)


def _mode(path):
    return stat.S_IMODE(path.stat().st_mode)


@pytest.mark.parametrize("mask,file_mode,dir_mode", [(0o022, 0o644, 0o755), (0o077, 0o600, 0o700),
                                                     (0o002, 0o664, 0o775)])
def test_atomic_outputs_take_the_umask(tmp_path, set_umask, mask, file_mode, dir_mode):
    set_umask(mask)
    assert io.umask() == mask  # read as it is now, not as it was at import
    io.write_json(tmp_path / "a.json", {"x": 1})
    io.write_text(tmp_path / "b.txt", "b")
    with io.atomic_dir(tmp_path / "run") as d:  # as a checkpoint is written: ours, safetensors' and a subdirectory
        io.write_json(d / "stats.json", {})
        (d / "trajectory").mkdir(mode=0o700)
        save_file({"w": torch.zeros(2)}, str(d / "trajectory" / "w.safetensors"))  # 0600 from safetensors 0.8 on
    svd_cache.base_svd(torch.eye(3), "h", "q", "left", tmp_path / "cache")  # an SVD cache entry: safetensors, renamed
    entry, = (tmp_path / "cache").iterdir()
    files = [tmp_path / "a.json", tmp_path / "b.txt", tmp_path / "run" / "stats.json",
             tmp_path / "run" / "trajectory" / "w.safetensors", entry]
    assert [_mode(p) for p in files] == [file_mode] * len(files)
    assert [_mode(p) for p in (tmp_path / "run", tmp_path / "run" / "trajectory")] == [dir_mode] * 2
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.json", "b.txt", "cache", "run"]  # no temp file left


def test_the_umask_read_by_setting_it_is_restored_and_is_the_fallback(set_umask, monkeypatch):
    set_umask(0o027)
    assert io._umask_by_setting() == 0o027 and io.umask() == 0o027
    assert os.umask(0o027) == 0o027  # left as it was
    monkeypatch.setattr(io, "_umask_from_proc", lambda: None)  # no /proc: the umask read once, at import
    monkeypatch.setattr(io, "_UMASK_AT_IMPORT", 0o007)
    assert io.umask() == 0o007


def test_a_journal_gives_back_its_finished_items_and_nothing_of_other_settings(tmp_path):
    from adapters.io import Journal
    file = tmp_path / "partial" / "run.jsonl"
    journal = Journal(file, {"eps": 0.5, "k": 10})
    assert journal.done() == {}
    journal.add("q", {"count": 1})
    journal.add("v", [0.25, 1.0], sync_every=2)
    assert Journal(file, {"k": 10, "eps": 0.5}).done() == {"q": {"count": 1}, "v": [0.25, 1.0]}
    with open(file, "a") as f:
        f.write('{"key": "o", "val')  # a kill in the middle of a write: that item is done again
    assert set(Journal(file, {"eps": 0.5, "k": 10}).done()) == {"q", "v"}
    with pytest.raises(AdapterError, match=r"other settings \(eps\); use --fresh"):
        Journal(file, {"eps": 0.9, "k": 10}).done("use --fresh")
    journal.finish()
    assert not file.exists() and not file.parent.exists()
