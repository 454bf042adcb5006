"""App bundles: the signed, content-addressed archives the hub deploys to edge nodes.

A bundle is a gzip-compressed PAX tar of an app directory's regular files. `pack` makes it
deterministic (sorted paths, zero mtimes and owners, modes 0o644/0o755, gzip mtime 0),
so the same content always gives the same bytes and therefore the same
`digest = "sha256:<hex>"`: the digest names the bundle, and a node that already holds
a digest never fetches or unpacks it again.

A publisher signs, with ed25519, the statement `statement(name, version, digest)`
rather than the bare digest, so a signed bundle cannot be relabelled as another app or
another version. A node accepts a bundle only if the signature verifies under a trusted
key id *and* the bytes it received hash to the signed digest; it then extracts them with
`unpack`, which refuses anything but plain files and directories inside the destination.
Both sides share the same limits, so `pack` never makes a bundle that `unpack` refuses.
"""

from __future__ import annotations

import base64
import binascii
import gzip
import hashlib
import io
import os
import shutil
import tarfile
import tempfile
import zlib
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Literal

from cryptography.exceptions import InvalidSignature, UnsupportedAlgorithm
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from fogline.errors import ConfigError, TerminalError

BUNDLE_FILES_MAX = 10_000
BUNDLE_BYTES_MAX = 64 * 1024 * 1024  # packed (compressed) size
UNPACKED_BYTES_MAX = 256 * 1024 * 1024  # sum of the declared sizes of the files
MEMBER_OVERHEAD_BYTES_MAX = 8 * 1024  # tar header, PAX header and padding of one member
MANIFEST_NAME = "fogline.yaml"
SKIPPED_NAMES = frozenset({"__pycache__", ".git", ".venv", ".DS_Store"})
STATEMENT_PREFIX = "fogline-bundle/v1"

RejectReason = Literal[
    "unsigned", "unknown-key", "bad-signature", "digest-mismatch", "unsafe-archive", "too-large"
]


class BundleRejected(TerminalError):
    """A bundle a node must not run; `reason` is a short machine-readable code."""

    def __init__(self, reason: RejectReason, message: str) -> None:
        super().__init__(message)
        self.reason = reason


@dataclass(frozen=True)
class Bundle:
    data: bytes
    digest: str
    files: int


@dataclass(frozen=True)
class PublisherKey:
    key_id: str
    public_key: str  # base64 of the raw 32-byte ed25519 public key


