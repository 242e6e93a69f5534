"""The CPU probe and the dtype choice that follows from the CPU's flags."""

from __future__ import annotations

from pathlib import Path

from ecd_ray.hardware import choose_cpu_dtype, cpu_info, has_native_bf16, resolve_dtype

AVX2 = ["fpu", "sse2", "avx", "avx2", "fma"]
AVX512_BF16 = [*AVX2, "avx512f", "avx512_bf16"]
AMX_ONLY = [*AVX2, "amx_tile", "amx_bf16"]


def test_native_bf16_flags() -> None:
    assert not has_native_bf16(AVX2)
    assert has_native_bf16(AVX512_BF16)
    assert has_native_bf16(AMX_ONLY)
    assert not has_native_bf16([])


def test_cpu_dtype_follows_the_flags() -> None:
    dtype, reason = choose_cpu_dtype(AVX512_BF16)
    assert dtype == "bfloat16" and "avx512_bf16" in reason
    dtype, reason = choose_cpu_dtype(AMX_ONLY)
    assert dtype == "bfloat16" and "amx_bf16" in reason
    dtype, reason = choose_cpu_dtype(AVX2)
    assert dtype == "float32"
    assert "avx512_bf16" in reason and "amx_bf16" in reason and "emulated" in reason


def test_resolve_dtype() -> None:
    assert resolve_dtype("auto", on_gpu=True, flags=AVX2)[0] == "bfloat16"
    assert resolve_dtype("auto", on_gpu=False, flags=AVX2)[0] == "float32"
    assert resolve_dtype("auto", on_gpu=False, flags=AVX512_BF16)[0] == "bfloat16"
    assert resolve_dtype("auto", on_gpu=False, flags=AMX_ONLY)[0] == "bfloat16"
    for explicit in ("float32", "bfloat16", "float16"):
        assert resolve_dtype(explicit, on_gpu=False, flags=AVX512_BF16) == (
            explicit, "set in config")
        assert resolve_dtype(explicit, on_gpu=True) == (explicit, "set in config")
    # flags default to this machine's: whatever it is, the answer is one of the two.
    assert resolve_dtype("auto", on_gpu=False)[0] in ("float32", "bfloat16")


def test_cpu_info_on_this_machine() -> None:
    info = cpu_info()
    assert isinstance(info["model"], str) and info["model"]
    assert isinstance(info["flags"], list)
    if Path("/proc/cpuinfo").exists():
        assert info["flags"] and info["flags"] == sorted(info["flags"])


def test_cpu_info_without_proc(tmp_path: Path) -> None:
    info = cpu_info(tmp_path / "absent")
    assert info["model"] and info["flags"] == []
    fake = tmp_path / "cpuinfo"
    fake.write_text("processor\t: 0\nmodel name\t: Test CPU 9000\nflags\t\t: sse2 avx2 "
                    "avx512_bf16\n\nprocessor\t: 1\nmodel name\t: Test CPU 9000\n")
    info = cpu_info(fake)
    assert info == {"model": "Test CPU 9000", "flags": ["avx2", "avx512_bf16", "sse2"]}
