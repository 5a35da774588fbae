"""Reading a small file that a user names (recipes, level databases): regular files only; writing
every output file through a temporary file renamed into place (:func:`write_file_atomically`), or
through a staging folder (:func:`make_staging_folder`); removing the temporary files and staging
folders that a killed process left (:func:`remove_stale_temporaries`)."""

from __future__ import annotations

import errno
import hashlib
import logging
import os
import re
import secrets
import shutil
import socket
import stat
from collections.abc import Callable

logger = logging.getLogger("obc_native")

# Every temporary name this module makes carries "<host>-<pid>-<token>": <host> 8 hex digits of
# the host name's SHA-256, <pid> the creating process, <token> 12 random hex digits. A name of that
# form whose host is this one and whose process is gone belongs to a write that was killed
# (kill -9, power loss) before it could clean up, and is removed by the next write into the folder.
_OWNER = r"(?P<host>[0-9a-f]{8})-(?P<pid>[1-9][0-9]{0,9})-[0-9a-f]{12}"
_STALE_FILE = re.compile(rf"\..*obc-{_OWNER}\.tmp(\.[^.]*)?")  # create_file_next_to's names
_STALE_FOLDER = re.compile(rf"\.obc-staging-{_OWNER}")  # make_staging_folder's names


def path_str(path, name: str = "path") -> str:
    """``path`` (str, bytes or os.PathLike) as a str: the one type rule of every file and folder
    argument, so that a path one function takes is taken by all. bytes are decoded as ``open``
    would (``os.fsdecode``). TypeError naming ``name`` for anything else. A NUL character is left
    to the caller's check (:func:`output_file_problem` / :func:`make_output_folder` report it in
    the caller's own error class; :func:`as_path` raises ValueError)."""
    try:
        path = os.fspath(path)
    except TypeError:
        raise TypeError(f"{name}: expected a str, bytes or os.PathLike, got {type(path).__name__}") from None
    return os.fsdecode(path) if isinstance(path, bytes) else path


def as_path(path, name: str = "path") -> str:
    """``path`` (str, bytes or os.PathLike) as a str (:func:`path_str`); TypeError / ValueError
    naming ``name`` for anything else or a path with a NUL (which C++ and the OS calls would cut
    short there)."""
    path = path_str(path, name)
    if "\0" in path:
        raise ValueError(f"{name}: expected a path without NUL characters, got {path!r}")
    return path


def read_regular_file(path: str) -> bytes:
    """The bytes of the regular file at ``path``.

    A FIFO, device, socket or directory raises ``ValueError`` before it is opened (opening a FIFO would block, a device might never end); the check is repeated on
    the descriptor, which is opened non-blocking, so a path swapped in between cannot block
    either. ``OSError`` when the file cannot be read. Callers turn ValueError into their own
    error class.
    """
    if not stat.S_ISREG(os.stat(path).st_mode):
        raise ValueError("not a regular file")
    fd = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_BINARY", 0))
    with os.fdopen(fd, "rb") as handle:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            raise ValueError("not a regular file")
        if hasattr(os, "set_blocking"):
            os.set_blocking(fd, True)
        return handle.read()


def create_file_next_to(path: str, prefix: str = ".", suffix: str = ".tmp") -> tuple[int, str]:
    """``(descriptor, name)`` of a new, empty file in ``path``'s folder, open for writing, to be
    renamed onto ``path`` once complete.

    Its name is ``prefix + "obc-<host>-<pid>-<token>" + suffix``; ``prefix`` should start with a
    dot and ``suffix`` with ``.tmp`` (then :func:`remove_stale_temporaries` recognises the file
    once its process is gone).

    Unlike ``tempfile.mkstemp`` (always mode 0600), the file is created with mode 0666 and the
    process umask applies, as for ``open(path, "w")``: a file renamed into place must be readable
    by whoever could read the file a plain write would have made. Created exclusively (``O_EXCL``),
    so an existing name, or a link placed there, is never written through. ``OSError`` when the
    folder cannot be written.
    """
    directory = os.path.dirname(os.path.abspath(path))
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_CLOEXEC", 0) | getattr(os, "O_BINARY", 0)
    for _ in range(100):
        name = os.path.join(directory, f"{prefix}obc-{_owner_tag()}{suffix}")
        try:
            return os.open(name, flags, 0o666), name
        except FileExistsError:
            continue
    raise FileExistsError(f"{directory}: no free temporary file name after 100 tries")


