"""Crash-safe file writes: a save leaves either the old or the new files, whole, and nothing else.

Two granularities:

- **one file** (:func:`write_file`, :func:`write_json`, :func:`write_text`, :func:`write_tensors`): written to a
  hidden temporary ``.<name>.<hash>.dt-tmp.<pid>.<rand>`` next to it, fsynced, ``os.replace``-d over the target,
  then the folder is fsynced.
- **one folder generation** (:func:`write_generation`; every adapter save): the whole new content of a folder (all
  adapters, subfolders, config, weights and anything else the writer puts there) is written into a hidden staging
  folder ``.<name>.<hash>.dt-new.<pid>.<rand>`` next to the target, every file and folder in it is fsynced, and it
  is swapped in with ``renameat2(RENAME_EXCHANGE)`` (Linux): one atomic step after which the target is the new
  generation and the staging name holds the old one, which is then renamed to ``.dt-old`` and deleted. Where the
  exchange is not available (another OS, a file system without it) the swap is ``target -> .dt-old`` then
  ``staging -> target``; a kill between the two leaves no target, and the next save (or :func:`recover`) renames
  the old generation back.

**Other files in the target folder** (a Trainer output folder with ``checkpoint-*``, logs, a model's files) are
never lost: each generation records the top-level entries it wrote in a hidden manifest ``.deltatune-manifest.json``;
everything else in the old folder (files, links, whole subtrees) is carried into the new generation as hard links
(a copy where the file system has none) before the swap, so the target holds them at every instant. Entries of the
previous generation (from its manifest; without one, the root ``adapter_config.json`` / ``adapter_model.safetensors``)
are replaced, so a layout change (one adapter <-> several) leaves nothing stale.

**Leftovers** of killed saves (the hidden names above, whose process is gone) are removed by the next save to the
same target; loads ignore hidden entries. Before an old generation is deleted, any entry in it that is neither its
own nor present in the target (e.g. created by another process during the swap) is moved into the target.

``_step(name)`` is called at every point where a kill leaves a different state on disk; tests replace it to kill
the process exactly there.
"""
from __future__ import annotations

import ctypes
import errno
import hashlib
import json
import os
import secrets
import shutil
import stat
import sys
from collections.abc import Callable
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"
MANIFEST_NAME = ".deltatune-manifest.json"
LEGACY_OWNED = (CONFIG_NAME, WEIGHTS_NAME)  # what a generation without a manifest (older deltatune, PEFT) owns
_NEW, _OLD, _TMP = "dt-new", "dt-old", "dt-tmp"


def _step(name: str) -> None:
    """Crash-test hook: called after each step of a save that changes what is on disk (no-op)."""


# -- names of hidden helpers -----------------------------------------------------------------------------------------
def _prefix(target: Path) -> str:
    """``.<name (48 chars)>.<hash8>.``: recognisable, and short enough for any target name (names <= 255 bytes)."""
    name = target.name
    return f".{name[:48]}.{hashlib.sha1(os.fsencode(name)).hexdigest()[:8]}."


def _helper(target: Path, kind: str) -> Path:
    return target.with_name(f"{_prefix(target)}{kind}.{os.getpid()}.{secrets.token_hex(4)}")


def _leftovers(target: Path, kind: str) -> list[Path]:
    """Hidden helpers of ``kind`` for ``target`` whose writing process no longer runs (on this machine)."""
    head = f"{_prefix(target)}{kind}."
    try:
        names = os.listdir(target.parent)
    except FileNotFoundError:
        return []
    out = []
    for n in sorted(names):
        if not n.startswith(head):
            continue
        pid = n[len(head):].split(".", 1)[0]
        if pid.isdigit() and not _alive(int(pid)):
            out.append(target.parent / n)
    return out


def _alive(pid: int) -> bool:
    if pid == os.getpid():
        return False  # our own helpers only survive an exception that was already cleaned up, or a fork's kill
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    elif os.path.lexists(path):
        os.unlink(path)


# -- fsync -----------------------------------------------------------------------------------------------------------
def fsync_dir(path: str | Path) -> None:
    """Make a folder's entries (creations, renames, deletions) durable."""
    try:
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    except OSError:  # e.g. Windows cannot open folders
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _fsync_file(path: str | Path) -> None:
    with open(path, "rb") as f:
        os.fsync(f.fileno())


