"""Which shards `--input` names: a local path, a glob or a pyarrow-filesystem URI -> `Shard`s.

Output names (`Shard.stem`) are a one-to-one function of the shard's path relative to the input root, so
two shards never write one output. An `s3://` input is listed with bounded timeouts and retries, and an
input that cannot be listed fails in seconds with an error naming the URI and the likely cause.
"""

from __future__ import annotations

import fnmatch
import logging
import os
import posixpath
import re
import threading
import urllib.parse
from dataclasses import dataclass

import pyarrow.fs as pafs

from pipeline.raysession import where_resolved

log = logging.getLogger(__name__)

SHARD_EXTS = (".tar.gz", ".tgz", ".tar")  # listed by name; decompressed by their bytes (`read.open_shard`)

# Listing a remote input: a dead network or endpoint fails in seconds (the SDK defaults take minutes).
S3_CONNECT_TIMEOUT_S = 5.0
S3_REQUEST_TIMEOUT_S = 10.0  # no byte for this long fails a request (also bounds stalled reads)
S3_ATTEMPTS = 2
S3_REGION_TIMEOUT_S = 10.0


@dataclass(frozen=True)
class Shard:
    uri: str
    """The shard as the user would name it (path or URI); recorded in the outputs."""
    path: str
    """Path inside `filesystem`."""
    stem: str
    """Output file stem: `output_stem` of the path relative to the input root."""
    size: int


class InputUnavailable(FileNotFoundError):
    """A remote `--input` that cannot be listed (network, endpoint, credentials or a bad URI); a
    FileNotFoundError, so the CLI prints it and exits 2."""


def shard_ext(path: str) -> str | None:
    """The shard extension `path` ends with (`.tar`, `.tar.gz`, `.tgz`), or None."""
    return next((e for e in SHARD_EXTS if path.endswith(e)), None)


def _escape(part: str) -> str:
    """One path component with `%` escaped and no `__`, leading or trailing `_` left (`_` -> `%5F`)."""
    part = re.sub(r"(?<=_)_", "%5F", part.replace("%", "%25"))
    return re.sub(r"^_|_\Z", "%5F", part)


def output_stem(rel: str) -> str:
    """Output name of the shard at `rel` (relative to the input root), one-to-one: `x.tar` -> `x`,
    `a/b.tar` -> `a__b`, `a__b.tar` -> `a_%5Fb`, `a.tar.gz` -> `a.tar.gz` (only a plain `.tar` is cut)."""
    name = rel[: -len(".tar")] if rel.endswith(".tar") and not shard_ext(rel[: -len(".tar")]) else rel
    return "__".join(_escape(part) for part in name.split("/"))


def _check_unique(shards: list[Shard]) -> None:
    """Raise if two shards would write one output (`output_stem` is one-to-one: a bug if it happens)."""
    seen: dict[str, str] = {}
    for s in shards:
        if s.stem in seen:
            raise ValueError(f"shards {seen[s.stem]!r} and {s.uri!r} both map to output name {s.stem!r}")
        seen[s.stem] = s.uri


def _redact(uri: str) -> str:
    """`uri` without a password in its user info (`s3://KEY:SECRET@bucket` -> `s3://KEY:***@bucket`)."""
    return re.sub(r"^([a-z0-9+.-]+://[^/@:]*):[^/@]*@", r"\1:***@", uri, flags=re.I)


def _unavailable(uri: str, exc: BaseException | str) -> InputUnavailable:
    """The error for a remote input that could not be listed, with the likely cause."""
    text = str(exc)
    if "resolve host" in text:
        cause = "no network, or DNS cannot resolve the host"
    elif "curlCode: 28" in text or "imeout" in text or "no answer" in text:
        cause = "the endpoint does not answer: a wrong endpoint_override or region, a firewall, or no network"
    elif "curlCode: 7" in text:
        cause = "nothing listens at the endpoint: a wrong endpoint_override or scheme"
    elif re.search(r"AccessDenied|Forbidden|403|InvalidAccessKeyId|SignatureDoesNotMatch|credential", text):
        cause = (
            "the credentials are missing, wrong or not allowed to list it (AWS_* variables, profile, role)"
        )
    else:
        cause = "no network, a wrong endpoint or region, or missing credentials"
    return InputUnavailable(f"--input {_redact(uri)!r} cannot be listed: {cause} ({text})")


def _bucket_region(uri: str, bucket: str) -> str:
    """The bucket's region (what `FileSystem.from_uri` would look up), given up after a deadline."""
    box: dict[str, object] = {}

    def resolve() -> None:
        try:
            box["region"] = pafs.resolve_s3_region(bucket)
        except Exception as exc:
            box["error"] = exc

    worker = threading.Thread(target=resolve, name="s3-region", daemon=True)
    worker.start()
    worker.join(S3_REGION_TIMEOUT_S)
    if "region" in box:
        return str(box["region"])
    why = box.get("error") or f"no answer within {S3_REGION_TIMEOUT_S:g} s resolving the bucket's region"
    raise _unavailable(uri, why)


