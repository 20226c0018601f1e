"""Where a run's files and a data set's shards live: a local directory or an object store (s3://bucket/prefix).

Both go through a pyarrow filesystem, the layer Ray Train uses for its own storage too: `LocalFileSystem` for
paths, `S3FileSystem` for s3:// locations, which reach any S3 API (AWS, MinIO, Ceph, SeaweedFS, GCS's
interoperability endpoint). The endpoint and credentials come only from the standard variables, never from
settings: AWS_ENDPOINT_URL_S3 or AWS_ENDPOINT_URL (empty: AWS itself), AWS_ACCESS_KEY_ID,
AWS_SECRET_ACCESS_KEY, AWS_SESSION_TOKEN, AWS_REGION or AWS_DEFAULT_REGION; the Ray launcher forwards them to the
workers.
"""

from __future__ import annotations

import functools
import io
import os
import shutil
import time
from pathlib import Path
from urllib.parse import urlparse

from pyarrow import fs as pafs

from .files import atomic_write

S3 = "s3://"
# The variables an S3 client needs here and in every Ray worker (values never printed or stored).
S3_ENV = ("AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3", "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN",
          "AWS_REGION", "AWS_DEFAULT_REGION")


def is_remote(location: str) -> bool:
    return location.startswith(S3)


def s3_filesystem() -> pafs.S3FileSystem:
    """The object store the standard AWS variables describe (made once per process and setting)."""
    return _s3_filesystem(tuple(os.environ.get(name, "") for name in S3_ENV))


@functools.lru_cache(maxsize=4)
def _s3_filesystem(settings: tuple[str, ...]) -> pafs.S3FileSystem:
    env = dict(zip(S3_ENV, settings))
    kwargs: dict = {"region": env["AWS_REGION"] or env["AWS_DEFAULT_REGION"] or "us-east-1"}
    endpoint = env["AWS_ENDPOINT_URL_S3"] or env["AWS_ENDPOINT_URL"]
    if endpoint:  # pyarrow does not read these variables itself
        parsed = urlparse(endpoint)
        kwargs.update(endpoint_override=parsed.netloc or parsed.path, scheme=parsed.scheme or "https")
    if env["AWS_ACCESS_KEY_ID"]:
        kwargs.update(access_key=env["AWS_ACCESS_KEY_ID"], secret_key=env["AWS_SECRET_ACCESS_KEY"],
                      session_token=env["AWS_SESSION_TOKEN"] or None)
    # allow_delayed_open: an object smaller than one part (metrics.jsonl, a sample grid, dataset.json) is one PUT
    # rather than a three-request multipart upload. Object stores answer 500/503 now and then (throttling): the AWS
    # SDK's standard retries, with room for more than its default three attempts.
    return pafs.S3FileSystem(allow_bucket_creation=True, allow_delayed_open=True,
                             retry_strategy=pafs.AwsStandardS3RetryStrategy(max_attempts=10), **kwargs)


def filesystem(location: str) -> tuple[pafs.FileSystem, str]:
    """(filesystem, path on it) of a local path or an s3://bucket/prefix location."""
    if is_remote(location):
        return s3_filesystem(), location[len(S3):].rstrip("/")
    return pafs.LocalFileSystem(), str(Path(location).expanduser().absolute())


def retrying_unanswered(call, *args, **kwargs):
    """call(*args, **kwargs), tried again (up to 4 times in all, 0.5-2 s apart) when the object store sent no HTTP
    response at all (the AWS SDK's "HTTP status -1": e.g. a kept-alive connection the server had closed, seen
    from SeaweedFS under load). The SDK's own retries cover throttling and 5xx answers, not this. Only for calls
    that are whole and idempotent (a PUT of a whole object, a listing, a ranged read)."""
    for attempt in range(4):
        try:
            return call(*args, **kwargs)
        except OSError as exc:
            if "HTTP status -1" not in str(exc) or attempt == 3:
                raise
            time.sleep(0.5 * 2 ** min(attempt, 2))


def no_response_retried(operation):
    """A RunStorage method, through `retrying_unanswered` when the storage is an object store."""

    @functools.wraps(operation)
    def retried(self, *args, **kwargs):
        if not self.remote:
            return operation(self, *args, **kwargs)
        return retrying_unanswered(operation, self, *args, **kwargs)

    return retried


