"""Safe extraction of checkpoint archives (no server): malicious tars are refused, naming the
member, with nothing written outside the destination and no partial destination left; good
tars extract. Also the pure reading of the server's `.../archive` answer."""

from __future__ import annotations

import io
import tarfile
from datetime import UTC, datetime, timedelta
from pathlib import Path

import httpx
import pytest
from fake_server import fast_retries

import bios
from bios.checkpoint_archive import MAX_MEMBERS, extract_archive
from bios.exceptions import BiosError, PermissionDeniedError, UnsafeArchiveError
from bios.rest_client import archive_url_from_response

GOOD = {"adapter_config.json": b'{"peft_type": "LORA"}\n',
        "adapter_model.safetensors": bytes(range(256)) * 40}


def member(name: str, data: bytes = b"", type_: bytes = tarfile.REGTYPE,
           linkname: str = "") -> tuple[tarfile.TarInfo, bytes]:
    info = tarfile.TarInfo(name)
    info.type = type_
    info.linkname = linkname
    info.mode = 0o644
    info.size = len(data) if type_ == tarfile.REGTYPE else 0
    return info, data


def write_tar(path: Path, members: list[tuple[tarfile.TarInfo, bytes]],
              mode: str = "w") -> Path:
    with tarfile.open(path, mode, format=tarfile.PAX_FORMAT) as tar:
        for info, data in members:
            tar.addfile(info, io.BytesIO(data) if info.isreg() else None)
    return path


def good_members(prefix: str = "") -> list[tuple[tarfile.TarInfo, bytes]]:
    return [member(prefix + name, data) for name, data in GOOD.items()]


def files_under(root: Path) -> set[str]:
    return {str(p.relative_to(root)) for p in root.rglob("*")}


@pytest.fixture
def place(tmp_path: Path) -> tuple[Path, Path]:
    """(archive dir, dest): dest's parent starts empty, so anything left behind shows."""
    (tmp_path / "archives").mkdir()
    (tmp_path / "out").mkdir()
    return tmp_path / "archives", tmp_path / "out" / "dest"


# ----------------------------------------------------------------------------- good archives


@pytest.mark.parametrize("mode,prefix", [("w", ""), ("w:gz", ""), ("w", "./")])
def test_a_good_archive_extracts(place: tuple[Path, Path], mode: str, prefix: str) -> None:
    adir, dest = place
    members = good_members(prefix)
    if prefix:
        members.insert(0, member(".", type_=tarfile.DIRTYPE))
    members += [member("sub", type_=tarfile.DIRTYPE), member("sub/notes.txt", b"hi")]
    archive = write_tar(adir / "ok.tar", members, mode)
    assert extract_archive(archive, dest) == dest
    for name, data in GOOD.items():
        assert (dest / name).read_bytes() == data
    assert (dest / "sub" / "notes.txt").read_bytes() == b"hi"
    assert files_under(dest) == set(GOOD) | {"sub", "sub/notes.txt"}
    assert sorted(p.name for p in dest.parent.iterdir()) == ["dest"]  # no temp dir left


def test_an_existing_empty_destination_is_fine_a_non_empty_one_is_not(
        place: tuple[Path, Path]) -> None:
    adir, dest = place
    archive = write_tar(adir / "ok.tar", good_members())
    dest.mkdir()
    extract_archive(archive, dest)
    assert sorted(p.name for p in dest.iterdir()) == sorted(GOOD)
    with pytest.raises(FileExistsError, match="not an empty directory"):
        extract_archive(archive, dest)
    assert sorted(p.name for p in dest.iterdir()) == sorted(GOOD)  # untouched


# ----------------------------------------------------------------------------- bad archives


