"""Atomic file output: a reader never sees a half-written result.

Every stage writes through these helpers. A result is first written to a
temporary name in the destination directory (same filesystem, so the final
``os.replace`` is atomic) and only renamed into place once complete; on any
error the temporary files are removed and existing outputs stay untouched.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import hashlib
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any, Iterator, Sequence

from sam_reuse.base.errors import SamReuseError


def cache_root() -> Path:
    """Where downloads and activations are cached: ``$SAM_REUSE_CACHE`` or ``~/.cache/sam-reuse``, made if needed
    and refused in one line where it cannot hold files (a file, below a file, a read-only place)."""
    chosen = os.environ.get("SAM_REUSE_CACHE")
    return ensure_writable_dir(chosen or Path.home() / ".cache" / "sam-reuse",
                               "$SAM_REUSE_CACHE" if chosen else "the cache folder")


def sha256_file(path: str | os.PathLike, chunk_size: int = 1 << 20) -> str:
    """Hex sha256 of a file, read in chunks so large checkpoints stay cheap."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(chunk_size), b""):
            digest.update(chunk)
    return digest.hexdigest()


def ensure_writable_dir(path: str | os.PathLike, option: str = "") -> Path:
    """Create ``path`` if needed and prove we can write there, before any work starts.

    ``option``: the command-line option that named the folder, for the error message.
    """
    path = Path(path)
    named = f"{option} {path}" if option else str(path)
    if path.exists() and not path.is_dir():
        raise SamReuseError(f"{named}: is a file, not a folder to write in")
    try:
        path.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=path, prefix=".write-test-"):
            pass
    except OSError as exc:
        raise SamReuseError(f"{named}: not a folder this user can write in ({exc.strerror or exc})") from exc
    return path


def sidecar_path(output: str | os.PathLike) -> Path:
    """Where the JSON describing an output (an engine, an INT8 model) lies: ``<output>.json`` beside it."""
    return Path(f"{output}.json")


def as_seen_from(folder: str | os.PathLike, path: str | os.PathLike) -> str:
    """``path`` as a file in ``folder`` names it: a bare name when it lies there (so the folder can move), else
    an absolute path."""
    path = Path(path)
    return path.name if path.resolve().parent == Path(folder).resolve() else str(path.resolve())


def check_output_folder(path: str | os.PathLike, option: str = "--out") -> Path:
    """An output folder that can be made or written: not a file, below a folder that exists (creates nothing)."""
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise SamReuseError(f"{option} {path}: is a file, not a folder to write in")
    existing = next(p for p in (path, *path.parents) if p.exists())
    if not existing.is_dir() or not os.access(existing, os.W_OK | os.X_OK):
        raise SamReuseError(f"{option} {path}: {existing} is not a folder this user can write in")
    return path


def _default_file_mode() -> int:
    """0o666 less the process umask: the mode ``open()`` would give a new file (0644 under umask 022)."""
    umask = os.umask(0)
    os.umask(umask)
    return 0o666 & ~umask


def refuse_overwriting(output: str | os.PathLike, *inputs: str | os.PathLike, option: str = "--out") -> None:
    """An output never replaces one of the command's inputs."""
    target = Path(output).resolve()
    for source in inputs:
        if source is not None and Path(source).resolve() == target:
            raise SamReuseError(f"{option} {output}: is an input of this command; write the output elsewhere")


def check_output_file(path: str | os.PathLike, option: str = "", kind: str | None = None) -> Path:
    """A file path that can be written: not a folder, a device or a FIFO, in a folder that exists, and (with
    ``kind``, what ``file_kind`` calls the file to write) not holding another kind of the project's files: an
    encoder written over a decoder, an evaluation over export.json. Checked before any work."""
    path, named = Path(path), f"{option} {path}" if option else str(path)
    if path.is_dir():
        raise SamReuseError(f"{named}: is a folder, not a file to write")
    if not path.parent.is_dir():
        raise SamReuseError(f"{named}: its folder {path.parent} does not exist")
    if path.exists() and not path.is_file():
        raise SamReuseError(f"{named}: is not a regular file (a device or a FIFO); name a file to write")
    found = file_kind(path) if kind is not None else None
    if found is not None and found != kind:
        raise SamReuseError(f"{named}: holds {found}, not {kind}; name another file (or remove it first)")
    return path


ENCODER_KIND, DECODER_KIND = "a SAM encoder", "a SAM decoder"