class ObjectReader(io.RawIOBase):
    """An object read front to back in ranged GETs (`read_at`: each one whole and repeatable, so tried again when
    the store did not answer); wrap it in io.BufferedReader for large reads."""

    def __init__(self, location: str):
        fs, path = filesystem(location)
        self._file = retrying_unanswered(fs.open_input_file, path)
        self._position = 0

    def readable(self) -> bool:
        return True

    def readinto(self, buffer) -> int:
        data = retrying_unanswered(self._file.read_at, len(buffer), self._position)
        buffer[:len(data)] = data
        self._position += len(data)
        return len(data)

    def close(self) -> None:
        if not self.closed:
            self._file.close()
        super().close()


class RunStorage:
    """A run's folder: <run.dir> on this machine's disk, or s3://bucket/prefix. Names are relative to it
    ("metrics.jsonl", "checkpoints/step_0000100.pt"). A write is whole or absent: a local file goes to a temporary
    name and is renamed; an object store's PUT is atomic by itself."""

    def __init__(self, location: str):
        self.location = location.rstrip("/") if is_remote(location) else str(Path(location).expanduser())
        self.fs, self.root = filesystem(location)
        self.remote = is_remote(location)

    def __repr__(self) -> str:
        return f"RunStorage({self.location})"

    def where(self, name: str) -> str:
        """What to show a user: the path or URI of `name`."""
        return f"{self.location}/{name}" if name else self.location

    def _path(self, name: str) -> str:
        return f"{self.root}/{name}" if name else self.root

    @no_response_retried
    def write(self, name: str, data: bytes) -> str:
        if self.remote:
            with self.fs.open_output_stream(self._path(name)) as f:
                f.write(data)
        else:
            atomic_write(self._path(name), data)
        return self.where(name)

    @no_response_retried
    def read(self, name: str) -> bytes:
        with self.fs.open_input_stream(self._path(name)) as f:
            return f.read()

    @no_response_retried
    def exists(self, name: str) -> bool:
        return self.fs.get_file_info(self._path(name)).type != pafs.FileType.NotFound

    @no_response_retried
    def is_file(self, name: str) -> bool:
        return self.fs.get_file_info(self._path(name)).type == pafs.FileType.File

    @no_response_retried
    def list(self, folder: str = "") -> list[tuple[str, bool]]:
        """(name, is a folder) of the entries directly in `folder` ('' = the root)."""
        path = self._path(folder)
        try:
            infos = self.fs.get_file_info(pafs.FileSelector(path, allow_not_found=True))
        except (NotADirectoryError, FileNotFoundError):
            return []
        return [(info.base_name, info.type == pafs.FileType.Directory) for info in infos]

    @no_response_retried
    def upload(self, local: Path, name: str) -> str:
        """A local file into this storage under `name` (streamed: no copy in memory)."""
        path = self._path(name)
        if self.remote:  # not pafs.copy_files: it drops an error of the last part's upload
            try:
                with open(local, "rb") as source, self.fs.open_output_stream(path) as target:
                    shutil.copyfileobj(source, target, 8 << 20)
            except BaseException:
                # Closing a stream completes its upload (pyarrow's Python API has no abort): what an error cut
                # short must not stay as a whole-looking object.
                self.delete(name)
                raise
        else:
            partial = f"{path}.partial-{os.getpid()}"
            try:
                shutil.copyfile(local, partial)
                os.replace(partial, path)
            finally:
                Path(partial).unlink(missing_ok=True)
        return self.where(name)

    @no_response_retried
    def delete(self, name: str) -> None:
        try:
            self.fs.delete_file(self._path(name))
        except FileNotFoundError:
            pass

    def local_dir(self) -> Path | None:
        """The folder on this machine's disk, or None for an object store."""
        return None if self.remote else Path(self.root)

    def sub(self, folder: str) -> "RunStorage":
        return RunStorage(self.where(folder))

    def check_writable(self) -> None:
        """Raise OSError unless a file can be written here (the probe is removed again)."""
        probe = f".write-probe-{os.getpid()}"
        if not self.remote:
            Path(self.root).mkdir(parents=True, exist_ok=True)
        self.write(probe, b"")
        self.delete(probe)
