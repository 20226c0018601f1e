"""Where a run's files and a data set's shards live: a local directory or an object store (s3://bucket/prefix).

Both go through a pyarrow filesystem, the layer Ray Train uses for its own storage too: `LocalFileSystem` for
paths, `S3FileSystem` for s3:// locations, which reach any S3 API (AWS, MinIO, Ceph, SeaweedFS, GCS's
interoperability endpoint). The endpoint and credentials come only from the standard variables, never from
settings: AWS_ENDPOINT_URL_S3 or AWS_ENDPOINT_URL (empty: AWS itself), AWS_ACCESS_KEY_ID,
AWS_SECRET_ACCESS_KEY, AWS_SESSION_TOKEN, AWS_REGION or AWS_DEFAULT_REGION; the Ray launcher forwards them to the
workers.

Every command checks an s3:// location's bucket and keys before it writes (`check_bucket`: StoreError, one line,
exit 2); only `data synth/convert --out` create a missing bucket. During the work, a store that does not answer
(or answers only that it is unavailable) is waited for, up to run.storage_timeout_s with a line about every 10 s
(`waiting_for_store`), then StoreUnreachable: one line, exit 1.
"""

from __future__ import annotations

import functools
import io
import json
import os
import random
import re
import shutil
import sys
import time
from pathlib import Path
from urllib.parse import urlparse

from pyarrow import fs as pafs

from dcgan_dist.config import RunSection
from dcgan_dist.errors import RunError
from dcgan_dist.files import atomic_write

S3 = "s3://"
# The variables an S3 client needs here and in every Ray worker (values never printed or stored).
S3_ENV = (
    "AWS_ENDPOINT_URL",
    "AWS_ENDPOINT_URL_S3",
    "AWS_ACCESS_KEY_ID",
    "AWS_SECRET_ACCESS_KEY",
    "AWS_SESSION_TOKEN",
    "AWS_REGION",
    "AWS_DEFAULT_REGION",
)
REPORT_EVERY_S = 10.0  # while waiting for the store: a line this often


class StoreError(ValueError):
    """An object-store location that cannot be used as given: its bucket is missing or misnamed, the store refuses
    the keys, or nothing answers at the endpoint. The message is one line that names the store and what to check
    (never a secret); found before any work, so the commands exit 2."""


class StoreUnreachable(RunError):
    """The object store stopped answering during the work and did not answer again within the storage timeout
    (run.storage_timeout_s): one line, exit 1."""

    def __init__(self, message: str):
        # A DataLoader worker's exception reaches the training process as type(text of the worker's traceback)
        # (torch's ExceptionWrapper): its last line holds the message.
        if message.startswith("Caught ") and "\n" in message:
            message = message.rstrip().splitlines()[-1].partition(": ")[2] or message
        super().__init__(message)

    def __str__(self) -> str:
        return str(self.args[0])  # webdataset appends the URL (and stream) to an exception's args


_timeout_s: float = RunSection.storage_timeout_s  # set_timeout(cfg.run.storage_timeout_s) for a run
_gave_up = False  # once the store was waited for in vain, this process no longer waits (until it answers again)
_usable_buckets: set[tuple] = set()  # (store settings, bucket) checked in this process


def set_timeout(seconds: float) -> None:
    """How long this process waits for an object store that stops answering (run.storage_timeout_s); loader
    processes forked after this inherit it."""
    global _timeout_s
    _timeout_s = float(seconds)


def is_remote(location: str) -> bool:
    return location.startswith(S3)


def _store_settings() -> tuple[str, ...]:
    return tuple(os.environ.get(name, "") for name in S3_ENV)


def store_name() -> str:
    """The store the standard variables point at, as a user would recognise it (no credentials)."""
    env = dict(zip(S3_ENV, _store_settings()))
    endpoint = env["AWS_ENDPOINT_URL_S3"] or env["AWS_ENDPOINT_URL"]
    if "@" in endpoint:  # user:password@host: never shown
        parsed = urlparse(endpoint)
        endpoint = parsed._replace(netloc=parsed.netloc.rpartition("@")[2]).geturl()
    return endpoint or f"AWS S3 ({env['AWS_REGION'] or env['AWS_DEFAULT_REGION'] or 'us-east-1'})"


def _attempt_s(timeout_s: float) -> float:
    """The limit on one request's connecting and on its silence (5 s: a store that is alive sends a byte sooner;
    with the pause between tries, a waiting run reports about every REPORT_EVERY_S); a few fit in a short timeout."""
    return min(5.0, max(1.0, timeout_s / 6))


