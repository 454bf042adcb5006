"""Bundles: deterministic packing, signatures bound to name+version+digest, safe unpacking."""

from __future__ import annotations

import base64
import gzip
import io
import os
import tarfile
from pathlib import Path

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from fogline import bundle
from fogline.bundle import (
    BundleRejected,
    check_digest,
    create_key,
    digest_of,
    key_id_of,
    load_key,
    pack,
    parse_public_key,
    read_public_key,
    sign,
    statement,
    unpack,
    verify,
)
from fogline.errors import ConfigError

APP_FILES = {
    "fogline.yaml": b"name: demo\nversion: 1.0.0\n",
    "app/main.py": b"print('hello')\n",
    "app/util/helpers.py": b"X = 1\n",
    "data/blob.bin": bytes(range(256)) * 4,
}


def write_app(root: Path, files: dict[str, bytes] = APP_FILES) -> Path:
    for name, content in files.items():
        path = root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(content)
    return root


def read_tree(root: Path) -> dict[str, bytes]:
    return {p.relative_to(root).as_posix(): p.read_bytes()
            for p in sorted(root.rglob("*")) if p.is_file()}


def make_tar(*members: tuple[tarfile.TarInfo, bytes | None]) -> bytes:
    buffer = io.BytesIO()
    with gzip.GzipFile(fileobj=buffer, mode="wb") as compressed, \
            tarfile.open(fileobj=compressed, mode="w", format=tarfile.PAX_FORMAT) as tar:
        for info, content in members:
            if content is not None:
                info.size = len(content)
            tar.addfile(info, io.BytesIO(content) if content is not None else None)
    return buffer.getvalue()


def member(name: str, kind: bytes = tarfile.REGTYPE, linkname: str = "") -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.type, info.linkname = kind, linkname
    return info


@pytest.fixture
def app(tmp_path: Path) -> Path:
    return write_app(tmp_path / "app")


@pytest.fixture
def store(tmp_path: Path) -> Path:
    path = tmp_path / "store"
    path.mkdir()
    return path


def assert_refused(data: bytes, store: Path, reason: str) -> BundleRejected:
    dest = store / "out"
    with pytest.raises(BundleRejected) as caught:
        unpack(data, dest)
    assert caught.value.reason == reason
    assert not dest.exists()
    assert list(store.iterdir()) == []  # no temp dir left behind
    return caught.value


# pack


def test_pack_is_deterministic_whatever_mtimes_and_creation_order(tmp_path: Path,
                                                                  app: Path) -> None:
    copy = tmp_path / "copy"
    write_app(copy, dict(reversed(APP_FILES.items())))
    for path in copy.rglob("*"):
        os.utime(path, (1_000_000, 1_000_000))
    first, second = pack(app), pack(copy)
    assert first.data == second.data
    assert first.digest == second.digest == digest_of(first.data)
    assert first.files == len(APP_FILES)
    assert pack(app) == first


def test_changed_content_changes_the_digest(app: Path) -> None:
    before = pack(app)
    (app / "app/main.py").write_bytes(b"print('bye')\n")
    assert pack(app).digest != before.digest


def test_pack_writes_normalised_sorted_entries(app: Path) -> None:
    (app / "app/main.py").chmod(0o700)
    (app / "fogline.yaml").chmod(0o600)
    with tarfile.open(fileobj=io.BytesIO(pack(app).data), mode="r:gz") as tar:
        members = tar.getmembers()
    assert [m.name for m in members] == sorted(APP_FILES)
    assert all((m.mtime, m.uid, m.gid, m.uname, m.gname) == (0, 0, 0, "", "") for m in members)
    modes = {m.name: m.mode for m in members}
    assert modes["app/main.py"] == 0o755
    assert modes["fogline.yaml"] == 0o644


def test_pack_skips_caches_and_vcs(app: Path) -> None:
    write_app(app, {"app/__pycache__/main.cpython-311.pyc": b"x", "stale.pyc": b"x",
                    ".git/config": b"x", ".venv/bin/python": b"x", ".DS_Store": b"x"})
    assert pack(app).files == len(APP_FILES)


