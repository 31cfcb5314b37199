"""A model repo as the Hugging Face hub describes it, for the hub stand-in: every file
an LFS object with its SHA-256, a revision derived from the names and hashes, and the
answers of the tree and model_info APIs.
"""
from __future__ import annotations

import hashlib
import pathlib
import threading
from dataclasses import dataclass

_CHUNK = 1024 * 1024

_sha256_cache: dict[tuple[str, int, int], str] = {}
_sha256_lock = threading.Lock()


def sha256_of(path: pathlib.Path) -> str:
    """SHA-256 of a file, cached by path, mtime and size: test files can be hundreds of MB."""
    stat = path.stat()
    key = (str(path.resolve()), stat.st_mtime_ns, stat.st_size)
    with _sha256_lock:
        if key not in _sha256_cache:
            digest = hashlib.sha256()
            with path.open("rb") as f:
                while chunk := f.read(_CHUNK):
                    digest.update(chunk)
            _sha256_cache[key] = digest.hexdigest()
        return _sha256_cache[key]


def git_blob_oid(data: bytes) -> str:
    """Git's object id for a blob, as the Hub reports for the LFS pointer file."""
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


@dataclass(frozen=True)
class RepoFile:
    local_path: pathlib.Path
    size: int
    sha256: str
    blob_id: str
    pointer_size: int

    @classmethod
    def load(cls, local_path: pathlib.Path) -> RepoFile:
        sha256 = sha256_of(local_path)
        size = local_path.stat().st_size
        pointer = f"version https://git-lfs.github.com/spec/v1\noid sha256:{sha256}\nsize {size}\n".encode()
        return cls(local_path, size, sha256, git_blob_oid(pointer), len(pointer))


@dataclass(frozen=True)
class Repo:
    files: dict[str, RepoFile]
    revision: str

    @classmethod
    def load(cls, files: dict[str, pathlib.Path]) -> Repo:
        loaded = {name: RepoFile.load(pathlib.Path(path)) for name, path in files.items()}
        listing = "".join(f"{name}\0{f.sha256}\n" for name, f in sorted(loaded.items()))
        return cls(loaded, hashlib.sha1(listing.encode()).hexdigest())

    def tree(self, folder: str, recursive: bool) -> list[dict] | None:
        """Entries of the tree API under `folder`, or None if there is no such folder."""
        prefix = f"{folder}/" if folder else ""
        files = {name: f for name, f in sorted(self.files.items()) if name.startswith(prefix)}
        if folder and not files:
            return None
        folders: dict[str, list[str]] = {}
        entries = []
        for name, f in files.items():
            parts = name[len(prefix) :].split("/")
            for depth in range(1, len(parts) if recursive else min(2, len(parts))):
                folders.setdefault(prefix + "/".join(parts[:depth]), []).append(f.blob_id)
            if recursive or len(parts) == 1:
                entries.append(
                    {
                        "type": "file",
                        "oid": f.blob_id,
                        "size": f.size,
                        "path": name,
                        "lfs": {"oid": f.sha256, "size": f.size, "pointerSize": f.pointer_size},
                    }
                )
        for path, oids in folders.items():
            tree_oid = hashlib.sha1("\n".join(oids).encode()).hexdigest()
            entries.append({"type": "directory", "oid": tree_oid, "size": 0, "path": path})
        return sorted(entries, key=lambda entry: entry["path"])

    def model_info(self, repo_id: str, with_blobs: bool) -> dict:
        siblings = []
        for name, f in sorted(self.files.items()):
            sibling: dict = {"rfilename": name}
            if with_blobs:
                sibling.update(
                    size=f.size,
                    blobId=f.blob_id,
                    lfs={"sha256": f.sha256, "size": f.size, "pointerSize": f.pointer_size},
                )
            siblings.append(sibling)
        author = repo_id.split("/")[0] if "/" in repo_id else None
        return {"id": repo_id, "author": author, "sha": self.revision, "siblings": siblings}
