"""What a node can do, discovered from the machine it runs on."""

from __future__ import annotations

import os
import platform
import shutil
from pathlib import Path

import psutil

from fogline import __version__
from fogline.protocol import Capabilities, Load


def _gpu_present() -> bool:
    if Path("/dev/nvidia0").exists() or shutil.which("nvidia-smi"):
        return True
    # AMD ROCm exposes its compute interface here.
    return Path("/dev/kfd").exists()


def discover() -> Capabilities:
    return Capabilities(
        cores=os.cpu_count() or 1,
        memory_bytes=psutil.virtual_memory().total,
        arch=platform.machine(),
        os=f"{platform.system()} {platform.release()}",
        gpu=_gpu_present(),
        version=__version__,
        python=platform.python_version(),
    )


def current_load(process: psutil.Process) -> Load:
    load1 = os.getloadavg()[0] if hasattr(os, "getloadavg") else 0.0
    return Load(cpu_percent=psutil.cpu_percent(interval=None),
                memory_percent=psutil.virtual_memory().percent, load1=load1,
                rss_bytes=process.memory_info().rss)
