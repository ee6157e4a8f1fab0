"""Atomic output: a reader never sees a half-written file or directory.

What is written takes the user's umask, as any other file does (0644 and 0755 under the usual 022), so that others
can read a study's outputs on a shared filesystem (a Ray cluster's): tempfile makes its files 0600 and its
directories 0700, and so do writers that go through temp files of their own (safetensors 0.8's save_file, and
transformers' save_pretrained with it), which the final rename would otherwise publish as they are.
"""
import json
import os
import shutil
import tempfile
from contextlib import contextmanager
from pathlib import Path

from .errors import AdapterError


def _umask_from_proc():
    """The umask as Linux (4.7 and later) says it in /proc/self/status, read without changing it; None elsewhere."""
    try:
        with open("/proc/self/status") as f:
            return next((int(line.split()[1], 8) for line in f if line.startswith("Umask:")), None)
    except (OSError, ValueError, IndexError):
        return None


def _umask_by_setting():
    # The only portable way to read the umask is to set it and set it back; a file another thread creates in between
    # gets the temporary mask, so it is the strictest one (that file is private, never world-writable).
    mask = os.umask(0o077)
    os.umask(mask)
    return mask


# Where /proc cannot say it, the umask is read once, at import (before a program starts threads, as a rule), since
# reading it by setting it races with other threads; a later os.umask() is then not seen. On Linux it is read at
# each write, from /proc, which is race-free.
_UMASK_AT_IMPORT = None if _umask_from_proc() is not None else _umask_by_setting()


def umask():
    """The process's umask."""
    mask = _umask_from_proc()
    return _UMASK_AT_IMPORT if mask is None else mask


def _take_umask(path):
    """Give `path`, and everything under it when it is a directory, the permissions a new file (0666) or directory
    (0777) gets under the umask; the deepest first, so that no directory closes before its contents are done. Links
    are left alone (chmod would change what they point to)."""
    mask, paths = umask(), [path]
    if os.path.isdir(path):
        paths += [os.path.join(root, name) for root, dirs, files in os.walk(path) for name in dirs + files]
    for p in reversed(paths):
        if not os.path.islink(p):
            os.chmod(p, (0o777 if os.path.isdir(p) else 0o666) & ~mask)


@contextmanager
def atomic_file(path):
    """Yield a temp file's path next to `path` (created empty) to write; on success it takes the umask's permissions
    and replaces `path`, on error it is removed."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        yield Path(tmp)
        _take_umask(tmp)  # after the writer: one that replaced the file by a temp file of its own made it 0600 again
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def write_text(path, text):
    """Write `text` to `path` via a temp file in the same directory, then rename (atomic_file)."""
    with atomic_file(path) as tmp:
        tmp.write_text(text)


def write_json(path, obj):
    """Write JSON atomically (see write_text)."""
    write_text(path, json.dumps(obj, indent=2, default=_jsonable) + "\n")


def _jsonable(x):
    if hasattr(x, "tolist"):  # numpy / torch scalars and arrays
        return x.tolist()
    raise TypeError(f"not JSON serialisable: {type(x).__name__}")


@contextmanager
def atomic_dir(path, overwrite=False):
    """Yield a temp directory next to `path` to write in; on success it and everything in it take the umask's
    permissions and it replaces `path`, on error it is removed."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=path.parent, prefix=f".{path.name}.tmp-"))
    try:
        yield tmp
        _take_umask(tmp)
        if path.exists():
            if not overwrite and any(path.iterdir()):
                raise FileExistsError(path)
            shutil.rmtree(path)
        os.replace(tmp, path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


class Journal:
    """The one resume format of work done item by item (analysis.spectral's matrices, analysis.landscape's grid
    points): a JSON-lines file whose first line is the fingerprint of what the items are of (the settings, the
    checkpoint) and each next line one finished item, {"key": ..., "value": ...}, appended and flushed as it
    finishes. A rerun reads the items back and does only the rest; a journal of another fingerprint is refused (its
    items are never mixed in); a torn last line (a kill mid-write) is ignored. `finish()` removes it once the
    result is written. (Training's resumable state is a snapshot of tensors and random states, adapters.train.)"""

    def __init__(self, file, fingerprint):
        # as it reads back from JSON (tuples become lists), so a rerun's own fingerprint compares equal
        self.file, self.fingerprint, self.unsynced = Path(file), json.loads(json.dumps(fingerprint)), 0

    def done(self, other_settings="rerun with --fresh to discard it, or use another --out"):
        """{key: value} of the items already finished (none without a file); AdapterError for another
        fingerprint, naming the settings that differ and `other_settings`, what to do."""
        if not self.file.exists():
            return {}
        lines = self.file.read_text().splitlines()
        try:
            head = json.loads(lines[0])["fingerprint"] if lines else self.fingerprint
        except (ValueError, KeyError, TypeError):
            head = None
        if head != self.fingerprint:
            ours, theirs = self.fingerprint or {}, head if isinstance(head, dict) else {}
            diff = sorted(k for k in set(ours) | set(theirs) if ours.get(k) != theirs.get(k)) or ["all"]
            raise AdapterError(f"{self.file} holds partial results made with other settings ({', '.join(diff)}); "
                               f"{other_settings}")
        items = {}
        for line in lines[1:]:
            try:
                item = json.loads(line)
            except ValueError:
                continue  # torn by a kill mid-write: that item is done again
            items[item["key"]] = item["value"]
        return items

    def add(self, key, value, sync_every=1):
        """Append one finished item: flushed at once (a killed process loses nothing), and put on disk (fsync) every
        `sync_every` items (what a machine's crash could lose)."""
        new = not self.file.exists()
        if new:
            self.file.parent.mkdir(parents=True, exist_ok=True)
        with open(self.file, "a") as f:
            if new:
                f.write(json.dumps({"fingerprint": self.fingerprint}) + "\n")
            f.write(json.dumps({"key": key, "value": value}) + "\n")
            f.flush()
            self.unsynced += 1
            if self.unsynced >= sync_every:
                os.fsync(f.fileno())
                self.unsynced = 0

    def finish(self):
        """The result is written: the journal goes (and its directory, when that is left empty)."""
        self.file.unlink(missing_ok=True)
        if self.file.parent.exists() and not any(self.file.parent.iterdir()):
            self.file.parent.rmdir()