def s3_filesystem(sdk_attempts: int = 10, allow_bucket_creation: bool = False) -> pafs.S3FileSystem:
    """The object store the standard AWS variables describe (made once per process and setting).

    sdk_attempts: the AWS SDK's own tries of each request (its standard retry strategy: throttling, 5xx, no
    connection); RunStorage and ObjectReader pass 1 and wait for the store themselves, within the storage timeout.
    Buckets are never created implicitly (pyarrow's create_dir, which Ray Train calls, would otherwise):
    `check_bucket(create=True)` is the one way, for `data synth/convert --out`."""
    return _s3_filesystem(_store_settings(), _attempt_s(_timeout_s), sdk_attempts, allow_bucket_creation)


@functools.lru_cache(maxsize=8)
def _s3_filesystem(
    settings: tuple[str, ...], attempt_s: float, sdk_attempts: int, allow_bucket_creation: bool
) -> pafs.S3FileSystem:
    env = dict(zip(S3_ENV, settings))
    kwargs: dict = {"region": env["AWS_REGION"] or env["AWS_DEFAULT_REGION"] or "us-east-1"}
    endpoint = env["AWS_ENDPOINT_URL_S3"] or env["AWS_ENDPOINT_URL"]
    if endpoint:  # pyarrow does not read these variables itself
        parsed = urlparse(endpoint)
        kwargs.update(endpoint_override=parsed.netloc or parsed.path, scheme=parsed.scheme or "https")
    if env["AWS_ACCESS_KEY_ID"]:
        kwargs.update(
            access_key=env["AWS_ACCESS_KEY_ID"],
            secret_key=env["AWS_SECRET_ACCESS_KEY"],
            session_token=env["AWS_SESSION_TOKEN"] or None,
        )
    # allow_delayed_open: an object smaller than one part (metrics.jsonl, a sample grid, dataset.json) is one PUT
    # rather than a three-request multipart upload. request_timeout is curl's limit on a silent transfer (no byte
    # for that long: a frozen server), not on a whole upload.
    return pafs.S3FileSystem(
        allow_bucket_creation=allow_bucket_creation,
        allow_delayed_open=True,
        connect_timeout=attempt_s,
        request_timeout=attempt_s,
        retry_strategy=pafs.AwsStandardS3RetryStrategy(max_attempts=sdk_attempts),
        **kwargs,
    )


def filesystem(location: str, sdk_attempts: int = 10) -> tuple[pafs.FileSystem, str]:
    """(filesystem, path on it) of a local path or an s3://bucket/prefix location. For engines that use it
    directly (Ray Train, Tune) the SDK retries each request; see s3_filesystem."""
    if is_remote(location):
        return s3_filesystem(sdk_attempts), location[len(S3) :].rstrip("/")
    return pafs.LocalFileSystem(), str(Path(location).expanduser().absolute())


# pyarrow's S3 errors: "... AWS Error NETWORK_CONNECTION during HeadObject operation: curlCode: 7, Could not connect
# to server; Details: ..." or "... AWS Error UNKNOWN (HTTP status 503) during PutObject operation: ...".
_AWS_ERROR = re.compile(r"AWS Error (\w+)(?: \(HTTP status (-?\d+)\))? during (\w+) operation:? ?([^\n]*)")
# Errors that say the store is away or busy, not that the request is wrong: waited for.
_STORE_AWAY = {
    "NETWORK_CONNECTION",
    "SERVICE_UNAVAILABLE",
    "SLOW_DOWN",
    "THROTTLING",
    "INTERNAL_FAILURE",
    "REQUEST_TIMEOUT",
}


def _aws_error(exc: BaseException) -> tuple[str, int | None, str] | None:
    """(error name, HTTP status or None, the SDK's message) of a pyarrow S3 error, or None."""
    match = _AWS_ERROR.search(str(exc))
    if not match:
        return None
    return match.group(1), int(match.group(2)) if match.group(2) else None, match.group(4)


def store_away(exc: BaseException) -> bool:
    """The store did not answer (no connection, no response, silence) or answered that it is unavailable or busy:
    worth waiting for. A request it refused (keys, permissions, a missing object) is not."""
    error = _aws_error(exc) if isinstance(exc, OSError) else None
    if error is None:
        return False
    name, status, _ = error
    return name in _STORE_AWAY or (status is not None and (status == -1 or status == 429 or status >= 500))


def _reason(exc: BaseException) -> str:
    """What went wrong, short: curl's words for a connection problem, the SDK's error name otherwise."""
    error = _aws_error(exc)
    if error is None:
        return (str(exc).strip().splitlines() or [type(exc).__name__])[0][:200]
    name, status, message = error
    curl = re.match(r"curlCode: \d+, ([^;]+)", message)
    if curl:
        return curl.group(1)
    if status == -1:
        return "no response"
    return f"{name} (HTTP {status})" if status is not None else name