def _fsync_tree(root: Path) -> None:
    """fsync every regular file and every folder under ``root`` (folders bottom-up), then ``root`` itself."""
    for dirpath, dirnames, filenames in os.walk(root, topdown=False):
        for n in filenames:
            p = os.path.join(dirpath, n)
            if stat.S_ISREG(os.lstat(p).st_mode):
                _fsync_file(p)
        fsync_dir(dirpath)


# -- one file --------------------------------------------------------------------------------------------------------
def write_file(path: str | Path, write: Callable[[str], None]) -> Path:
    """Atomically replace ``path`` by what ``write(tmp_path)`` writes (temp next to it, fsync, replace, fsync dir)."""
    path = Path(path)
    if path.is_dir():
        raise IsADirectoryError(f"{path} is a folder; give a file path")
    path.parent.mkdir(parents=True, exist_ok=True)
    for old in _leftovers(path, _TMP):
        _remove(old)
    tmp = _helper(path, _TMP)
    try:
        write(str(tmp))
        _fsync_file(tmp)
        _step("file-synced")
        os.replace(tmp, path)
    except BaseException:
        if os.path.lexists(tmp):
            os.unlink(tmp)
        raise
    _step("file-replaced")
    fsync_dir(path.parent)
    return path


def _dump_json(obj, f) -> None:
    json.dump(obj, f, indent=2, sort_keys=True)
    f.write("\n")


def write_text(path: str | Path, text: str) -> Path:
    def w(tmp):
        with open(tmp, "w", encoding="utf-8") as f:
            f.write(text)
    return write_file(path, w)


def write_json(path: str | Path, obj) -> Path:
    def w(tmp):
        with open(tmp, "w", encoding="utf-8") as f:
            _dump_json(obj, f)
    return write_file(path, w)


def _cpu(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {k: v.detach().contiguous().cpu() for k, v in tensors.items()}


def write_tensors(path: str | Path, tensors: dict[str, torch.Tensor], metadata: dict[str, str] | None = None) -> Path:
    tensors = _cpu(tensors)
    return write_file(path, lambda tmp: save_file(tensors, tmp, metadata=metadata))


def read_json(path: str | Path) -> dict:
    """A JSON file; a syntax error names the file (``ValueError``)."""
    with open(path, encoding="utf-8") as f:
        try:
            return json.load(f)
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise ValueError(f"{path} is not valid JSON ({e}); the file is damaged or not a config: "
                             "write it again") from e


def read_tensors(path: str | Path) -> dict[str, torch.Tensor]:
    """A safetensors file; a damaged or truncated file is a ``ValueError`` that names it."""
    from safetensors import SafetensorError

    try:
        return load_file(str(path))
    except SafetensorError as e:
        raise ValueError(f"{path} is not a readable safetensors file ({e}); it is truncated or damaged: "
                         "save it again") from e


# -- one folder generation -------------------------------------------------------------------------------------------
def check_output_folder(path: str | Path, what: str = "output folder") -> Path:
    """``path`` as a folder to write a generation to; refuses ``""`` (it would mean the current folder) and files."""
    if isinstance(path, str) and not path.strip():
        raise ValueError(f"the {what} is empty: give a folder path (use '.' explicitly for the current folder)")
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise NotADirectoryError(f"{what} {path} is an existing file; give a folder (it is created if missing)")
    return path


def _owned(folder: Path) -> set[str]:
    """Top-level entries the generation in ``folder`` wrote (its manifest; else, for a folder written without one,
    the legacy adapter files and the subfolders an older multi-adapter ``dt.save`` wrote: a deltatune adapter named
    after its folder; other adapter folders, such as a Trainer's ``checkpoint-*``, are the user's)."""
    try:
        entries = read_json(folder / MANIFEST_NAME)["entries"]
        return {str(e) for e in entries} | {MANIFEST_NAME}
    except (OSError, ValueError, KeyError, TypeError):
        return set(LEGACY_OWNED) | ({n for n in os.listdir(folder) if _saved_adapter_named(folder / n, n)}
                                    if folder.is_dir() else set())


def _saved_adapter_named(sub: Path, name: str) -> bool:
    try:
        config = read_json(sub / CONFIG_NAME)
    except (OSError, ValueError):
        return False
    return isinstance(config, dict) and config.get("format") == "deltatune" and config.get("name") == name


def _carry(src: Path, dst: Path) -> None:
    """Recreate ``src`` (file, link or tree) at ``dst`` with hard links to the same files (copies where links fail)."""
    st = os.lstat(src)
    if stat.S_ISLNK(st.st_mode):
        os.symlink(os.readlink(src), dst)
    elif stat.S_ISDIR(st.st_mode):
        os.mkdir(dst)
        for n in sorted(os.listdir(src)):
            _carry(src / n, dst / n)
        shutil.copystat(src, dst, follow_symlinks=False)
    elif stat.S_ISREG(st.st_mode):
        try:
            os.link(src, dst, follow_symlinks=False)
        except OSError:
            shutil.copy2(src, dst, follow_symlinks=False)
    else:
        raise OSError(f"cannot carry {src} (not a file, folder or link) into the new generation of its folder; "
                      "move it away or save elsewhere")


_libc = None


def _renameat2(src: Path, dst: Path, flags: int) -> bool:
    """Linux ``renameat2``; ``False`` where the system or file system does not offer it (then nothing happened)."""
    global _libc
    if not sys.platform.startswith("linux"):
        return False
    if _libc is None:
        _libc = ctypes.CDLL(None, use_errno=True)
    fn = getattr(_libc, "renameat2", None)
    if fn is None:
        return False
    at_fdcwd = -100
    if fn(at_fdcwd, os.fsencode(src), at_fdcwd, os.fsencode(dst), ctypes.c_uint(flags)) == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.ENOSYS, errno.EINVAL, errno.EOPNOTSUPP):
        return False
    raise OSError(err, os.strerror(err), str(src), None, str(dst))