def digest_of(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


def check_digest(data: bytes, digest: str) -> None:
    actual = digest_of(data)
    if actual != digest:
        raise BundleRejected("digest-mismatch", f"bundle digest is {actual}, expected {digest}")


def _app_files(app_dir: Path) -> list[tuple[str, Path]]:
    """The (archive name, path) of every file to pack, sorted by archive name."""
    found: list[tuple[str, Path]] = []
    pending = [app_dir]
    while pending:
        with os.scandir(pending.pop()) as entries:
            for entry in entries:
                if entry.name in SKIPPED_NAMES or entry.name.endswith(".pyc"):
                    continue
                path = Path(entry.path)
                if entry.is_symlink():
                    raise ConfigError(f"{path} is a symlink; a bundle holds regular files only")
                if entry.is_dir(follow_symlinks=False):
                    pending.append(path)
                elif entry.is_file(follow_symlinks=False):
                    found.append((path.relative_to(app_dir).as_posix(), path))
                else:
                    raise ConfigError(f"{path} is not a regular file or directory")
                if len(found) > BUNDLE_FILES_MAX:
                    raise ConfigError(f"{app_dir} has more than {BUNDLE_FILES_MAX} files")
    return sorted(found)


def pack(app_dir: Path) -> Bundle:
    """Archive `app_dir` deterministically: the bytes depend on file names, contents and
    executable bits only."""
    if not app_dir.is_dir():
        raise ConfigError(f"app directory {app_dir} does not exist")
    if not (app_dir / MANIFEST_NAME).is_file():
        raise ConfigError(f"{app_dir} has no {MANIFEST_NAME}")
    buffer = io.BytesIO()
    unpacked_bytes = 0
    try:
        files = _app_files(app_dir)
        with (
            gzip.GzipFile(filename="", fileobj=buffer, mode="wb", mtime=0) as compressed,
            tarfile.open(fileobj=compressed, mode="w", format=tarfile.PAX_FORMAT) as tar,
        ):
            for name, path in files:
                with path.open("rb") as source:
                    # The size comes from the open file, so it matches what is read.
                    status = os.fstat(source.fileno())
                    unpacked_bytes += status.st_size
                    if unpacked_bytes > UNPACKED_BYTES_MAX:
                        raise ConfigError(f"{app_dir} holds more than {UNPACKED_BYTES_MAX} bytes")
                    info = tarfile.TarInfo(name)
                    info.size = status.st_size
                    info.mode = 0o755 if status.st_mode & 0o111 else 0o644
                    info.mtime, info.uid, info.gid, info.uname, info.gname = 0, 0, 0, "", ""
                    tar.addfile(info, source)
                if buffer.tell() > BUNDLE_BYTES_MAX:
                    break  # refused below; stop compressing early
    except (OSError, UnicodeError) as exc:
        raise ConfigError(f"cannot pack {app_dir}: {exc}") from exc
    data = buffer.getvalue()
    if len(data) > BUNDLE_BYTES_MAX:
        raise ConfigError(f"bundle of {app_dir} is larger than {BUNDLE_BYTES_MAX} bytes")
    return Bundle(data=data, digest=digest_of(data), files=len(files))


def statement(name: str, version: str, digest: str) -> bytes:
    """The signed bytes; one field per line, so a field may not contain a newline."""
    for field in (name, version, digest):
        if "\n" in field or "\r" in field:
            raise ConfigError(f"bundle field {field!r} contains a line break")
    return f"{STATEMENT_PREFIX}\n{name}\n{version}\n{digest}\n".encode()


def sign(key: Ed25519PrivateKey, name: str, version: str, digest: str) -> str:
    return base64.b64encode(key.sign(statement(name, version, digest))).decode("ascii")


def verify(trusted: Mapping[str, str], key_id: str, signature: str,
           name: str, version: str, digest: str) -> None:
    """Accept only a signature by a trusted key over this exact name, version and digest."""
    if not signature or not key_id:
        raise BundleRejected("unsigned", f"bundle {name} {version} is not signed")
    if key_id not in trusted:
        raise BundleRejected("unknown-key", f"bundle {name} {version}: untrusted key {key_id}")
    public = Ed25519PublicKey.from_public_bytes(parse_public_key(trusted[key_id]))
    try:
        public.verify(base64.b64decode(signature, validate=True), statement(name, version, digest))
    except (binascii.Error, InvalidSignature) as exc:
        message = f"bad signature on bundle {name} {version} {digest} (key {key_id})"
        raise BundleRejected("bad-signature", message) from exc


def key_id_of(public_raw: bytes) -> str:
    return hashlib.sha256(public_raw).hexdigest()[:16]


def _publisher_key(key: Ed25519PrivateKey) -> PublisherKey:
    raw = key.public_key().public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    return PublisherKey(key_id=key_id_of(raw), public_key=base64.b64encode(raw).decode("ascii"))


def create_key(path: Path) -> PublisherKey:
    """Write a new private key to `path` (0600) and its public line to `path.pub`."""
    public_path = path.with_suffix(".pub")
    if public_path == path:
        raise ConfigError(f"{path} would be overwritten by its own public key")
    key = Ed25519PrivateKey.generate()
    pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                            serialization.NoEncryption())
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        # O_EXCL refuses an existing key atomically: a publisher key is never replaced.
        descriptor = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError as exc:
        raise ConfigError(f"key file {path} already exists") from exc
    with os.fdopen(descriptor, "wb") as file:
        os.fchmod(file.fileno(), 0o600)  # exactly 0600, whatever the umask
        file.write(pem)
        file.flush()
        os.fsync(file.fileno())
    publisher = _publisher_key(key)
    public_path.write_text(f"{publisher.key_id} {publisher.public_key}\n")
    return publisher


def load_key(path: Path) -> tuple[Ed25519PrivateKey, PublisherKey]:
    try:
        key = serialization.load_pem_private_key(path.read_bytes(), password=None)
    except (OSError, ValueError, TypeError, UnsupportedAlgorithm) as exc:
        raise ConfigError(f"cannot load private key {path}: {exc}") from exc
    if not isinstance(key, Ed25519PrivateKey):
        raise ConfigError(f"{path} is not an ed25519 private key")
    return key, _publisher_key(key)


def parse_public_key(text: str) -> bytes:
    try:
        raw = base64.b64decode(text.strip(), validate=True)
    except binascii.Error as exc:
        raise ConfigError(f"public key {text!r} is not base64: {exc}") from exc
    if len(raw) != 32:
        raise ConfigError(f"public key {text!r} is {len(raw)} bytes, expected 32")
    return raw


def read_public_key(path: Path) -> PublisherKey:
    try:
        fields = path.read_text().split()
    except (OSError, UnicodeError) as exc:
        raise ConfigError(f"cannot read public key {path}: {exc}") from exc
    if len(fields) != 2:
        raise ConfigError(f"{path} must hold one line '<key id> <base64 public key>'")
    raw = parse_public_key(fields[1])
    if key_id_of(raw) != fields[0]:
        raise ConfigError(f"{path}: key id {fields[0]} does not match its key {key_id_of(raw)}")
    return PublisherKey(key_id=fields[0], public_key=base64.b64encode(raw).decode("ascii"))


