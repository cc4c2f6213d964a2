"""Front end: checkpoints of long runs, chunk by chunk, and their resume.

`jaxou simulate` (chunks of paths) and `jaxou sweep` (chunks of grid points) both
cut their work into chunks, save each finished chunk, and on a rerun load the saved
chunks and compute only the missing ones. One folder holds one run:

    manifest.json        {"fingerprint": ..., "n_chunks": ..., "what": ...}
    chunk_000000.npz     the arrays of chunk 0
    chunk_000001.npz     ...

- The fingerprint is a hash of everything that determines the results (the
  configuration, the chunk layout, the jaxou version); a folder whose manifest
  carries another fingerprint belongs to another run and is refused, unless the
  user asks for it to be discarded (`--fresh`), and then only the files named above
  are removed.
- Every file is written atomically (`jaxou._cli.write_atomic`: a temporary file,
  then a rename), so an interrupted or failed run leaves complete chunk files or
  none, never half a file, and never touches a file it did not write.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import re
import sys
import zipfile
from collections.abc import Callable
from typing import Any

import numpy as np

from ._cli import Progress, write_atomic
from ._config import ConfigError

__all__ = ["fingerprint", "ChunkStore", "run_chunks"]

MANIFEST = "manifest.json"
_CHUNK = re.compile(r"chunk_\d{6}\.npz")


def _canonical(x: Any) -> Any:
    """Plain JSON values for hashing; arrays as their dtype, shape and a hash of their
    bytes (so that float values are hashed exactly)."""
    if isinstance(x, dict):
        return {str(k): _canonical(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_canonical(v) for v in x]
    if isinstance(x, (np.ndarray, np.generic)) or hasattr(x, "__array__"):
        a = np.ascontiguousarray(np.asarray(x))
        digest = hashlib.sha256(a.tobytes()).hexdigest()
        return {"dtype": str(a.dtype), "shape": list(a.shape), "sha256": digest}
    if x is None or isinstance(x, (str, bool, int)):
        return x
    if isinstance(x, float):
        return repr(x)  # exact, and "inf"/"nan" without breaking strict JSON
    return repr(x)


def fingerprint(*parts: Any) -> str:
    """A hash of `parts` (nested dicts, lists, strings, numbers, arrays): equal for
    equal inputs, different (with overwhelming probability) otherwise."""
    text = json.dumps(_canonical(list(parts)), sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(text.encode()).hexdigest()[:32]


class ChunkStore:
    """The chunk files of one run in `folder`, created if needed.

    **Arguments:**

    - `folder`: where the manifest and the chunk files live.
    - `fingerprint`: the run's [`fingerprint`][].
    - `n_chunks`: how many chunks the run has.
    - `what`: the kind of run, for messages ("sweep", "simulation").
    - `fresh`: discard the chunk files of a different run instead of refusing.
    - `progress`: where to say so.

    **Raises:** `ConfigError` when the folder holds another run's chunks and `fresh`
    is false.
    """

    def __init__(
        self,
        folder: str,
        fingerprint: str,
        n_chunks: int,
        *,
        what: str,
        fresh: bool = False,
        progress: Progress | None = None,
    ):
        self.folder = folder
        self.n_chunks = int(n_chunks)
        self.what = what
        manifest = {"fingerprint": fingerprint, "n_chunks": self.n_chunks, "what": what}
        old = self._read_manifest()
        if old is not None and old.get("fingerprint") == fingerprint:
            return
        if old is not None or self._chunk_files():
            if not fresh:
                raise ConfigError(
                    f"{folder!r} holds chunks of a different {what} (another configuration, "
                    "chunk size or jaxou version); rerun with --fresh to discard them, or "
                    "choose another --out"
                )
            if progress is not None:
                progress.info(f"--fresh: discarding the chunks of a different {what} in {folder}")
            for name in self._chunk_files() + [MANIFEST]:
                if os.path.exists(os.path.join(folder, name)):
                    os.remove(os.path.join(folder, name))
        os.makedirs(folder, exist_ok=True)
        write_atomic(os.path.join(folder, MANIFEST), json.dumps(manifest).encode())

    def _read_manifest(self) -> dict | None:
        path = os.path.join(self.folder, MANIFEST)
        if not os.path.exists(path):
            return None
        try:
            with open(path) as f:
                value = json.load(f)
        except (OSError, ValueError):
            return {}  # unreadable: not this run's
        return value if isinstance(value, dict) else {}

    def _chunk_files(self) -> list[str]:
        if not os.path.isdir(self.folder):
            return []
        return sorted(n for n in os.listdir(self.folder) if _CHUNK.fullmatch(n))

    def path(self, i: int) -> str:
        """The file of chunk `i`."""
        return os.path.join(self.folder, f"chunk_{i:06d}.npz")

    def done(self) -> list[int]:
        """The chunks already saved."""
        return [i for i in range(self.n_chunks) if os.path.exists(self.path(i))]

    def load(self, i: int) -> dict[str, np.ndarray]:
        """The arrays of chunk `i`."""
        try:
            with np.load(self.path(i)) as z:
                return {k: z[k] for k in z.files}
        except (OSError, ValueError, zipfile.BadZipFile) as err:
            raise ConfigError(
                f"cannot read {self.path(i)!r} ({err}); delete it and rerun to recompute it"
            ) from err

    def save(self, i: int, arrays: dict[str, np.ndarray]) -> None:
        """Save chunk `i` atomically: the file is complete or absent."""
        buffer = io.BytesIO()
        np.savez(buffer, **arrays)
        write_atomic(self.path(i), buffer.getvalue())


def run_chunks(
    store: ChunkStore,
    compute: Callable[[int], dict[str, np.ndarray]],
    *,
    progress: Progress,
    unit: str = "chunk",
) -> list[dict[str, np.ndarray]]:
    """Every chunk's arrays, in order: the saved ones loaded, the missing ones
    computed by `compute(i)` and saved as soon as each is done. A tqdm bar on
    stderr counts the chunks (none when `progress` is quiet)."""
    from tqdm import tqdm

    n = store.n_chunks
    done = set(store.done())
    if done:
        progress.info(f"resuming: {len(done)} of {n} chunks already done")
    out = []
    with tqdm(
        total=n,
        initial=len(done),
        desc=f"jaxou: {store.what}",
        unit=unit,
        disable=progress.quiet or n == 1,
        file=sys.stderr,
        dynamic_ncols=True,
    ) as bar:
        for i in range(n):
            if i in done:
                out.append(store.load(i))
                continue
            arrays = compute(i)
            store.save(i, arrays)
            out.append(arrays)
            bar.update(1)
    return out