RENAME_NOREPLACE, RENAME_EXCHANGE = 1, 2
_EXCHANGE = True  # tests switch the exchange off to exercise the two-rename fallback


def _swap_in(new: Path, target: Path) -> Path | None:
    """Make ``new`` the ``target``; returns the old generation's new hidden name (``None`` if there was none)."""
    if not os.path.lexists(target):
        if not _renameat2(new, target, RENAME_NOREPLACE):
            os.rename(new, target)
        return None
    old = _helper(target, _OLD)
    if _EXCHANGE and _renameat2(new, target, RENAME_EXCHANGE):
        _step("exchanged")
        os.rename(new, old)  # the staging name now holds the old generation
    else:
        os.rename(target, old)
        _step("moved-aside")
        os.rename(new, target)
    return old


def _retire(old: Path, target: Path) -> None:
    """Delete an old generation; entries it did not own and the target lacks are moved into the target first."""
    owned = _owned(old)
    for n in sorted(os.listdir(old)):
        if n not in owned and not os.path.lexists(target / n):
            os.rename(old / n, target / n)
    shutil.rmtree(old)


def recover(target: str | Path) -> None:
    """Undo what killed saves to ``target`` left: restore a moved-aside old generation if the target is missing,
    delete staging folders, temp files and old generations."""
    target = Path(os.path.abspath(target))
    olds = _leftovers(target, _OLD)
    if not os.path.lexists(target) and olds:
        os.rename(olds.pop(), target)  # the fallback swap was killed between its two renames
    for p in _leftovers(target, _NEW) + _leftovers(target, _TMP):
        _remove(p)
    for old in olds:
        _retire(old, target) if target.is_dir() else shutil.rmtree(old)
    fsync_dir(target.parent)