def store_refusal(exc: BaseException) -> str | None:
    """One line for an object store's refusal during the work (keys expired or revoked, permissions taken away, the
    bucket deleted), or None for an error that is not one: after the checks at the start, this is a failure of the
    run, whose newest checkpoint stays intact."""
    error = _aws_error(exc) if isinstance(exc, OSError) and not isinstance(exc, FileNotFoundError) else None
    if error is None or store_away(exc):
        return None
    request = str(exc).split(": AWS Error", 1)[0].strip()  # "When uploading object with key 'k' in bucket 'b'"
    return (
        f"the object store at {store_name()} refused a request ({request[:1].lower() + request[1:]}: {error[0]}"
        f"{'' if error[1] is None else f' (HTTP {error[1]})'}); check AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY, "
        "AWS_SESSION_TOKEN and the bucket's permissions, then run the same command again (a run resumes from "
        "its newest checkpoint)"
    )


def waiting_for_store(call, what: str, *args, **kwargs):
    """call(*args, **kwargs) (whole and idempotent: a PUT of a whole object, a listing, a ranged read), tried again
    while the object store is away (`store_away`), for up to the storage timeout from its first failure, with a
    line on stderr about every 10 s saying what it waits for; then StoreUnreachable. Any other error is raised at
    once. what: "writing s3://...", for those lines."""
    global _gave_up
    started, deadline, reported, attempt = time.monotonic(), None, None, 0
    while True:
        try:
            result = call(*args, **kwargs)
        except OSError as exc:
            if not store_away(exc):
                raise
            now = time.monotonic()
            if deadline is None:  # given up once already: this process does not wait a second time
                deadline = now + (0.0 if _gave_up else _timeout_s)
            if now >= deadline:
                _gave_up = True
                error = _aws_error(exc)
                silent = error is not None and (error[0] == "NETWORK_CONNECTION" or error[1] == -1)
                state = "did not answer" if silent else "answered only that it is unavailable"
                raise StoreUnreachable(
                    f"the object store at {store_name()} {state} for {now - started:.0f} s ({what}: {_reason(exc)}); "
                    "once it answers, run the same command again (a run resumes from its newest checkpoint)"
                ) from None
            if reported is None or now - reported >= REPORT_EVERY_S:
                reported = now
                sys.stderr.write(
                    f"waiting for the object store at {store_name()} ({what}): {_reason(exc)}; giving "
                    f"up in {deadline - now:.0f} s (run.storage_timeout_s)\n"
                )
                sys.stderr.flush()
            time.sleep(min(random.uniform(0.5, 1.0) * 2 ** min(attempt, 2), deadline - now))  # 0.5 s up to 4 s
            attempt += 1
        else:
            if reported is not None:
                sys.stderr.write(f"the object store at {store_name()} answers again ({what})\n")
                sys.stderr.flush()
            _gave_up = False
            return result


def _waits_for_store(verb: str, name_arg: int = 0):
    """A RunStorage method, through `waiting_for_store` when the storage is an object store. name_arg: which
    argument is the name the method acts on (for the lines that say what is waited for)."""

    def decorate(operation):
        @functools.wraps(operation)
        def call(self, *args, **kwargs):
            if not self.remote:
                return operation(self, *args, **kwargs)
            name = args[name_arg] if len(args) > name_arg else ""
            return waiting_for_store(operation, f"{verb} {self.where(name)}", self, *args, **kwargs)

        return call

    return decorate


# AWS's rules for bucket names (other S3 stores follow them): 3-63 lowercase letters, digits, dots and hyphens.
_BUCKET_NAME = re.compile(r"^(?!\d+\.\d+\.\d+\.\d+$)(?!.*\.\.)[a-z0-9][a-z0-9.-]{1,61}[a-z0-9]$")


