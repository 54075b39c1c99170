"""The tar streams of the ``/files`` routes, with the standard library's :mod:`tarfile`.

Nothing here writes to the host's disk: an archive from the daemon is read in memory, and its
names are checked (no absolute path, no ``..``) before anything is taken from it.
"""

from __future__ import annotations

import io
import posixpath
import tarfile
import time

from .errors import NanoclawError


def split_guest_path(path: str) -> tuple[str, str]:
    """``/dir/name`` as ``("/dir", "name")``; the guest path must be absolute and name a file."""
    if not path.startswith("/"):
        raise NanoclawError(f"the path in the VM must be absolute: {path!r}")
    parts = [p for p in path.split("/") if p]
    if not parts or any(p in (".", "..") for p in parts):
        raise NanoclawError(f"the path in the VM must name a file, without . or ..: {path!r}")
    return "/" + "/".join(parts[:-1]), parts[-1]


def one_file(name: str, data: bytes, mode: int) -> bytes:
    """An uncompressed tar holding the regular file ``name`` with ``data``."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tar:
        info = tarfile.TarInfo(name)
        info.size = len(data)
        info.mode = mode & 0o7777
        info.mtime = int(time.time())
        tar.addfile(info, io.BytesIO(data))
    return buf.getvalue()


def check_member_name(name: str) -> None:
    """Refuses a member name that is absolute or climbs with ``..``."""
    if name.startswith("/") or "\\" in name or "\0" in name:
        raise NanoclawError(f"the daemon's archive holds an unsafe name: {name!r}")
    if any(part == ".." for part in name.split("/")):
        raise NanoclawError(f"the daemon's archive holds an unsafe name: {name!r}")


def read_one_file(archive: bytes, name: str) -> bytes:
    """The bytes of the regular file ``name`` in ``archive`` (a ``GET /files`` answer for one
    file, whose entry is named from the path's last component). Every member name is checked
    first; a folder, a link or a missing entry is an error."""
    try:
        with tarfile.open(fileobj=io.BytesIO(archive), mode="r:") as tar:
            members = tar.getmembers()
            for m in members:
                check_member_name(m.name)
            wanted = [m for m in members if posixpath.normpath(m.name) == name]
            if not wanted:
                raise NanoclawError(f"the daemon's archive has no entry {name!r}")
            member = wanted[-1]
            if not member.isreg():
                kind = "a folder" if member.isdir() else "not a regular file"
                raise NanoclawError(f"{name!r} in the VM is {kind}")
            f = tar.extractfile(member)
            if f is None:
                raise NanoclawError(f"cannot read {name!r} from the daemon's archive")
            return f.read()
    except (tarfile.TarError, EOFError, OSError) as e:
        raise NanoclawError(f"the daemon's archive is malformed or cut short: {e}") from None
