"""The environment a run happened in: versions, devices, git commit. Printed by ``vit-fast info`` and
stored with every benchmark result."""

from __future__ import annotations

import datetime
import os
import platform
import subprocess

import torch

import vit_fast


def _triton_version() -> str | None:
    try:
        import triton

        return triton.__version__
    except Exception:  # noqa: BLE001 - not installed or broken: reported as absent
        return None


def git_commit() -> str | None:
    """The short commit of the source tree vit_fast runs from, when it is a git checkout."""
    here = os.path.dirname(os.path.dirname(os.path.abspath(vit_fast.__file__)))
    try:
        out = subprocess.run(["git", "-C", here, "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                             timeout=5)
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() or None if out.returncode == 0 else None


def devices() -> list[dict]:
    """The CPU (name, cores, threads, features: AMX, AVX-512 BF16/VNNI, ...) and every visible CUDA device."""
    from vit_fast.cpu_features import cpu_features

    cpu = cpu_features()
    found = [{"device": "cpu", "name": cpu.name, "cores": os.cpu_count(), "threads": torch.get_num_threads(),
              "features": cpu.present, "native_bf16": cpu.native_bf16, "int8_dot": cpu.int8_dot}]
    if torch.cuda.is_available():
        for i in range(torch.cuda.device_count()):
            p = torch.cuda.get_device_properties(i)
            found.append({"device": f"cuda:{i}", "name": p.name, "capability": f"{p.major}.{p.minor}",
                          "memory_gib": round(p.total_memory / 2**30, 1)})
    return found


def environment() -> dict:
    """Versions, devices and commit, as a JSON-able dict."""
    return {
        "vit_fast": vit_fast.__version__,
        "torch": torch.__version__,
        "triton": _triton_version(),
        "cuda_runtime": torch.version.cuda,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "git_commit": git_commit(),
        "devices": devices(),
        "time": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    }
