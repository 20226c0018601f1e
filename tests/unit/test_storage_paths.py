"""Storage paths: what is remote, where a name lands, and RunStorage on a local folder (no object store)."""

import pytest

from dcgan_dist.storage.filesystem import RunStorage, filesystem, is_remote


@pytest.mark.parametrize(
    "location, remote",
    [
        ("s3://bucket/runs/a", True),
        ("s3://bucket", True),
        ("runs/a", False),
        ("/tmp/s3://x", False),
        ("S3://bucket/a", False),  # the scheme is lower case, as the AWS tools write it
        ("gs://bucket/a", False),
        ("", False),
    ],
)
def test_is_remote(location, remote):
    assert is_remote(location) is remote


def test_local_locations_become_absolute_paths(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert filesystem("runs/a")[1] == str(tmp_path / "runs" / "a")
    assert filesystem("~/runs/a")[1] == str(tmp_path / "home" / "runs" / "a")
    storage = RunStorage("~/runs/a/")
    assert storage.local_dir() == tmp_path / "home" / "runs" / "a" and not storage.remote


def test_names_are_relative_to_the_run_folder(tmp_path):
    storage = RunStorage(str(tmp_path / "run"))
    assert storage.where("") == str(tmp_path / "run")
    assert storage.where("checkpoints/step_0000001.pt") == f"{tmp_path}/run/checkpoints/step_0000001.pt"
    assert storage.sub("checkpoints").where("last.txt") == f"{tmp_path}/run/checkpoints/last.txt"


def test_run_storage_on_a_local_folder(tmp_path):
    run = tmp_path / "run"
    storage = RunStorage(str(run))
    storage.check_writable()  # creates the folder, leaves no probe behind
    assert run.is_dir() and list(run.iterdir()) == []

    where = storage.write("checkpoints/a.bin", b"\x00\x01")
    assert where == str(run / "checkpoints" / "a.bin") and (run / "checkpoints" / "a.bin").read_bytes() == b"\x00\x01"
    storage.write("checkpoints/a.bin", b"new")  # replaced whole
    assert storage.read("checkpoints/a.bin") == b"new"
    assert [p.name for p in (run / "checkpoints").iterdir()] == ["a.bin"]  # no temporary file left

    assert storage.exists("checkpoints") and not storage.is_file("checkpoints")
    assert storage.is_file("checkpoints/a.bin") and not storage.exists("checkpoints/b.bin")
    source = tmp_path / "local.bin"
    source.write_bytes(b"x" * 1000)
    storage.upload(source, "checkpoints/b.bin")
    assert (run / "checkpoints" / "b.bin").read_bytes() == b"x" * 1000
    assert sorted(storage.list("")) == [("checkpoints", True)]
    assert sorted(storage.list("checkpoints")) == [("a.bin", False), ("b.bin", False)]
    assert storage.list("nothing-here") == [] and storage.list("checkpoints/a.bin") == []

    storage.delete("checkpoints/a.bin")
    storage.delete("checkpoints/a.bin")  # deleting what is gone is no error
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["b.bin"]
    with pytest.raises(FileNotFoundError):
        storage.read("checkpoints/a.bin")


def test_check_writable_refuses_a_folder_that_cannot_be(tmp_path):
    (tmp_path / "file").write_text("not a folder")
    with pytest.raises(OSError):
        RunStorage(str(tmp_path / "file" / "run")).check_writable()
    assert (tmp_path / "file").read_text() == "not a folder"