def test_pack_refuses_a_symlink(app: Path) -> None:
    (app / "link.py").symlink_to(app / "app/main.py")
    with pytest.raises(ConfigError, match=r"link\.py"):
        pack(app)


def test_pack_refuses_a_symlinked_directory(tmp_path: Path, app: Path) -> None:
    (tmp_path / "elsewhere").mkdir()
    (app / "lib").symlink_to(tmp_path / "elsewhere")
    with pytest.raises(ConfigError, match="lib"):
        pack(app)


def test_pack_refuses_a_fifo(app: Path) -> None:
    os.mkfifo(app / "pipe")
    with pytest.raises(ConfigError, match="pipe"):
        pack(app)


def test_pack_refuses_a_missing_directory_or_manifest(tmp_path: Path, app: Path) -> None:
    with pytest.raises(ConfigError, match="nowhere"):
        pack(tmp_path / "nowhere")
    (app / "fogline.yaml").unlink()
    with pytest.raises(ConfigError, match=r"fogline\.yaml"):
        pack(app)


def test_pack_refuses_too_many_files(app: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(bundle, "BUNDLE_FILES_MAX", len(APP_FILES) - 1)
    with pytest.raises(ConfigError, match="files"):
        pack(app)
    monkeypatch.setattr(bundle, "BUNDLE_FILES_MAX", len(APP_FILES))
    assert pack(app).files == len(APP_FILES)


def test_pack_refuses_too_many_bytes(app: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    (app / "noise.bin").write_bytes(os.urandom(64 * 1024))
    monkeypatch.setattr(bundle, "BUNDLE_BYTES_MAX", 16 * 1024)
    with pytest.raises(ConfigError, match="larger than"):
        pack(app)
    monkeypatch.setattr(bundle, "UNPACKED_BYTES_MAX", 1024)
    with pytest.raises(ConfigError, match="more than 1024 bytes"):
        pack(app)


# unpack


def test_round_trip(app: Path, store: Path) -> None:
    (app / "app/main.py").chmod(0o700)
    unpack(pack(app).data, store / "out")
    assert read_tree(store / "out") == APP_FILES
    assert (store / "out/app/main.py").stat().st_mode & 0o777 == 0o755
    assert (store / "out/fogline.yaml").stat().st_mode & 0o777 == 0o644
    assert (store / "out").stat().st_mode & 0o777 == 0o755
    assert [p.name for p in store.iterdir()] == ["out"]


def test_unpack_refuses_an_existing_destination(app: Path, store: Path) -> None:
    (store / "out").mkdir()
    with pytest.raises(ConfigError, match="exists"):
        unpack(pack(app).data, store / "out")


def test_unpack_accepts_explicit_directories(store: Path) -> None:
    data = make_tar((member("./app", tarfile.DIRTYPE), None), (member("app/a.py"), b"a"))
    unpack(data, store / "out")
    assert read_tree(store / "out") == {"app/a.py": b"a"}


@pytest.mark.parametrize("name", ["../evil", "app/../../evil", "/etc/evil", "", "."])
def test_unpack_refuses_paths_outside_the_destination(store: Path, name: str) -> None:
    data = make_tar((member("fogline.yaml"), b"x"), (member(name), b"evil"))
    assert_refused(data, store, "unsafe-archive")
    assert not (store.parent / "evil").exists()


@pytest.mark.parametrize("kind", [tarfile.SYMTYPE, tarfile.LNKTYPE])
def test_unpack_refuses_links(store: Path, kind: bytes) -> None:
    data = make_tar((member("fogline.yaml"), b"x"), (member("link", kind, "fogline.yaml"), None))
    assert "link" in str(assert_refused(data, store, "unsafe-archive"))


@pytest.mark.parametrize("kind", [tarfile.FIFOTYPE, tarfile.CHRTYPE, tarfile.BLKTYPE])
def test_unpack_refuses_special_files(store: Path, kind: bytes) -> None:
    data = make_tar((member("fogline.yaml"), b"x"), (member("dev", kind), None))
    assert "dev" in str(assert_refused(data, store, "unsafe-archive"))


def test_unpack_refuses_conflicting_paths(store: Path) -> None:
    repeated = make_tar((member("a"), b"1"), (member("a"), b"2"))
    assert_refused(repeated, store, "unsafe-archive")
    file_and_directory = make_tar((member("a/b"), b"1"), (member("a"), b"2"))
    assert_refused(file_and_directory, store, "unsafe-archive")


@pytest.mark.parametrize("payload", [b"", b"not a gzip file", gzip.compress(b"not a tar" * 100)])
def test_unpack_refuses_payloads_that_are_not_tar_gz(store: Path, payload: bytes) -> None:
    assert_refused(payload, store, "unsafe-archive")


def test_unpack_refuses_a_truncated_bundle(app: Path, store: Path) -> None:
    data = pack(app).data
    assert_refused(data[: len(data) // 2], store, "unsafe-archive")


def test_unpack_refuses_a_corrupt_checksum_or_trailing_bytes(app: Path, store: Path) -> None:
    data = pack(app).data
    flipped = data[:-8] + bytes([data[-8] ^ 1]) + data[-7:]  # the gzip CRC32 trailer
    assert "CRC" in str(assert_refused(flipped, store, "unsafe-archive"))
    assert_refused(data + b"trailing", store, "unsafe-archive")


def test_unpack_refuses_too_many_members(app: Path, store: Path,
                                         monkeypatch: pytest.MonkeyPatch) -> None:
    data = pack(app).data
    monkeypatch.setattr(bundle, "BUNDLE_FILES_MAX", len(APP_FILES) - 1)
    assert_refused(data, store, "too-large")


def test_unpack_refuses_too_many_declared_bytes(app: Path, store: Path,
                                                monkeypatch: pytest.MonkeyPatch) -> None:
    data = pack(app).data
    monkeypatch.setattr(bundle, "UNPACKED_BYTES_MAX", 100)
    assert_refused(data, store, "too-large")


def test_unpack_refuses_a_large_payload(app: Path, store: Path,
                                        monkeypatch: pytest.MonkeyPatch) -> None:
    data = pack(app).data
    monkeypatch.setattr(bundle, "BUNDLE_BYTES_MAX", len(data) - 1)
    assert_refused(data, store, "too-large")


def test_unpack_refuses_a_decompression_bomb_in_headers(store: Path,
                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    info = member("fogline.yaml")
    info.pax_headers = {"comment": "x" * 1_000_000}
    data = make_tar((info, b"x"))
    assert len(data) < 10_000
    monkeypatch.setattr(bundle, "MEMBER_OVERHEAD_BYTES_MAX", 8 * 1024)
    monkeypatch.setattr(bundle, "BUNDLE_FILES_MAX", 10)
    monkeypatch.setattr(bundle, "UNPACKED_BYTES_MAX", 1024)
    assert "unpacks past" in str(assert_refused(data, store, "too-large"))


# digests and signatures


def test_check_digest(app: Path) -> None:
    packed = pack(app)
    check_digest(packed.data, packed.digest)
    wrong = digest_of(b"other")
    with pytest.raises(BundleRejected) as caught:
        check_digest(packed.data, wrong)
    assert caught.value.reason == "digest-mismatch"
    assert wrong in str(caught.value) and packed.digest in str(caught.value)


def test_statement_binds_name_version_digest() -> None:
    assert statement("demo", "1.0", "sha256:ab") == b"fogline-bundle/v1\ndemo\n1.0\nsha256:ab\n"
    with pytest.raises(ConfigError):
        statement("demo\n1.0", "2.0", "sha256:ab")


@pytest.fixture
def publisher(tmp_path: Path) -> tuple[Ed25519PrivateKey, dict[str, str], str]:
    create_key(tmp_path / "keys/publisher.pem")
    key, public = load_key(tmp_path / "keys/publisher.pem")
    return key, {public.key_id: public.public_key}, public.key_id


def test_verify_accepts_a_good_signature(publisher: tuple[Ed25519PrivateKey, dict[str, str],
                                                          str]) -> None:
    key, trusted, key_id = publisher
    signature = sign(key, "demo", "1.0", "sha256:ab")
    base64.b64decode(signature, validate=True)
    verify(trusted, key_id, signature, "demo", "1.0", "sha256:ab")


def rejection(trusted: dict[str, str], key_id: str, signature: str,
              name: str = "demo", version: str = "1.0", digest: str = "sha256:ab") -> str:
    with pytest.raises(BundleRejected) as caught:
        verify(trusted, key_id, signature, name, version, digest)
    assert "demo" in str(caught.value)
    return caught.value.reason


def test_verify_rejections(publisher: tuple[Ed25519PrivateKey, dict[str, str], str]) -> None:
    key, trusted, key_id = publisher
    good = sign(key, "demo", "1.0", "sha256:ab")
    other = Ed25519PrivateKey.generate()
    assert rejection(trusted, key_id, "") == "unsigned"
    assert rejection(trusted, "", good) == "unsigned"
    assert rejection(trusted, "0123456789abcdef", good) == "unknown-key"
    assert rejection(trusted, key_id, sign(other, "demo", "1.0", "sha256:ab")) == "bad-signature"
    assert rejection(trusted, key_id, good, version="2.0") == "bad-signature"
    assert rejection(trusted, key_id, good, name="demo2") == "bad-signature"
    assert rejection(trusted, key_id, good, digest="sha256:cd") == "bad-signature"
    assert rejection(trusted, key_id, "not base64!") == "bad-signature"
    assert rejection(trusted, key_id, base64.b64encode(b"short").decode()) == "bad-signature"


# publisher keys


def test_create_key_writes_a_private_pem_and_a_public_line(tmp_path: Path) -> None:
    path = tmp_path / "deep/keys/publisher.pem"
    public = create_key(path)
    assert path.stat().st_mode & 0o777 == 0o600
    assert path.read_bytes().startswith(b"-----BEGIN PRIVATE KEY-----")
    line = path.with_suffix(".pub").read_text()
    assert line == f"{public.key_id} {public.public_key}\n"
    assert public.key_id == key_id_of(parse_public_key(public.public_key))
    assert len(public.key_id) == 16
    assert read_public_key(path.with_suffix(".pub")) == public
    _, loaded = load_key(path)
    assert loaded == public


def test_create_key_refuses_to_overwrite(tmp_path: Path) -> None:
    path = tmp_path / "publisher.pem"
    create_key(path)
    before = path.read_bytes()
    with pytest.raises(ConfigError, match="exists"):
        create_key(path)
    assert path.read_bytes() == before
    with pytest.raises(ConfigError):
        create_key(tmp_path / "publisher.pub")


def test_load_key_refuses_missing_and_foreign_keys(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"missing\.pem"):
        load_key(tmp_path / "missing.pem")
    (tmp_path / "garbage.pem").write_text("not a key")
    with pytest.raises(ConfigError, match=r"garbage\.pem"):
        load_key(tmp_path / "garbage.pem")
    ec_pem = ec.generate_private_key(ec.SECP256R1()).private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption())
    (tmp_path / "ec.pem").write_bytes(ec_pem)
    with pytest.raises(ConfigError, match="ed25519"):
        load_key(tmp_path / "ec.pem")


def test_malformed_public_keys_are_refused(tmp_path: Path) -> None:
    public = create_key(tmp_path / "publisher.pem")
    short = base64.b64encode(b"x" * 31).decode()
    cases = ["", public.public_key, f"{public.key_id} not-base64!",
             f"{public.key_id} {short}", f"0000000000000000 {public.public_key}",
             f"{public.key_id} {public.public_key} extra"]
    for text in cases:
        (tmp_path / "bad.pub").write_text(text + "\n")
        with pytest.raises(ConfigError):
            read_public_key(tmp_path / "bad.pub")
    with pytest.raises(ConfigError):
        read_public_key(tmp_path / "missing.pub")
    with pytest.raises(ConfigError):
        parse_public_key(short)
