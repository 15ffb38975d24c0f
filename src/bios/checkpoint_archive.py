"""Safe extraction of a downloaded checkpoint archive (a tar, plain or gzip-compressed).

`extract_archive` checks every member before writing anything and refuses the whole archive
(`UnsafeArchiveError`, naming the member) if one of them has an absolute path, a `..`
component, a name outside letters, digits, `.`, `_`, `-` and `/`, is a symlink, hardlink,
device or fifo, repeats an earlier name (also differing only in case, which would collide on
case-insensitive file systems), or if the archive holds too many members or bytes. It then
extracts with tarfile's `filter="data"` as a second line of defence, into a temporary directory
beside the destination, and renames that into place: on any failure nothing is left behind.

Stdlib only (no torch, no HTTP).
"""

from __future__ import annotations

import os
import re
import shutil
import tarfile
import tempfile
from collections.abc import Iterable
from pathlib import Path, PurePosixPath

from bios.exceptions import UnsafeArchiveError

__all__ = ["DEFAULT_MAX_ARCHIVE_BYTES", "MAX_MEMBERS", "check_destination", "check_members",
           "extract_archive"]

DEFAULT_MAX_ARCHIVE_BYTES = 64 * 1024**3  # uncompressed; a rank-256 LoRA of a 70B model fits
MAX_MEMBERS = 10_000
MAX_NAME_CHARS = 1024
_COMPONENT_RE = re.compile(r"^[A-Za-z0-9._-]{1,255}$")


def _member_name(member: tarfile.TarInfo) -> str | None:
    """The member's normalized relative name (a leading "./" dropped), None for the archive
    root ("." or "./"); raises UnsafeArchiveError for a name that may not be extracted."""
    raw = member.name
    if not raw or len(raw) > MAX_NAME_CHARS:
        raise UnsafeArchiveError(f"archive member {raw!r} has an empty or too long name", raw)
    if raw.startswith(("/", "\\")) or re.match(r"^[A-Za-z]:", raw):
        raise UnsafeArchiveError(f"archive member {raw!r} has an absolute path", raw)
    parts = raw.split("/")
    while parts and parts[0] == ".":
        parts = parts[1:]
    if parts and parts[-1] == "" and member.isdir():  # "dir/"
        parts = parts[:-1]
    if not parts:
        return None
    for part in parts:
        if part == "..":
            raise UnsafeArchiveError(f"archive member {raw!r} has a '..' component", raw)
        if part in ("", ".") or not _COMPONENT_RE.fullmatch(part):
            raise UnsafeArchiveError(
                f"archive member {raw!r} has a name with characters other than letters, "
                "digits, '.', '_', '-' and '/' separators", raw)
    return "/".join(parts)


def check_members(members: Iterable[tarfile.TarInfo],
                  max_bytes: int = DEFAULT_MAX_ARCHIVE_BYTES) -> list[tarfile.TarInfo]:
    """Check an archive's members (see the module docstring); return those to extract (the
    archive root entry, if any, left out), or raise UnsafeArchiveError naming the first
    offending member."""
    out: list[tarfile.TarInfo] = []
    seen: dict[str, str] = {}  # casefolded name -> name
    files: set[str] = set()
    total = 0
    for count, m in enumerate(members, 1):
        if count > MAX_MEMBERS:
            raise UnsafeArchiveError(f"the archive has more than {MAX_MEMBERS} members "
                                     f"(at {m.name!r})", m.name)
        name = _member_name(m)
        if m.issym() or m.islnk():
            raise UnsafeArchiveError(f"archive member {m.name!r} is a "
                                     f"{'symlink' if m.issym() else 'hardlink'} (to "
                                     f"{m.linkname!r}); links are never extracted", m.name)
        if not (m.isreg() or m.isdir()):
            raise UnsafeArchiveError(f"archive member {m.name!r} is a device, fifo or other "
                                     "special file; only regular files and directories are "
                                     "extracted", m.name)
        if name is None:
            if not m.isdir():
                raise UnsafeArchiveError(f"archive member {m.name!r} is not a file name", m.name)
            continue
        key = name.casefold()
        if key in seen:
            raise UnsafeArchiveError(f"archive member {m.name!r} repeats an earlier member "
                                     f"({seen[key]!r})", m.name)
        seen[key] = name
        parents = PurePosixPath(name).parents
        if any(str(p).casefold() in files for p in parents):
            raise UnsafeArchiveError(f"archive member {m.name!r} lies under a member that is a "
                                     "file", m.name)
        if m.isreg():
            files.add(key)
            total += m.size
            if total > max_bytes:
                raise UnsafeArchiveError(f"archive member {m.name!r} takes the archive past "
                                         f"the limit of {max_bytes} bytes uncompressed "
                                         "(max_bytes)", m.name)
        out.append(m)
    return out


def extract_archive(archive_path: str | os.PathLike[str], dest_dir: str | os.PathLike[str], *,
                    max_bytes: int = DEFAULT_MAX_ARCHIVE_BYTES) -> Path:
    """Extract a checkpoint archive safely into `dest_dir` (which must not exist, or be empty).

    Args:
        archive_path: a tar file, uncompressed or gzip/bz2/xz-compressed.
        dest_dir: the directory to create; it holds the archive's files afterwards.
        max_bytes: the most bytes the extracted files may add up to.

    Returns:
        `dest_dir` as an absolute Path.

    Raises:
        UnsafeArchiveError: a member may not be extracted (the error names it); nothing was
            written.
        FileExistsError: `dest_dir` exists and is not an empty directory.
        tarfile.TarError: the file is not a readable tar archive.
    """
    dest = Path(dest_dir).expanduser().absolute()
    check_destination(dest)
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{dest.name}.", suffix=".partial", dir=dest.parent))
    try:
        with tarfile.open(archive_path, "r:*") as tar:
            members = check_members(tar, max_bytes)  # reads headers one by one
            tar.extractall(tmp, members=members, filter="data")
        for path in tmp.rglob("*"):  # defence in depth: only what we allowed came out
            if path.is_symlink() or not (path.is_file() or path.is_dir()):
                raise UnsafeArchiveError(f"extraction produced {path.name!r}, which is not a "
                                         "regular file or directory", path.name)
        os.chmod(tmp, 0o755)  # mkdtemp made it 0700; members get the tar's (data-filtered) modes
        check_destination(dest)
        if dest.exists():
            dest.rmdir()  # empty, checked above
        os.rename(tmp, dest)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return dest


def check_destination(dest: Path) -> None:
    """Raise FileExistsError unless `dest` is absent or an empty directory (not a symlink)."""
    if dest.is_symlink() or (dest.exists() and (not dest.is_dir() or any(dest.iterdir()))):
        raise FileExistsError(f"{dest} already exists and is not an empty directory; "
                              "extract into a new directory")