def check_bucket(location: str, create: bool = False) -> bool:
    """Before any work: the bucket of an s3:// location exists and the store accepts this machine's keys for it
    (a HEAD of the bucket; a refusal is then explained by a listing, whose answer says which key is wrong).
    create: make a missing bucket (only `data synth/convert --out` do); returns whether it did. Raises StoreError.
    Object stores may create a bucket on a first PUT (SeaweedFS does), so commands call this before writing."""
    bucket = location[len(S3) :].split("/", 1)[0]
    if not bucket:
        raise StoreError(f"'{location}' names no bucket; write s3://BUCKET/PREFIX")
    key = (_store_settings(), bucket)
    if key in _usable_buckets:
        return False
    fs = s3_filesystem(sdk_attempts=3)  # the SDK's few quick tries: a wrong endpoint is reported in seconds
    try:
        found = fs.get_file_info(bucket).type != pafs.FileType.NotFound
        if not found and not _BUCKET_NAME.match(bucket):
            raise StoreError(
                f"'{bucket}' is not a valid bucket name (3-63 lowercase letters, digits, "
                "dots and hyphens, starting and ending with a letter or digit)"
            )
        if not found and not create:
            raise StoreError(
                f"bucket '{bucket}' does not exist at {store_name()}; create it first (e.g. "
                f"aws s3 mb s3://{bucket}) or correct the name: only `data synth/convert --out` create "
                "buckets"
            )
        if not found:
            s3_filesystem(sdk_attempts=3, allow_bucket_creation=True).create_dir(bucket)
    except OSError as exc:
        raise StoreError(_refusal(bucket, exc)) from None
    _usable_buckets.add(key)
    return not found


def _refusal(bucket: str, exc: OSError) -> str:
    """One line for a store that did not let this machine use `bucket`."""
    where = f"the object store at {store_name()}"
    if store_away(exc):
        return f"cannot reach {where} ({_reason(exc)}); check AWS_ENDPOINT_URL and that the store is running"
    error = _aws_error(exc)
    if error and error[0] == "ACCESS_DENIED":  # a HEAD's answer has no body: a listing says which key is wrong
        try:
            s3_filesystem(sdk_attempts=3).get_file_info(pafs.FileSelector(bucket, allow_not_found=True))
        except OSError as listing:
            error = _aws_error(listing) or error
    name = error[0] if error else ""
    key_id = os.environ.get("AWS_ACCESS_KEY_ID", "")
    keys = f"access key '{key_id}'" if key_id else "the credentials found (no AWS_ACCESS_KEY_ID)"
    if name == "INVALID_ACCESS_KEY_ID":
        return f"{where} does not know {keys}; check AWS_ACCESS_KEY_ID"
    if name == "SIGNATURE_DOES_NOT_MATCH":
        return f"{where} refused the secret key of {keys}; check AWS_SECRET_ACCESS_KEY"
    if error and error[1] == 301:  # AWS answers a request to another region's bucket with a redirect
        return f"bucket '{bucket}' is in another region than {store_name()}; set AWS_REGION to the bucket's region"
    if name == "NO_SUCH_BUCKET":
        return f"bucket '{bucket}' does not exist at {store_name()}; create it first or correct the name"
    if name == "ACCESS_DENIED":
        return (
            f"{where} denied {keys} access to bucket '{bucket}'; check AWS_ACCESS_KEY_ID, "
            "AWS_SECRET_ACCESS_KEY and the bucket's permissions"
        )
    return f"{where} refused access to bucket '{bucket}' ({_reason(exc)})"


class ObjectReader(io.RawIOBase):
    """An object read front to back in ranged GETs (`read_at`: each one whole and repeatable, so tried again when
    the store did not answer); wrap it in io.BufferedReader for large reads."""

    def __init__(self, location: str):
        fs, path = filesystem(location, sdk_attempts=1)
        self._location = location
        self._file = waiting_for_store(fs.open_input_file, f"reading {location}", path)
        self._position = 0

    def readable(self) -> bool:
        return True

    def readinto(self, buffer) -> int:
        data = waiting_for_store(self._file.read_at, f"reading {self._location}", len(buffer), self._position)
        buffer[: len(data)] = data
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
        self.fs, self.root = filesystem(location, sdk_attempts=1)  # waits for the store itself
        self.remote = is_remote(location)

    def __repr__(self) -> str:
        return f"RunStorage({self.location})"

    def where(self, name: str) -> str:
        """What to show a user: the path or URI of `name`."""
        return f"{self.location}/{name}" if name else self.location

    def _path(self, name: str) -> str:
        return f"{self.root}/{name}" if name else self.root

    @_waits_for_store("writing")
    def write(self, name: str, data: bytes) -> str:
        if self.remote:
            with self.fs.open_output_stream(self._path(name)) as f:
                f.write(data)
        else:
            atomic_write(self._path(name), data)
        return self.where(name)

    @_waits_for_store("reading")
    def read(self, name: str) -> bytes:
        with self.fs.open_input_stream(self._path(name)) as f:
            return f.read()

    @_waits_for_store("looking up")
    def exists(self, name: str) -> bool:
        return self.fs.get_file_info(self._path(name)).type != pafs.FileType.NotFound

    @_waits_for_store("looking up")
    def is_file(self, name: str) -> bool:
        return self.fs.get_file_info(self._path(name)).type == pafs.FileType.File

    @_waits_for_store("listing")
    def list(self, folder: str = "") -> list[tuple[str, bool]]:
        """(name, is a folder) of the entries directly in `folder` ('' = the root)."""
        path = self._path(folder)
        try:
            infos = self.fs.get_file_info(pafs.FileSelector(path, allow_not_found=True))
        except (NotADirectoryError, FileNotFoundError):
            return []
        return [(info.base_name, info.type == pafs.FileType.Directory) for info in infos]

    @_waits_for_store("writing", name_arg=1)
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

    @_waits_for_store("deleting")
    def delete(self, name: str) -> None:
        try:
            self.fs.delete_file(self._path(name))
        except FileNotFoundError:
            pass

    def local_dir(self) -> Path | None:
        """The folder on this machine's disk, or None for an object store."""
        return None if self.remote else Path(self.root)

    def sub(self, folder: str) -> RunStorage:
        return RunStorage(self.where(folder))

    def check_writable(self) -> None:
        """Raise OSError unless a file can be written here (the probe is removed again); StoreError for an object
        store whose bucket is missing (it is not created) or that refuses this machine's keys."""
        probe = f".write-probe-{os.getpid()}"
        if self.remote:
            check_bucket(self.location)
        else:
            Path(self.root).mkdir(parents=True, exist_ok=True)
        self.write(probe, b"")
        self.delete(probe)