def output_file_problem(path: str) -> str | None:
    """Why no file can be written at ``path``, or None; checked before the work that makes it.

    ``path`` must not be a directory, its folder must exist and take a new file (tried: a file is
    created and removed again, so read-only folders and file systems show), and an existing
    ``path`` must be a regular file or a symbolic link (a FIFO or device is never replaced).
    The reason names ``path`` or its folder and says what to give instead. A NUL character, and a
    name too long for the file system once the temporary file's suffix is added (the probe file
    has that longest name), are reasons too: found here, not by the write after the work.
    """
    path = os.fsdecode(path)
    if "\0" in path:  # os.path.* answer False for it; open() would raise ValueError after the work
        return f"{path!r}: contains a NUL character; give a path without one"
    if os.path.isdir(path):
        return f"{path}: is a directory; give the name of the file to write"
    parent = os.path.dirname(os.path.abspath(path))
    if not os.path.exists(parent):
        return f"{path}: folder {parent} does not exist; create it first"
    if not os.path.isdir(parent):
        return f"{path}: {parent} is a file, not a folder"
    try:
        # the name write_file_atomically will create, the longest one written for ``path``
        fd, probe = create_file_next_to(path, *_temporary_affixes(path))
        os.close(fd)
        os.unlink(probe)
    except OSError as err:
        if err.errno == errno.ENAMETOOLONG:
            return (f"{path}: file name too long for the file system ({len(os.path.basename(path))} characters, "
                    "plus about 40 for the temporary file written first); give a shorter name")
        return f"{path}: cannot write in {parent} ({err.strerror or err})"
    if os.path.lexists(path) and not (os.path.isfile(path) or os.path.islink(path)):
        return f"{path}: exists and is not a regular file; refusing to replace it"
    return None


def _temporary_affixes(path: str) -> tuple[str, str]:
    """(prefix, suffix) of :func:`write_file_atomically`'s temporary file for ``path``:
    ".name.obc-<host>-<pid>-<token>.tmp.ext": hidden, recognisable as ours once its process is
    gone, and ending in path's extension, which some writers check (torch.export.save warns about
    a name not ending in .pt2)."""
    stem, extension = os.path.splitext(os.path.basename(path))
    return f".{stem}.", f".tmp{extension}"


def make_output_folder(directory: str) -> str | None:
    """Create ``directory`` (and missing parents) if needed; why files cannot be written there, or
    None. Tried, not guessed from permission bits: a file is created and removed again."""
    directory = os.fsdecode(directory)
    if "\0" in directory:  # os.makedirs would raise ValueError
        return f"{directory!r}: contains a NUL character; give a folder without one"
    if os.path.exists(directory) and not os.path.isdir(directory):
        return f"{directory}: is a file; give a folder to write into"
    try:
        os.makedirs(directory, exist_ok=True)
    except OSError as err:
        return f"{directory}: cannot create the folder ({err.strerror or err})"
    try:
        fd, probe = create_file_next_to(os.path.join(directory, "probe"), prefix=".write-probe-")
        os.close(fd)
        os.unlink(probe)
    except OSError as err:
        return f"{directory}: cannot write in the folder ({err.strerror or err})"
    return None


def write_file_atomically(path: str, write: bytes | Callable[[str], None], *,
                          error: type[Exception] = OSError) -> None:
    """Write the file ``path`` through a temporary file in its folder, renamed onto ``path`` when complete.

    ``write``: the file's bytes, or a function that writes the whole file given the temporary
    file's name (it may also recreate the file there, as ``safetensors`` does). Until the rename,
    ``path`` keeps its previous content; a failing or interrupted ``write`` (any exception,
    ``KeyboardInterrupt`` included) leaves it untouched, removes the temporary file and re-raises.

    Mode: a regular file replaced at ``path`` keeps its permission bits (``chmod 600 model.onnx``
    survives a new export; set-id and sticky bits are not carried over); a new file, or one that
    replaces a symbolic link, gets what ``open(path, "w")`` gives (0666 less the umask). A symbolic
    link at ``path`` is replaced by the file, never written through. A directory, FIFO, device or
    socket at ``path`` raises ``error`` before anything is written. The file's data is flushed to
    disk (``fsync``) before the rename, so a crash cannot leave a renamed but empty file.

    A process killed during the write (``kill -9``) leaves its temporary file; the next call
    writing into the same folder removes it (:func:`remove_stale_temporaries`).
    """
    path = os.fspath(path)
    keep_mode = None
    if os.path.lexists(path):
        old = os.lstat(path).st_mode
        if stat.S_ISREG(old):
            keep_mode = stat.S_IMODE(old) & 0o777
        elif not stat.S_ISLNK(old):
            raise error(f"{path}: exists and is not a regular file; refusing to replace it")
    remove_stale_temporaries(os.path.dirname(os.path.abspath(path)))
    fd, temp = create_file_next_to(path, *_temporary_affixes(path))
    try:
        try:
            mode = stat.S_IMODE(os.fstat(fd).st_mode) if keep_mode is None else keep_mode  # open()'s mode
            if not callable(write):
                view = memoryview(write)
                while view:
                    view = view[os.write(fd, view):]
        finally:
            os.close(fd)
        if callable(write):
            write(temp)
        os.chmod(temp, mode)  # after write(): safetensors and others recreate the file with mode 0600
        _fsync_file(temp)
        os.replace(temp, path)
    except BaseException:
        if os.path.lexists(temp):
            os.unlink(temp)
        raise
    _fsync_folder(os.path.dirname(os.path.abspath(path)))