def write_generation(target: str | Path, fill: Callable[[Path], None]) -> Path:
    """Write a new generation of the folder ``target``: ``fill(staging)`` writes its content into an empty hidden
    folder; other entries of the old folder are carried over; then one atomic swap (see the module docstring)."""
    target = check_output_folder(target)
    if target.is_symlink():
        target = target.resolve()  # swap the folder the link points to, keep the link
    target = Path(os.path.abspath(target))
    target.parent.mkdir(parents=True, exist_ok=True)
    recover(target)
    new = _helper(target, _NEW)
    os.mkdir(new)
    _step("staging-created")
    try:
        fill(new)
        entries = sorted(n for n in os.listdir(new) if n != MANIFEST_NAME)
        with open(new / MANIFEST_NAME, "w", encoding="utf-8") as f:
            _dump_json({"format": "deltatune-generation", "entries": entries}, f)
        _step("filled")
        if target.is_dir():
            owned = _owned(target)
            clash = sorted(n for n in entries if n not in owned and os.path.lexists(target / n))
            if clash:
                raise ValueError(f"{target} already holds {', '.join(clash)}, which no earlier save wrote; this save "
                                 "would replace it (an adapter of that name?): move it away or save elsewhere")
            for n in sorted(os.listdir(target)):
                if n not in owned and n not in entries and n != MANIFEST_NAME:
                    _carry(target / n, new / n)
            shutil.copystat(target, new)
        _step("carried")
        _fsync_tree(new)
        _step("synced")
    except BaseException:
        shutil.rmtree(new, ignore_errors=True)
        raise
    cwd = os.getcwd()
    try:
        old = _swap_in(new, target)
    except OSError as e:  # nothing was swapped: the target cannot be renamed (a mount point, a read-only parent)
        shutil.rmtree(new, ignore_errors=True)
        if e.errno in (errno.EBUSY, errno.EXDEV, errno.EACCES, errno.EPERM, errno.EROFS):
            raise OSError(e.errno, f"cannot replace the folder {target} as a whole ({e.strerror}: a mount point or a "
                          "folder whose parent is not writable?); save into a subfolder of it instead") from e
        raise
    _step("swapped")
    fsync_dir(target.parent)
    _step("parent-synced")
    if old is not None:
        _retire(old, target)
        fsync_dir(target.parent)
        _follow_cwd(cwd, target)
    _step("done")
    return target


def _follow_cwd(cwd: str, target: Path) -> None:
    """If this process worked inside the swapped folder, move it to the same place in the new generation."""
    try:
        rel = Path(cwd).relative_to(target)
    except ValueError:
        return
    here = target / rel
    os.chdir(here if here.is_dir() else target)


# -- adapters --------------------------------------------------------------------------------------------------------
def write_adapter_files(folder: Path, config: dict, tensors: dict[str, torch.Tensor]) -> None:
    """The two files of one adapter, into a folder of a generation being filled (not atomic on their own)."""
    folder.mkdir(parents=True, exist_ok=True)
    save_file(_cpu(tensors), str(folder / WEIGHTS_NAME), metadata={"format": "pt"})
    _step("weights-written")
    with open(folder / CONFIG_NAME, "w", encoding="utf-8") as f:
        _dump_json(config, f)
    _step("config-written")


def write_adapter(folder: str | Path, config: dict, tensors: dict[str, torch.Tensor]) -> Path:
    """One adapter as a new generation of ``folder`` (config and weights appear together or not at all)."""
    return write_generation(folder, lambda staging: write_adapter_files(staging, config, tensors))


def read_adapter(folder: str | Path) -> tuple[dict, dict[str, torch.Tensor]]:
    folder = Path(folder)
    cfg_path, w_path = folder / CONFIG_NAME, folder / WEIGHTS_NAME
    if not cfg_path.is_file():
        raise FileNotFoundError(f"{folder} has no {CONFIG_NAME}: not an adapter folder{_interrupted_hint(folder)}")
    if not w_path.is_file():
        raise FileNotFoundError(f"{folder} has {CONFIG_NAME} but no {WEIGHTS_NAME}")
    return read_json(cfg_path), read_tensors(w_path)


def _interrupted_hint(folder: Path) -> str:
    olds = _leftovers(Path(os.path.abspath(folder)), _OLD)
    if olds and not folder.exists():
        return f" (a killed save left its previous content in {olds[-1]}; the next save there restores it)"
    return ""


def adapter_folders(path: str | Path) -> dict[str, Path]:
    """``{name: folder}``: the folder itself (name from its config) or one subfolder per saved adapter (hidden
    entries, such as leftovers of killed saves, are ignored)."""
    path = Path(path)
    if (path / CONFIG_NAME).is_file():
        return {"": path}
    subs = {p.name: p for p in sorted(path.iterdir()) if not p.name.startswith(".") and (p / CONFIG_NAME).is_file()} \
        if path.is_dir() else {}
    if not subs:
        raise FileNotFoundError(f"no adapter found at {path}: expected {CONFIG_NAME} there or in its "
                                f"subfolders{_interrupted_hint(path)}")
    return subs