def file_kind(path: Path) -> str | None:
    """What an existing file of the project is: 'a SAM encoder' or 'a SAM decoder' (ONNX, by its inputs), a
    record's format (``sam-reuse/...`` JSON), or None for anything else."""
    if not path.is_file():
        return None
    if path.suffix == ".onnx":
        import onnx

        try:
            inputs = {i.name for i in onnx.load(str(path), load_external_data=False).graph.input}
        except Exception:  # not ONNX after all: not one of ours
            return None
        return ENCODER_KIND if "image" in inputs else DECODER_KIND if "image_embeddings" in inputs else None
    if path.suffix == ".json" and path.stat().st_size < 64 << 20:
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except (ValueError, UnicodeDecodeError, RecursionError):
            return None
        form = data.get("format") if isinstance(data, dict) else None
        return form if isinstance(form, str) and form.startswith("sam-reuse/") else None
    return None


@contextlib.contextmanager
def atomic_path(final: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path beside ``final``; rename it over ``final`` on success (with the usual file mode)."""
    final = check_output_file(final)
    with _storage_named(final):
        fd, tmp_name = tempfile.mkstemp(dir=final.parent, prefix=f".{final.name}.", suffix=".tmp")
    os.close(fd)
    tmp = Path(tmp_name)
    try:
        with _storage_named(final):
            yield tmp
        os.chmod(tmp, _default_file_mode())  # mkstemp makes 0600; outputs get what any new file would
        os.replace(tmp, final)
    finally:
        if tmp.exists():
            tmp.unlink()


LOCK_NAME = ".sam-reuse.lock"
_held_locks: set[Path] = set()  # folders this process holds: run locks once, its export and tune inside


@contextlib.contextmanager
def folder_lock(folder: str | os.PathLike) -> Iterator[None]:
    """Hold ``folder``'s lock for the block, so two processes never write one output folder at once.

    The lock is an ``flock`` on ``folder/.sam-reuse.lock``: it ends with the process, even on a kill. A second
    process gets one line naming the holder's PID. The file is removed on release; a lock taken on a file that
    was removed meanwhile is taken again on the new one.
    """
    folder = Path(folder).resolve()
    if folder in _held_locks:
        yield
        return
    created = not folder.exists()
    ensure_writable_dir(folder)
    path = folder / LOCK_NAME
    while True:
        try:  # never through a link planted there: it would truncate the file it points to
            fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW, 0o644)
        except OSError as exc:
            if not path.is_symlink():
                raise
            raise SamReuseError(f"{path}: a symbolic link where the folder's lock file goes; remove it "
                                f"(not followed: {exc.strerror})") from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 32, 0).decode(errors="replace").strip() or "unknown"
            os.close(fd)
            raise SamReuseError(f"{folder}: in use by PID {holder} (another export-and-tune is writing there); "
                                "wait for it, or write to another folder") from None
        try:
            if os.stat(path).st_ino == os.fstat(fd).st_ino:
                break
        except FileNotFoundError:
            pass
        os.close(fd)  # the file was removed by the holder we waited on: lock the new one
    try:
        with _storage_named(folder):  # a full disk fails here first
            os.ftruncate(fd, 0)
            os.pwrite(fd, str(os.getpid()).encode(), 0)
        _held_locks.add(folder)
        yield
    finally:
        _held_locks.discard(folder)
        with contextlib.suppress(FileNotFoundError):
            path.unlink()
        os.close(fd)
        if created:
            with contextlib.suppress(OSError):  # only if nothing was published in it
                folder.rmdir()


def write_json(path: str | os.PathLike, data: Any) -> None:
    """Write ``data`` as indented, key-sorted JSON, atomically."""
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")


OUTPUTS_RECORD = ".sam-reuse-outputs.json"  # the names sam-reuse published into a folder


def _recorded_outputs(out_dir: Path) -> set[str] | None:
    """The names sam-reuse published into ``out_dir``; None for a folder it wrote before it kept the record."""
    try:
        names = json.loads((out_dir / OUTPUTS_RECORD).read_text(encoding="utf-8"))["published"]
        return {name for name in names if isinstance(name, str)}
    except (OSError, ValueError, KeyError, TypeError):
        return None


def _publish(staging: Path, out_dir: Path, replacing: Sequence[str]) -> None:
    """Move ``staging``'s entries into ``out_dir``; first remove the ``replacing`` files it does not renew, of
    those an earlier stage published there (the folder's OUTPUTS_RECORD says which: a user's own
    ``reuse_map_handmade.json`` or ``yolo.engine`` beside them stays).

    Hidden entries (a lock, another stage's staging folder left by a kill) are work, not outputs: they stay.
    """
    fresh = {item.name for item in staging.iterdir() if not item.name.startswith(".")}
    for name in sorted(fresh):  # every destination checked before the first file moves: all new or all old
        target = out_dir / name
        if target.is_dir() and not target.is_symlink():
            raise SamReuseError(f"{target}: a folder where an output goes; nothing was published (move it away)")
    published = _recorded_outputs(out_dir)
    for pattern in replacing:
        for stale in out_dir.glob(pattern):
            ours = published is None or stale.name in published  # no record: a folder from before it was kept
            if stale.name not in fresh and stale.is_file() and ours:
                stale.unlink()
    published = {name for name in (published or set()) if (out_dir / name).exists()} | fresh
    for name in sorted(fresh):
        os.replace(staging / name, out_dir / name)
    with atomic_path(out_dir / OUTPUTS_RECORD) as tmp:
        tmp.write_text(json.dumps({"published": sorted(published)}, indent=1) + "\n")


# The machine's storage failing a write, not a bug: full, over quota, read-only.
STORAGE_ERRORS = {errno.ENOSPC, errno.EDQUOT, errno.EROFS}


@contextlib.contextmanager
def _storage_named(target: Path) -> Iterator[None]:
    """A write that the storage refuses becomes one line naming the output (nothing half-written stays)."""
    try:
        yield
    except OSError as exc:
        if exc.errno not in STORAGE_ERRORS:
            raise
        raise SamReuseError(f"{target}: {exc.strerror} while writing it; nothing was written (free space or "
                            "choose another folder)") from None


@contextlib.contextmanager
def staged_outputs(out_dir: str | os.PathLike, replacing: Sequence[str] = ()) -> Iterator[Path]:
    """Collect a stage's outputs in a hidden staging directory, then publish them together.

    Files written under the yielded directory are moved into ``out_dir`` only
    when the block completes; if it raises, the staging directory is deleted
    and ``out_dir`` is left exactly as it was (and removed if this call created
    it and it is still empty). Multi-file results (an ONNX model with external
    data, a model plus its sidecar) therefore appear all at once or not at all.

    ``replacing``: glob patterns of the files an earlier run of the same stage
    wrote. Those this run does not write again are removed just before the new
    set is published, so no stale output survives beside it.
    """
    out_dir = Path(out_dir)
    created = not out_dir.exists()
    ensure_writable_dir(out_dir)
    staging = Path(tempfile.mkdtemp(dir=out_dir, prefix=".staging-"))
    try:
        with _storage_named(out_dir):
            yield staging
        _publish(staging, out_dir, replacing)
    except BaseException:
        if created and not any(p for p in out_dir.iterdir() if p not in (staging, out_dir / LOCK_NAME)):
            shutil.rmtree(out_dir, ignore_errors=True)
        raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)


WORK_NAME = ".run-work"


@contextlib.contextmanager
def resumable_outputs(out_dir: str | os.PathLike, replacing: Sequence[str], linked: Sequence[str] = (),
                      copied: Sequence[str] = ()) -> Iterator[Path]:
    """Like ``staged_outputs`` for a long multi-stage job: its whole set of outputs appears in ``out_dir`` at once.

    The stages work in ``out_dir/.run-work``, which starts with the job's earlier outputs still usable there
    (``linked``: files only ever replaced, never changed in place, such as models, are hard-linked; ``copied``:
    files appended to, such as a search journal, are copied), so a rerun with the same settings reuses them.
    On success the work folder's files replace ``out_dir``'s (with ``replacing`` as in ``staged_outputs``).
    On an error the work folder is removed and ``out_dir`` is as it was. On an interrupt (Ctrl-C, or a kill)
    the work folder stays, so the next run resumes in it; ``out_dir`` is as it was then too.
    Call it under ``folder_lock(out_dir)``: the work folder belongs to the lock's holder.
    """
    out_dir = Path(out_dir)
    created = not out_dir.exists()
    ensure_writable_dir(out_dir)
    work = out_dir / WORK_NAME
    if work.is_symlink() or (work.exists() and not work.is_dir()):  # a planted link would move another folder here
        raise SamReuseError(f"{work}: not the folder an interrupted run leaves (a symbolic link or a file); "
                            "remove it")
    work.mkdir(exist_ok=True)
    for names, share in ((linked, True), (copied, False)):
        for name in names:
            source, target = out_dir / name, work / name
            if source.is_file() and not target.exists():
                try:
                    if not share:
                        raise OSError("copy")
                    os.link(source, target)
                except OSError:
                    shutil.copyfile(source, target)
    try:
        yield work
        _publish(work, out_dir, replacing)
        shutil.rmtree(work, ignore_errors=True)
    except Exception:
        shutil.rmtree(work, ignore_errors=True)
        if created and not any(p for p in out_dir.iterdir() if p != out_dir / LOCK_NAME):
            shutil.rmtree(out_dir, ignore_errors=True)
        raise
