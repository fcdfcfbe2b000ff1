"""The GPU devices the server hands out to local jobs (GPU slots), and how a request asks.

The list comes from the `GPUS` setting; unset, from the server's own `CUDA_VISIBLE_DEVICES`
(an operator or a cluster scheduler that restricted the server to some devices meant its jobs
too; `nvidia-smi` ignores that variable, so it is asked only when the variable is not set), and
then from `nvidia-smi -L`. Nothing found: no GPU slots.
"""

from __future__ import annotations

import logging
import math
import re
import shutil
import subprocess
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

log = logging.getLogger(__name__)

# What CUDA_VISIBLE_DEVICES accepts as one entry: an index, a GPU-/MIG- UUID. No commas or
# spaces, so a list joins back into a value that means exactly these devices.
DEVICE_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.:-]{0,127}")
MAX_DEVICES = 1024
NVIDIA_SMI_TIMEOUT_S = 5.0
_SMI_GPU_LINE = re.compile(r"GPU (\d+):")


@dataclass(frozen=True)
class Devices:
    ids: list[str]
    source: str  # "GPUS", "CUDA_VISIBLE_DEVICES", "nvidia-smi" or "none"


def check_ids(ids: Sequence[str], setting: str = "GPUS") -> list[str]:
    """The ids, if each is a device id and none repeats; else ValueError naming the entry."""
    if len(ids) > MAX_DEVICES:
        raise ValueError(f"{setting}: more than {MAX_DEVICES} devices")
    seen: set[str] = set()
    for device in ids:
        if not DEVICE_ID.fullmatch(device):
            raise ValueError(
                f"{setting}: {device!r} is not a device id (an index such as 0, or a "
                "GPU-/MIG- UUID as nvidia-smi -L shows it)"
            )
        if device in seen:
            raise ValueError(f"{setting}: device {device} is listed twice")
        seen.add(device)
    return list(ids)


def from_cuda_visible_devices(value: str) -> list[str]:
    """The devices a CUDA_VISIBLE_DEVICES value makes visible. As CUDA reads it, the list ends
    at the first entry that is not a device id or is negative (`-1` hides every device)."""
    ids: list[str] = []
    for part in value.split(","):
        device = part.strip()
        if not DEVICE_ID.fullmatch(device) or device in ids or len(ids) >= MAX_DEVICES:
            break
        ids.append(device)
    return ids


def from_nvidia_smi(output: str) -> list[str]:
    """GPU indices from `nvidia-smi -L` ("GPU 0: NVIDIA A100 (UUID: GPU-...)")."""
    found = (_SMI_GPU_LINE.match(line.strip()) for line in output.splitlines())
    return [m.group(1) for m in found if m][:MAX_DEVICES]


def detect(
    configured: list[str] | None,
    environ: Mapping[str, str],
    run: Callable[..., Any] = subprocess.run,
    which: Callable[[str], str | None] = shutil.which,
) -> Devices:
    """The server's GPU devices, found once at startup (see the module doc for the order)."""
    if configured is not None:
        return Devices(list(configured), "GPUS")
    visible = environ.get("CUDA_VISIBLE_DEVICES")
    if visible is not None:
        return Devices(from_cuda_visible_devices(visible), "CUDA_VISIBLE_DEVICES")
    smi = which("nvidia-smi")
    if smi is None:
        return Devices([], "none")
    try:
        done = run(
            [smi, "-L"],
            capture_output=True,
            text=True,
            timeout=NVIDIA_SMI_TIMEOUT_S,
            check=False,
            env={"PATH": "/usr/bin:/bin"},
        )
    except (OSError, subprocess.SubprocessError) as exc:
        log.warning("GPU detection: nvidia-smi -L failed (%s); no GPU slots", exc)
        return Devices([], "none")
    if done.returncode != 0:
        log.warning("GPU detection: nvidia-smi -L exited %s; no GPU slots", done.returncode)
        return Devices([], "none")
    return Devices(from_nvidia_smi(done.stdout), "nvidia-smi")


def need(resources: Mapping[str, Any] | None) -> int:
    """Whole devices a request's `resources` asks for (validation refuses fractions locally;
    a record queued before that rounds up)."""
    value = (resources or {}).get("num_gpus")
    return math.ceil(value) if value else 0


def check_request(resources: Mapping[str, Any] | None, devices: Sequence[str]) -> str | None:
    """Why `resources.num_gpus` cannot run on the local executor with these devices, or None."""
    value = (resources or {}).get("num_gpus")
    if not value:
        return None
    if not float(value).is_integer():
        return (
            f"resources.num_gpus: {value} is not a whole number; the local executor gives "
            "whole devices (fractions of a GPU are for EXECUTOR=ray)"
        )
    if value > len(devices):
        listed = f"GPUS={','.join(devices)}" if devices else "GPUS is empty: no GPUs found"
        return (
            f"resources.num_gpus: {int(value)} GPUs asked for, but this server has "
            f"{len(devices)} ({listed}); ask for at most {len(devices)}"
        )
    return None
