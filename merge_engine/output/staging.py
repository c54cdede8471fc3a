"""Publishing an output folder atomically: everything is written into a hidden staging folder
beside it, renamed into place only when complete; a failure removes it, so no half-written
output ever looks complete, and an output folder that already holds something is refused
before any work starts."""

from __future__ import annotations

import errno
import os
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from merge_engine.errors import MergeError, OutputExistsError


def check_output_dir(out_dir: Path) -> None:
    if out_dir.exists() and (not out_dir.is_dir() or any(out_dir.iterdir())):
        raise OutputExistsError(
            f"output folder {out_dir} already exists and is not empty; choose a new folder or delete it first"
        )


@contextmanager
def staging_folder(out_dir: Path) -> Iterator[Path]:
    """A fresh hidden folder beside ``out_dir``, renamed to it when the block ends without
    error and removed when it raises (a full disk becomes one sentence)."""
    check_output_dir(out_dir)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    staging = out_dir.parent / f".{out_dir.name}.partial-{os.getpid()}"
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir()
    try:
        yield staging
        if out_dir.exists():
            out_dir.rmdir()  # empty, checked above
        staging.rename(out_dir)
    except BaseException as error:
        shutil.rmtree(staging, ignore_errors=True)
        if isinstance(error, OSError) and error.errno == errno.ENOSPC:
            raise MergeError(
                f"the disk holding {out_dir.parent} filled up while writing {out_dir.name}; free some space and run it again"
            ) from None
        raise
