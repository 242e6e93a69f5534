"""What the machine can do, and the dtype choices that follow from it.

On CPUs without native bf16 instructions (``avx512_bf16`` or ``amx_bf16``) PyTorch emulates
bf16 matmuls by converting to fp32 and back, which is slower than plain fp32 (measured 2.7x
slower on an AVX2 EPYC). So ``auto`` picks bf16 on a GPU, bf16 on a CPU with native bf16, and
fp32 on every other CPU.
"""

from __future__ import annotations

import platform
from collections.abc import Iterable
from pathlib import Path
from typing import Any

NATIVE_BF16_FLAGS = ("avx512_bf16", "amx_bf16")


def cpu_info(cpuinfo_path: str | Path = "/proc/cpuinfo") -> dict[str, Any]:
    """The CPU's model name and sorted feature flags.

    Reads ``cpuinfo_path`` (Linux); where it is absent or unreadable, ``model`` falls back to
    :func:`platform.processor` (or ``"unknown"``) and ``flags`` is empty.
    """
    model = ""
    flags: set[str] = set()
    try:
        text = Path(cpuinfo_path).read_text(errors="replace")
    except OSError:
        text = ""
    for line in text.splitlines():
        key, sep, value = line.partition(":")
        if not sep:
            continue
        key = key.strip().lower()
        if key == "model name" and not model:
            model = value.strip()
        elif key in ("flags", "features") and not flags:  # "Features" on ARM
            flags = set(value.split())
    if not model:
        model = platform.processor() or platform.machine() or "unknown"
    return {"model": model, "flags": sorted(flags)}


def has_native_bf16(flags: Iterable[str]) -> bool:
    """True iff the CPU flags include a native bf16 instruction set."""
    present = set(flags)
    return any(f in present for f in NATIVE_BF16_FLAGS)


def choose_cpu_dtype(flags: Iterable[str]) -> tuple[str, str]:
    """``("bfloat16", reason)`` on a CPU with native bf16, else ``("float32", reason)``;
    ``reason`` names the flags that decided it."""
    present = set(flags)
    found = [f for f in NATIVE_BF16_FLAGS if f in present]
    if found:
        return "bfloat16", f"{'/'.join(found)} present"
    return "float32", ("no avx512_bf16/amx_bf16 (bf16 is emulated: measured 2.7x slower than "
                       "fp32 on an AVX2 EPYC)")


def resolve_dtype(requested: str, on_gpu: bool, flags: Iterable[str] | None = None
                  ) -> tuple[str, str]:
    """The dtype name to load a model in, and why.

    ``auto`` is bf16 on a GPU and :func:`choose_cpu_dtype` on a CPU (``flags`` default to this
    machine's); any other value passes through unchanged with reason ``"set in config"``.
    """
    if requested != "auto":
        return requested, "set in config"
    if on_gpu:
        return "bfloat16", "GPU"
    if flags is None:
        flags = cpu_info()["flags"]
    return choose_cpu_dtype(flags)