def evil_cases(tmp_path: Path) -> dict[str, tuple[list[tuple[tarfile.TarInfo, bytes]], str]]:
    """name -> (members, the offending member's name)."""
    outside = str(tmp_path / "pwned")
    return {
        "dotdot": ([member("../pwned", b"x")], "../pwned"),
        "dotdot-nested": ([member("a/../../pwned", b"x")], "a/../../pwned"),
        "dotdot-after-good": ([*good_members(), member("../../pwned", b"x")], "../../pwned"),
        "absolute": ([member(outside, b"x")], outside),
        "windows-absolute": ([member("C:/pwned", b"x")], "C:/pwned"),
        "symlink": ([member("adapter_model.safetensors", type_=tarfile.SYMTYPE,
                            linkname=outside)], "adapter_model.safetensors"),
        "symlink-relative": ([member("link", type_=tarfile.SYMTYPE, linkname="../pwned")],
                             "link"),
        "hardlink": ([*good_members(), member("hard", type_=tarfile.LNKTYPE,
                                               linkname="adapter_config.json")], "hard"),
        "fifo": ([member("pipe", type_=tarfile.FIFOTYPE)], "pipe"),
        "char-device": ([member("null", type_=tarfile.CHRTYPE)], "null"),
        "block-device": ([member("sda", type_=tarfile.BLKTYPE)], "sda"),
        "duplicate": ([*good_members(), member("adapter_config.json", b"{}")],
                      "adapter_config.json"),
        "duplicate-case": ([member("weights.bin", b"1"), member("WEIGHTS.bin", b"2")],
                           "WEIGHTS.bin"),
        "duplicate-dot-slash": ([member("a.json", b"1"), member("./a.json", b"2")],
                                "./a.json"),
        "under-a-file": ([member("a", b"1"), member("a/b", b"2")], "a/b"),
        "non-ascii": ([member("caf\u00e9.json", b"x")], "caf\u00e9.json"),
        "newline": ([member("a\nb", b"x")], "a\nb"),
        "space": ([member("a b", b"x")], "a b"),
        "backslash": ([member("a\\..\\..\\pwned", b"x")], "a\\..\\..\\pwned"),
        "empty-component": ([member("a//b", b"x")], "a//b"),
        "oversized": ([*good_members(), member("big.bin", b"\0" * 20_000)], "big.bin"),
    }


CASES = list(evil_cases(Path("/x")))


@pytest.mark.parametrize("case", CASES)
def test_a_malicious_archive_is_refused_naming_the_member(tmp_path: Path, case: str) -> None:
    members, offender = evil_cases(tmp_path)[case]
    (tmp_path / "archives").mkdir()
    out = tmp_path / "out"
    out.mkdir()
    archive = write_tar(tmp_path / "archives" / "evil.tar", members)
    before = files_under(tmp_path)
    with pytest.raises(UnsafeArchiveError) as err:
        extract_archive(archive, out / "dest", max_bytes=15_000)
    assert err.value.member == offender
    assert repr(offender) in str(err.value)
    assert isinstance(err.value, ValueError) and isinstance(err.value, BiosError)
    assert files_under(tmp_path) == before  # nothing outside, no partial dest, no temp dir
    assert not (tmp_path / "pwned").exists() and not (tmp_path / "out" / "dest").exists()


def test_too_many_members_are_refused(place: tuple[Path, Path]) -> None:
    adir, dest = place
    archive = write_tar(adir / "many.tar",
                        [member(f"f{i}", b"") for i in range(MAX_MEMBERS + 1)])
    with pytest.raises(UnsafeArchiveError, match="more than"):
        extract_archive(archive, dest)
    assert list(dest.parent.iterdir()) == []


def test_a_file_that_is_not_a_tar_leaves_nothing(place: tuple[Path, Path]) -> None:
    adir, dest = place
    junk = adir / "junk.tar"
    junk.write_bytes(b"not a tar at all" * 100)
    with pytest.raises(tarfile.TarError):
        extract_archive(junk, dest)
    assert list(dest.parent.iterdir()) == []


# ----------------------------------------------------------------------------- archive URLs


def _response(status: int, headers: dict[str, str], body: bytes = b"") -> httpx.Response:
    request = httpx.Request("GET", "http://h:8000/api/v1/training_runs/r/checkpoints/w/n/archive")
    return httpx.Response(status, headers=headers, content=body, request=request)


def test_archive_url_from_a_redirect_and_from_json() -> None:
    r = _response(302, {"Location": "/api/v1/archives/tok",
                        "Expires": "Wed, 21 Oct 2037 07:28:00 GMT"})
    got = archive_url_from_response(r)
    assert got.url == "http://h:8000/api/v1/archives/tok"
    assert got.expires == datetime(2037, 10, 21, 7, 28, tzinfo=UTC)

    now = datetime(2030, 1, 1, tzinfo=UTC)
    got = archive_url_from_response(_response(302, {"Location": "https://cdn/x.tar"}), now)
    assert got.url == "https://cdn/x.tar" and got.expires == now + timedelta(minutes=15)

    body = b'{"url": "https://cdn/y.tar", "expires": "2030-01-01T00:15:00Z"}'
    got = archive_url_from_response(_response(200, {"content-type": "application/json"}, body))
    assert got.url == "https://cdn/y.tar" and got.expires == now + timedelta(minutes=15)