def _s3_filesystem(uri: str, query: str) -> tuple[pafs.S3FileSystem, str]:
    """`uri`'s S3 filesystem, its URI options kept, with bounded timeouts and retries; and the path."""
    opts = urllib.parse.parse_qs(query)
    endpoint_env = "AWS_ENDPOINT_URL_S3" in os.environ or "AWS_ENDPOINT_URL" in os.environ
    bucket = urllib.parse.urlsplit(uri).netloc.rpartition("@")[2]
    if bucket and "region" not in opts and "endpoint_override" not in opts and not endpoint_env:
        region = _bucket_region(uri, bucket)
        uri += ("&" if query else "?") + urllib.parse.urlencode({"region": region})
    fs, path = pafs.FileSystem.from_uri(uri)  # parses every URI option; no network once the region is set
    kwargs = fs.__reduce__()[1][0]  # those options as S3FileSystem keywords (its pickling)
    kwargs.update(
        connect_timeout=S3_CONNECT_TIMEOUT_S,
        request_timeout=S3_REQUEST_TIMEOUT_S,
        retry_strategy=pafs.AwsStandardS3RetryStrategy(max_attempts=S3_ATTEMPTS),
    )
    return pafs.S3FileSystem(**kwargs), path


def _split_query(spec: str) -> tuple[str, str]:
    """A URI's `?key=value&...` options apart from its path (a glob's `?` is not followed by `key=`)."""
    head, sep, tail = spec.rpartition("?")
    if "://" in spec and sep and re.match(r"[A-Za-z_]+=", tail):
        return head, tail
    return spec, ""


def _filesystem(base: str, query: str) -> tuple[pafs.FileSystem, str, str | None]:
    """(filesystem, path in it, prefix turning such a path back into a URI) of a local path or a URI."""
    if "://" not in base:
        return pafs.LocalFileSystem(), os.path.abspath(base), None
    uri = f"{base}?{query}" if query else base
    try:
        if base.startswith("s3://"):
            return (*_s3_filesystem(uri, query), "s3://")
        fs, path = pafs.FileSystem.from_uri(uri)
    except InputUnavailable:
        raise
    except (OSError, ValueError) as exc:  # ValueError: pyarrow's ArrowInvalid (a bad URI or option)
        raise _unavailable(uri, exc) from exc
    return fs, path, base[: len(base) - len(path)] if base.endswith(path) else None


def _find(fs, spec: str, base: str, base_path: str, glob_at: int) -> tuple[list[pafs.FileInfo], str] | None:
    """(files `spec` names, the root they are relative to), or None when nothing is there."""
    if glob_at >= 0:
        pattern = base_path.rstrip("/") + spec[len(base.rstrip("/")) :]
        entries = fs.get_file_info(pafs.FileSelector(base_path, recursive=True, allow_not_found=True))
        return [e for e in entries if e.is_file and fnmatch.fnmatch(e.path, pattern)], base_path
    info = fs.get_file_info(base_path)
    if info.type == pafs.FileType.Directory:
        entries = fs.get_file_info(pafs.FileSelector(base_path, recursive=True))
        return [e for e in entries if e.is_file], base_path
    if info.type == pafs.FileType.File:
        return [info], posixpath.dirname(base_path)
    return None


def list_shards(spec: str) -> tuple[pafs.FileSystem, list[Shard]]:
    """All shards named by `spec`: a file, a directory (recursive), a glob, or a URI of those."""
    path_spec, query = _split_query(spec)
    glob_at = min((path_spec.index(c) for c in "*?[" if c in path_spec), default=-1)
    base = path_spec if glob_at < 0 else path_spec[:glob_at].rpartition("/")[0] or "."
    fs, base_path, uri_prefix = _filesystem(base, query)
    try:
        found = _find(fs, path_spec, base, base_path, glob_at)
    except OSError as exc:
        if "://" not in spec:
            raise
        raise _unavailable(spec, exc) from exc
    if found is None:
        raise FileNotFoundError(
            f"--input {spec!r}: no such file, directory or glob match{where_resolved(spec)}"
        )
    files, root = found
    shards = [
        Shard(
            uri=f"{uri_prefix}{f.path}" if uri_prefix is not None else f.path,
            path=f.path,
            stem=output_stem(posixpath.relpath(f.path, root)),
            size=f.size or 0,
        )
        for f in files
        if shard_ext(f.path) is not None
    ]
    if len(files) > len(shards):
        log.info(
            "--input %s: skipped %d files that are not .tar/.tar.gz/.tgz", spec, len(files) - len(shards)
        )
    if not shards:
        raise FileNotFoundError(f"--input {spec!r}: no .tar, .tar.gz or .tgz shards found")
    _check_unique(shards)
    return fs, sorted(shards, key=lambda s: s.stem)