class AppendLog:
    """A text file that grows by lines (metrics.jsonl), at a cost per append that does not grow with the file.

    On a disk: one file, appended to. In an object store (an object cannot be appended to, and rewriting it whole
    at every append costs the square of its length over a run): numbered segments, `<name>.segments/000001`,
    ..., each rewritten whole as lines are added until it holds SEGMENT_LINES of them, then the next one begins.
    `read()` returns the whole stream either way (an object `<name>` written by an older run comes first)."""

    SEGMENT_LINES = 10

    def __init__(self, storage: RunStorage, name: str):
        self.storage, self.name = storage, name
        self.folder = f"{name}.segments"
        self.segment, self.pending = 0, b""  # the current segment (0: none yet) and what it holds, lines
        self.pending_lines = 0

    def _segments(self) -> list[str]:
        names = sorted(n for n, is_dir in self.storage.list(self.folder) if not is_dir and n.isdigit())
        return [f"{self.folder}/{n}" for n in names]

    def read(self) -> bytes:
        parts = [self.storage.read(self.name)] if self.storage.is_file(self.name) else []
        if self.storage.remote:
            parts += [self.storage.read(name) for name in self._segments()]
        return b"".join(parts)

    def rewrite(self, data: bytes) -> None:
        """Replace the whole stream by `data` (a resume dropping what comes after its checkpoint)."""
        if not self.storage.remote:
            self.storage.write(self.name, data)
            return
        old = self._segments()
        had_legacy = self.storage.is_file(self.name)
        # The new first segment is written before anything is deleted: an interruption leaves more, never less.
        first = f"{self.folder}/{1:06d}"
        self.storage.write(first, data)
        for name in old:
            if name != first:
                self.storage.delete(name)
        if had_legacy:
            self.storage.delete(self.name)
        self.segment, self.pending, self.pending_lines = 1, data, SEGMENT_FULL if data else 0

    def append(self, data: bytes) -> None:
        """Add whole lines (`data` ends with a newline)."""
        if not self.storage.remote:
            path = Path(self.storage._path(self.name))
            path.parent.mkdir(parents=True, exist_ok=True)
            with open(path, "ab") as f:
                f.write(data)
                f.flush()
            return
        if not self.segment:  # the first append of this process: after the segments that are there
            segments = self._segments()
            self.segment = int(segments[-1].rpartition("/")[2]) + 1 if segments else 1
            self.pending, self.pending_lines = b"", 0
        elif self.pending_lines >= self.SEGMENT_LINES:
            self.segment, self.pending, self.pending_lines = self.segment + 1, b"", 0
        self.pending += data
        self.pending_lines += data.count(b"\n")
        self.storage.write(f"{self.folder}/{self.segment:06d}", self.pending)


SEGMENT_FULL = 1 << 30  # a segment that takes no more lines (one written whole by a resume)


RESULT_FILE = "result.json"


def write_result(location: str, result: dict) -> str:
    """<location>/result.json (a folder or s3://...): a command's outcome as JSON, for scripts and tests (what its
    console lines say in prose); returns where it went."""
    data = json.dumps(result, indent=1, default=str) + "\n"
    return RunStorage(location).write(RESULT_FILE, data.encode())
