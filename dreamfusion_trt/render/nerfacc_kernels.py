"""nerfacc's CUDA kernels: loaded once per process, their first build said out loud, and the lock
of a killed build cleared.

nerfacc compiles its kernels just in time (``torch.utils.cpp_extension.load``) on a machine's
first CUDA call into them: minutes, with nothing in the log. A process killed during that build
leaves torch's ``lock`` file in the build folder, and every later process waits on it forever.
On the H200 (2026-12-02) a timeout killed one build and three later runs hung that way.

`load_kernels` takes an exclusive `flock` beside the build folder before it lets nerfacc load or
build. The kernel drops a flock when its process dies, so whoever holds it is the only one of this
package's processes building. A torch ``lock`` found then was left by a build that died, and is
removed with a warning. Others wait for the holder, and say so. The renderer calls it before its
first march; ``build-engines`` calls it on CUDA so that runs find the kernels built.
"""

from __future__ import annotations

import fcntl
import importlib
import logging
import time
from pathlib import Path

log = logging.getLogger(__name__)

EXTENSION = "nerfacc_cuda"  # the name nerfacc builds its extension under
_loaded = False


def build_directory() -> Path:
    """torch's build folder for nerfacc's extension (under ``TORCH_EXTENSIONS_DIR``)."""
    from torch.utils.cpp_extension import _get_build_directory  # noqa: PLC0415

    return Path(_get_build_directory(EXTENSION, verbose=False))


def _import_backend():
    """Import nerfacc's kernel module: this is what loads them, or builds them first."""
    return importlib.import_module("nerfacc.cuda._backend")


def load_kernels() -> None:
    """Load nerfacc's CUDA kernels now (once per process), building them first when this
    machine has none. ValueError when nerfacc could not build them (no CUDA toolkit)."""
    global _loaded
    if _loaded:
        return
    folder = build_directory()
    folder.parent.mkdir(parents=True, exist_ok=True)
    with open(folder.parent / f"{folder.name}.dreamfusion-trt.lock", "a+") as guard:
        try:
            fcntl.flock(guard, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            log.info("nerfacc: another process is building its CUDA kernels in %s; waiting for it", folder)
            fcntl.flock(guard, fcntl.LOCK_EX)
        stale = folder / "lock"
        if stale.exists():
            log.warning("nerfacc: removing %s, left by a kernel build that was killed (later builds would wait on it forever)",
                        stale)  # fmt: skip
            stale.unlink(missing_ok=True)
        built = folder.is_dir() and any(folder.glob(f"{EXTENSION}*.so"))
        if not built:
            log.info("nerfacc: compiling its CUDA kernels into %s (the first use on this machine takes minutes)", folder)
        start = time.perf_counter()
        backend = _import_backend()
        if getattr(backend, "_C", None) is None:
            raise ValueError("nerfacc's CUDA kernels are not available (nerfacc found no CUDA toolkit to build them); "
                             "use render.backend torch")  # fmt: skip
        if not built:
            log.info("nerfacc: CUDA kernels compiled in %.0f s", time.perf_counter() - start)
    _loaded = True
