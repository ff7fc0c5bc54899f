"""``train.amp: auto``: bf16 on a CUDA GPU of compute capability >= 8.0 and on a CPU with AVX512-BF16 or AMX, else
off; the probes are faked (a capability, a ``/proc/cpuinfo`` written here)."""

import pytest
import torch

from hafis import precision
from hafis.config import config_changes, load_config, to_dict
from hafis.precision import cpu_flags, resolve_amp

# the first lines of /proc/cpuinfo as Linux writes them (x86: "flags"; Arm: "Features")
X86 = "processor\t: 0\nvendor_id\t: AuthenticAMD\nmodel name\t: AMD EPYC\nflags\t\t: fpu sse2 avx2 {extra}\n\n" \
      "processor\t: 1\nflags\t\t: fpu\n"
ARM = "processor\t: 0\nBogoMIPS\t: 50.00\nFeatures\t: fp asimd sve bf16 i8mm\n"


@pytest.fixture
def cpuinfo(tmp_path, monkeypatch):
    """``cpuinfo(text)``: the real probe (in place of the suite's autouse fake) reading ``text`` as /proc/cpuinfo."""
    monkeypatch.setattr(precision, "cpu_flags", cpu_flags)
    path = tmp_path / "cpuinfo"
    monkeypatch.setattr(precision, "CPUINFO", str(path))

    def write(text):
        path.write_text(text)
        return path
    return write


@pytest.mark.parametrize("extra, found", [
    ("avx512f avx512_vnni avx512_bf16", "avx512_bf16"),    # Zen 4, Cooper Lake
    ("avx512f amx_tile amx_bf16 amx_int8", "amx_bf16"),     # Sapphire Rapids
    ("avx512f avx512_vnni", None),                         # AVX-512 without its bf16 instructions: emulated
    ("", None),
])
def test_auto_on_a_cpu_reads_its_flags(cpuinfo, extra, found):
    cpuinfo(X86.format(extra=extra))
    assert resolve_amp("auto", "cpu") == (("bf16", f"train.amp=auto: CPU flag(s) {found}") if found else
                                          ("off", "train.amp=auto: the CPU has no avx512_bf16 or amx_bf16"))
    assert precision.cpu_native_bf16() is (found is not None)


def test_only_the_first_cpus_flags_are_read(cpuinfo):
    cpuinfo(X86.format(extra="avx512_bf16"))
    assert cpu_flags() == {"fpu", "sse2", "avx2", "avx512_bf16"}


def test_an_arm_cpu_and_an_unreadable_cpuinfo_are_off(cpuinfo, tmp_path, monkeypatch):
    cpuinfo(ARM)  # Arm's bf16 is no x86 flag: oneDNN's bf16 kernels are the x86 ones
    assert cpu_flags() == {"fp", "asimd", "sve", "bf16", "i8mm"}
    assert resolve_amp("auto", "cpu")[0] == "off"
    monkeypatch.setattr(precision, "CPUINFO", str(tmp_path / "absent"))  # macOS, Windows
    assert cpu_flags() is None and precision.cpu_native_bf16() is None
    assert resolve_amp("auto", "cpu") == ("off", "train.amp=auto: the CPU's flags cannot be read (no /proc/cpuinfo)")


@pytest.mark.parametrize("capability, expected", [((7, 5), "off"), ((8, 0), "bf16"), ((8, 6), "bf16"),
                                                  ((9, 0), "bf16")])
def test_auto_on_cuda_follows_the_compute_capability(monkeypatch, capability, expected):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(precision, "cuda_capability", lambda device: capability)
    amp, why = resolve_amp("auto", "cuda")
    assert amp == expected
    assert why == (f"train.amp=auto: CUDA compute capability {capability[0]}.{capability[1]} "
                   f"{'<' if expected == 'off' else '>='} 8.0")
    assert resolve_amp("auto", "auto")[0] == expected  # train.device: auto is CUDA when there is one


def test_auto_without_cuda_and_the_other_modes(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert resolve_amp("auto", "cuda") == ("off", "train.amp=auto: no CUDA device is available")
    monkeypatch.setattr(precision, "cpu_flags", lambda: frozenset({"avx512_bf16"}))
    assert resolve_amp("auto", "auto")[0] == "bf16"  # train.device: auto without CUDA is the CPU
    for amp in ("off", "bf16", "fp16"):  # chosen by the user: the device is not asked
        assert resolve_amp(amp, "cuda") == (amp, f"train.amp={amp}")


@pytest.mark.cuda
def test_auto_agrees_with_torchs_own_probe_on_this_gpu():
    native = torch.cuda.is_bf16_supported(including_emulation=False)
    assert resolve_amp("auto", "cuda")[0] == ("bf16" if native else "off")


def test_resume_compares_train_amp_by_the_precision_it_means(monkeypatch):
    """``config_changes`` (resume, and ``hafis compare``'s check of an existing run folder): bf16 -> auto is no
    change where auto means bf16, and a change where it means off."""
    new = load_config(None, ["train.amp=auto", "train.device=cpu"])
    old = to_dict(new)
    old["train"]["amp"] = "bf16"
    monkeypatch.setattr(precision, "cpu_flags", lambda: frozenset({"amx_bf16"}))
    assert config_changes(old, new) == {}
    monkeypatch.setattr(precision, "cpu_flags", lambda: frozenset())
    assert config_changes(old, new) == {"train.amp": ("bf16", "auto (off)")}
    old["train"]["amp"] = "auto"
    assert config_changes(old, new) == {}  # the same word: the trainer compares the checkpoint's precision
    old["train"]["amp"] = "fp16"
    assert config_changes(old, load_config(None, ["train.amp=bf16"])) == {"train.amp": ("fp16", "bf16")}