# ----------------------------------------------------------------------------- SDK download


def tar_bytes(members: list[tuple[tarfile.TarInfo, bytes]]) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tar:
        for info, data in members:
            tar.addfile(info, io.BytesIO(data) if info.isreg() else None)
    return buf.getvalue()


class ArchiveHost:
    """A mock API (302 to a signed URL on another host) and file host, with scripted answers."""

    SIGNED = "http://files.test/dl/SECRET-TOKEN"

    def __init__(self, answers: list[httpx.Response]) -> None:
        self.answers = answers
        self.seen: list[httpx.Request] = []

    def __call__(self, request: httpx.Request) -> httpx.Response:
        self.seen.append(request)
        if request.url.host == "api.test":
            assert request.headers["x-api-key"] == "k-123"
            assert request.url.path == ("/api/v1/training_runs/r:train:0/checkpoints/"
                                        "sampler_weights/ck/archive")
            return httpx.Response(302, headers={"Location": self.SIGNED,
                                                "Expires": "Wed, 21 Oct 2037 07:28:00 GMT"})
        assert "x-api-key" not in request.headers  # the key never goes to the signed URL
        return self.answers.pop(0)


def sdk_rest(host: ArchiveHost) -> bios.RestClient:
    service = bios.ServiceClient(base_url="http://api.test", api_key="k-123",
                                 http_transport=httpx.MockTransport(host))
    service._transport.policy = fast_retries()
    return service.create_rest_client()


PATH = "bios://r:train:0/sampler_weights/ck"


def test_sdk_download_retries_a_5xx_and_extracts(tmp_path: Path) -> None:
    good = tar_bytes(good_members())
    host = ArchiveHost([httpx.Response(503), httpx.Response(200, content=good)])
    rest = sdk_rest(host)
    got = rest.get_checkpoint_archive_url_from_tinker_path(PATH)
    assert got.url == ArchiveHost.SIGNED and got.expires.year == 2037
    dest = rest.download_checkpoint_archive_from_tinker_path(PATH, tmp_path / "out" / "ck")
    assert dest == tmp_path / "out" / "ck"
    assert {n: (dest / n).read_bytes() for n in GOOD} == GOOD
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["ck"]  # no temp file
    assert [r.url.host for r in host.seen] == ["api.test"] * 2 + ["files.test"] * 2


def test_sdk_download_of_a_malicious_or_refused_archive_leaves_nothing(tmp_path: Path) -> None:
    evil = tar_bytes([*good_members(), member("../pwned", b"x")])
    rest = sdk_rest(ArchiveHost([httpx.Response(200, content=evil)]))
    with pytest.raises(UnsafeArchiveError, match="pwned"):
        rest.download_checkpoint_archive_from_tinker_path(PATH, tmp_path / "out" / "ck")
    assert list((tmp_path / "out").iterdir()) == [] and not (tmp_path / "pwned").exists()

    big = tar_bytes([member("adapter_model.safetensors", b"\0" * 5000)])
    rest = sdk_rest(ArchiveHost([httpx.Response(200, content=big)]))
    with pytest.raises(UnsafeArchiveError, match="limit of 1000 bytes"):
        rest.download_checkpoint_archive_from_tinker_path(PATH, tmp_path / "out" / "ck",
                                                          max_bytes=1000)
    assert list((tmp_path / "out").iterdir()) == []

    expired = httpx.Response(403, json={"detail": "this archive URL expired at ..."})
    rest = sdk_rest(ArchiveHost([expired]))
    with pytest.raises(PermissionDeniedError, match="expired") as err:
        rest.download_checkpoint_archive_from_tinker_path(PATH, tmp_path / "out" / "ck")
    assert "SECRET-TOKEN" not in str(err.value)  # the credential stays out of messages
    assert list((tmp_path / "out").iterdir()) == []