class _CappedStream:
    """A decompressed stream that refuses to go past `limit_bytes`: bounds a gzip bomb,
    including huge PAX headers that tarfile would read into memory whole."""

    def __init__(self, raw: gzip.GzipFile, limit_bytes: int) -> None:
        self._raw, self._limit_bytes = raw, limit_bytes

    def _check(self) -> None:
        if self._raw.tell() > self._limit_bytes:
            raise BundleRejected("too-large", f"bundle unpacks past {self._limit_bytes} bytes")

    def read(self, size: int = -1) -> bytes:
        room = self._limit_bytes - self._raw.tell() + 1
        data = self._raw.read(room if size < 0 or size > room else size)
        self._check()
        return data

    def seek(self, offset: int, whence: int = os.SEEK_SET) -> int:
        position = self._raw.seek(offset, whence)
        self._check()
        return position

    def tell(self) -> int:
        return self._raw.tell()

    def write(self, data: bytes) -> int:
        raise io.UnsupportedOperation("a bundle is read only")

    def close(self) -> None:
        pass  # the caller closes the gzip stream


def _check_members(tar: tarfile.TarFile) -> list[tarfile.TarInfo]:
    """Every member, once all are known to be safe: pure checks, nothing written yet."""
    members: list[tarfile.TarInfo] = []
    files: set[PurePosixPath] = set()
    directories: set[PurePosixPath] = set()
    unpacked_bytes = 0
    for member in tar:
        members.append(member)
        if len(members) > BUNDLE_FILES_MAX:
            raise BundleRejected("too-large", f"bundle has more than {BUNDLE_FILES_MAX} members")
        path, problem = PurePosixPath(member.name), ""
        if path.is_absolute() or ".." in path.parts or not path.parts:
            problem = "escapes the destination"
        elif member.issym() or member.islnk():
            problem = "is a link"
        elif not (member.isfile() or member.isdir()):
            problem = "is not a regular file or directory"
        elif path in files or (member.isfile() and path in directories):
            problem = "is repeated or both a file and a directory"
        if problem:
            raise BundleRejected("unsafe-archive", f"bundle member {member.name!r} {problem}")
        (files if member.isfile() else directories).add(path)
        directories.update(path.parents)
        unpacked_bytes += member.size
        if unpacked_bytes > UNPACKED_BYTES_MAX:
            raise BundleRejected("too-large", f"bundle declares over {UNPACKED_BYTES_MAX} bytes")
    if clash := files & directories:  # a file named like a directory seen after it
        raise BundleRejected("unsafe-archive", f"bundle member {min(clash)} is a file and a dir")
    return members


def _extraction_filter(member: tarfile.TarInfo, dest_path: str) -> tarfile.TarInfo:
    # The standard "data" filter is a second line of defence behind _check_members.
    member = tarfile.data_filter(member, dest_path)
    if member.isdir():
        return member.replace(mode=0o755)
    return member.replace(mode=0o755 if (member.mode or 0) & 0o111 else 0o644)


def unpack(data: bytes, dest: Path) -> None:
    """Extract a bundle into `dest`, which must not exist: all of it, or nothing."""
    if dest.exists():
        raise ConfigError(f"unpack destination {dest} already exists")
    if len(data) > BUNDLE_BYTES_MAX:
        raise BundleRejected("too-large", f"bundle is larger than {BUNDLE_BYTES_MAX} bytes")
    temporary: Path | None = None
    try:
        stream_bytes_max = UNPACKED_BYTES_MAX + BUNDLE_FILES_MAX * MEMBER_OVERHEAD_BYTES_MAX
        compressed = gzip.GzipFile(fileobj=io.BytesIO(data))
        stream = _CappedStream(compressed, stream_bytes_max)
        with compressed, tarfile.open(fileobj=stream, mode="r:") as tar:
            tar.errorlevel = 2  # every extraction or filter error raises
            members = _check_members(tar)
            temporary = Path(tempfile.mkdtemp(prefix=f".{dest.name}.tmp-", dir=dest.parent))
            tar.extractall(temporary, members=members, filter=_extraction_filter)
            while stream.read(64 * 1024):
                pass  # read to the end so gzip checks its CRC and trailing bytes
        os.chmod(temporary, 0o755)
        try:
            os.rename(temporary, dest)
        except OSError:
            if not dest.exists():
                raise
            # Another unpack of the same content-addressed bundle won the race.
        else:
            temporary = None
    except (tarfile.TarError, gzip.BadGzipFile, EOFError, zlib.error) as exc:
        raise BundleRejected("unsafe-archive", f"bundle is not a valid tar.gz: {exc}") from exc
    finally:
        if temporary is not None:
            shutil.rmtree(temporary, ignore_errors=True)