def make_staging_folder(directory: str) -> str:
    """Create and return a new, empty hidden folder ``.obc-staging-<host>-<pid>-<token>`` in
    ``directory``, for a writer that makes several files (or files under names it chooses) before
    they are renamed into place. The caller removes it (``shutil.rmtree``) when done, also on
    failure; one that a killed process left is removed by the next call for the same folder, or by
    :func:`write_file_atomically` writing there (:func:`remove_stale_temporaries`). Created with
    mode 0700 (``os.mkdir``). ``OSError`` when ``directory`` cannot be written.
    """
    remove_stale_temporaries(directory)
    for _ in range(100):
        name = os.path.join(directory, f".obc-staging-{_owner_tag()}")
        try:
            os.mkdir(name, 0o700)
            return name
        except FileExistsError:
            continue
    raise FileExistsError(f"{directory}: no free staging folder name after 100 tries")


def remove_stale_temporaries(directory: str) -> list[str]:
    """Remove the temporary files and staging folders in ``directory`` that a process killed while
    writing left behind; returns their names (best effort: an entry that cannot be removed, or that
    another process removes first, is left out).

    An entry is removed only if it is provably ours and dead: its name has the exact form of
    :func:`create_file_next_to`'s files (``.*obc-<host>-<pid>-<token>.tmp[.ext]``, a regular file) or
    of :func:`make_staging_folder`'s folders (``.obc-staging-<host>-<pid>-<token>``, a real
    folder, not a link), ``<host>`` is this host's tag, and no process ``<pid>`` exists on this host.
    Anything else is left alone: other names (including the unmarked temporary names of earlier
    versions), entries of other hosts sharing the folder over a network file system, entries of a
    running process (this one included), and, where the process table cannot be asked (not POSIX),
    everything. A reused pid keeps the entry (never wrongly removed, only kept longer). Hosts are
    told apart by host name only: two containers with the same host name, separate process ids and
    a shared folder could take each other's live entries for dead ones (the write that loses its
    file then fails; it never renames a damaged file into place).
    """
    host = _host_tag()
    removed = []
    try:
        entries = list(os.scandir(directory))
    except OSError:
        return removed
    for entry in entries:
        if not entry.name.startswith("."):
            continue
        folder = _STALE_FOLDER.fullmatch(entry.name)
        match = folder or _STALE_FILE.fullmatch(entry.name)
        if match is None or match["host"] != host or _process_exists(int(match["pid"])):
            continue
        try:
            if folder is not None:
                if not entry.is_dir(follow_symlinks=False):
                    continue
                shutil.rmtree(entry.path)  # refuses a link; never follows links inside
            else:
                if not entry.is_file(follow_symlinks=False):
                    continue
                os.unlink(entry.path)
        except OSError:
            continue
        removed.append(entry.name)
    if removed:
        logger.info("removed what killed writes left in %s: %s", directory, ", ".join(sorted(removed)))
    return removed


def _host_tag() -> str:
    """8 hex digits naming this host in temporary names (pids are only meaningful per host)."""
    return hashlib.sha256(socket.gethostname().encode("utf-8", "surrogateescape")).hexdigest()[:8]


def _owner_tag() -> str:
    """``<host>-<pid>-<token>``: who made a temporary name, and a random part to make it new.
    The pid is read at each call (a forked child gets its own)."""
    return f"{_host_tag()}-{os.getpid()}-{secrets.token_hex(6)}"


def _process_exists(pid: int) -> bool:
    """Whether process ``pid`` may exist on this host; True whenever that cannot be ruled out."""
    if pid == os.getpid():
        return True
    if os.name != "posix" or pid <= 0:  # Windows' os.kill would terminate the process
        return True
    try:
        os.kill(pid, 0)  # signal 0: only checks that the process exists
    except ProcessLookupError:
        return False
    except OSError:  # PermissionError: exists, another user's
        return True
    return True


def _fsync_file(path: str) -> None:
    fd = os.open(path, os.O_RDONLY | getattr(os, "O_BINARY", 0))
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _fsync_folder(directory: str) -> None:
    """Make the rename itself durable where the platform can (POSIX); best effort."""
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)
