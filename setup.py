"""Build pyfastattn._C: the CPU kernels always, the CUDA kernels when possible.

Environment:
  PYFASTATTN_BUILD_CUDA=0|1|auto   auto (default): build CUDA when torch is a CUDA
                                   build and nvcc is found. 1: fail if it can't.
  PYFASTATTN_CUDA_ARCHS            e.g. "8.0+PTX;9.0a". Each entry becomes a
                                   -gencode for that SM; +PTX also embeds PTX for
                                   newer GPUs to JIT. When neither it nor
                                   TORCH_CUDA_ARCH_LIST is set: the archs of the
                                   visible GPUs (9.0 as 9.0a), or, with no GPU
                                   visible (a docker image build), "8.0+PTX;9.0a".
  TORCH_CUDA_ARCH_LIST             read as PYFASTATTN_CUDA_ARCHS when that is unset
                                   (numbers only, e.g. "8.0;8.6+PTX").
  MAX_JOBS                         parallel compile jobs (ninja), e.g. MAX_JOBS=2;
                                   unset: ninja's default (cores + 2).
  CUDA_HOME                        the toolkit; otherwise /usr/local/cuda or the
                                   real location of the nvcc on PATH.
  PYFASTATTN_DEBUG_INFO=1          keep the -g that Python's own CFLAGS add to
                                   every host compile (dropped by default: debug
                                   info of torch's templates is a third of the
                                   host compile time and most of the .so's size).

Install with `pip install --no-build-isolation .`: an isolated build would pull
another torch and produce a module whose ABI doesn't match the installed one.

Objects are kept in build/<python>-torch<version>-<cpu|cuda>/ (ninja's
build.ninja, .ninja_log and the .o files), also under `pip install -e`, whose
setuptools otherwise compiles in a fresh temporary directory every time: so a
second install of an unchanged tree recompiles nothing (ninja finds every
object up to date, headers included) and only relinks. Delete build/ for a
clean build. `python benchmarks/build_times.py` prints the per-file compile
times of the last build from that .ninja_log.
"""

from __future__ import annotations

import glob
import os
import shutil
import sys
import warnings

from setuptools import setup

ROOT = os.path.dirname(os.path.abspath(__file__))
# SASS for A100-class (runs on sm_80..89) and Hopper (sm_90a: runs on sm_90
# only), plus sm_80 PTX so newer GPUs (sm_100, sm_120) can JIT the kernels.
DEFAULT_ARCHS = "8.0+PTX;9.0a"


def _find_cuda_home() -> str | None:
    """The toolkit root, without trusting torch's guess.

    torch derives CUDA_HOME from the nvcc on PATH; where that is a wrapper in
    /usr/local/bin it guesses /usr/local and the link fails on -lcudart.
    So: CUDA_HOME/CUDA_PATH, else /usr/local/cuda, else the directory above the
    *resolved* nvcc's bin/, and in every case require bin/nvcc and a cudart.
    """
    candidates = [os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH"), "/usr/local/cuda"]
    nvcc = shutil.which("nvcc")
    if nvcc:
        candidates.append(os.path.dirname(os.path.dirname(os.path.realpath(nvcc))))
    for c in candidates:
        if not c:
            continue
        has_nvcc = os.path.isfile(os.path.join(c, "bin", "nvcc"))
        has_cudart = any(
            glob.glob(os.path.join(c, lib, "libcudart*")) for lib in ("lib64", "lib", "targets/*/lib")
        )
        if has_nvcc and has_cudart:
            return c
    return None


def _shared_libstdcxx() -> list[str]:
    """The shared libstdc++ that the C++ compiler links by default, as a path.

    It goes on the link line right after the module's own objects, before any
    library, so that every libstdc++ symbol the module uses binds to the shared
    library the process runs with, never to a static copy linked into the
    module. The module built on the lent H200's image (g++ 13.3, torch 2.11)
    carried libstdc++'s locale code itself (`nm` listed
    std::codecvt<char16_t, ...> as defined in _C.so) and crashed formatting any
    number into an argument error (benchmarks/results/H200/README.md). Checked
    on the development machine with a small library: linked with
    -static-libstdc++ it defines 11 of libstdc++'s locale functions, and none
    when this path comes right after its objects. On a machine whose link is
    already dynamic this changes nothing: the same library, one DT_NEEDED
    entry. Empty where the compiler does not name one
    (not Linux, or not GCC's runtime)."""
    if not sys.platform.startswith("linux"):
        return []
    import shlex
    import subprocess

    cxx = shlex.split(os.environ.get("CXX", "c++")) or ["c++"]
    try:
        out = subprocess.run([*cxx, "-print-file-name=libstdc++.so.6"], capture_output=True, text=True,
                             timeout=60).stdout.strip()  # fmt: skip
    except (OSError, subprocess.SubprocessError):
        return []
    return [os.path.realpath(out)] if os.path.isabs(out) and os.path.isfile(out) else []


def _cuda_decision() -> tuple[bool, str | None, str]:
    """(build_cuda, cuda_home, why) from PYFASTATTN_BUILD_CUDA and the environment."""
    import torch

    mode = os.environ.get("PYFASTATTN_BUILD_CUDA", "auto").strip().lower()
    if mode not in ("0", "1", "auto"):
        raise SystemExit(f"PYFASTATTN_BUILD_CUDA must be 0, 1 or auto, got {mode!r}")
    if mode == "0":
        return False, None, "PYFASTATTN_BUILD_CUDA=0"
    home = _find_cuda_home()
    problems = []
    if not torch.version.cuda:
        problems.append(f"torch {torch.__version__} is not a CUDA build (torch.version.cuda is None)")
    if home is None:
        problems.append("no CUDA toolkit with bin/nvcc and libcudart found (set CUDA_HOME)")
    if problems:
        if mode == "1":
            raise SystemExit("PYFASTATTN_BUILD_CUDA=1 but CUDA cannot be built: " + "; ".join(problems))
        return False, None, "; ".join(problems)
    return True, home, f"torch CUDA {torch.version.cuda}, toolkit {home}"


def _visible_gpu_archs() -> str | None:
    """The archs of the GPUs this machine shows to torch ("8.6;9.0a"), or None.

    Hopper gets 9.0a (the default's Hopper target); others their own major.minor.
    No PTX: the build is for these GPUs only, so it is both smaller and faster.
    """
    import torch

    with warnings.catch_warnings():  # a CUDA torch on a machine without a GPU warns here
        warnings.simplefilter("ignore")
        if not torch.cuda.is_available():
            return None
        caps = sorted({torch.cuda.get_device_capability(i) for i in range(torch.cuda.device_count())})
    return ";".join(f"{ma}.{mi}{'a' if (ma, mi) == (9, 0) else ''}" for ma, mi in caps) or None


def _cuda_archs() -> tuple[str, str]:
    """(archs, where they came from): PYFASTATTN_CUDA_ARCHS, TORCH_CUDA_ARCH_LIST,
    the visible GPUs, or the default for a machine without a GPU."""
    for var in ("PYFASTATTN_CUDA_ARCHS", "TORCH_CUDA_ARCH_LIST"):
        value = os.environ.get(var, "").strip()
        if value:
            return value.replace(" ", ";"), var
    visible = _visible_gpu_archs()
    if visible:
        return visible, "the visible GPUs"
    return DEFAULT_ARCHS, "the default: no GPU visible"


def _gencode_flags(archs: str) -> list[str]:
    flags = []
    for a in archs.replace(",", ";").split(";"):
        a = a.strip()
        if not a:
            continue
        ptx = a.endswith("+PTX")
        num = a.removesuffix("+PTX").replace(".", "")
        if not num.rstrip("a").isdigit():
            raise SystemExit(
                f"PYFASTATTN_CUDA_ARCHS: cannot parse {a!r} (expected e.g. 8.0, 8.0+PTX or 9.0a)"
            )
        flags.append(f"-gencode=arch=compute_{num},code=sm_{num}")
        if ptx:
            flags.append(f"-gencode=arch=compute_{num},code=compute_{num}")
    if not flags:
        raise SystemExit("PYFASTATTN_CUDA_ARCHS is empty")
    return flags


def _build_dir(build_cuda: bool) -> str:
    """A build directory kept between builds, one per (python, torch, CPU/CUDA),
    so that builds for different environments never share objects."""
    import torch

    tag = f"py{sys.version_info.major}{sys.version_info.minor}-torch{torch.__version__}-{'cuda' if build_cuda else 'cpu'}"
    return os.path.join(ROOT, "build", tag.replace("+", "_"))


def _extensions():
    build_cuda, cuda_home, why = _cuda_decision()
    archs, archs_from = _cuda_archs() if build_cuda else (DEFAULT_ARCHS, "")
    if build_cuda:
        # Must happen before torch.utils.cpp_extension is imported: it reads
        # CUDA_HOME and, with no GPU, TORCH_CUDA_ARCH_LIST (else IndexError).
        os.environ["CUDA_HOME"] = cuda_home
        os.environ["TORCH_CUDA_ARCH_LIST"] = archs.replace(",", ";").replace("+PTX", "")
    from torch.utils.cpp_extension import BuildExtension, CppExtension, CUDAExtension

    print(f"pyfastattn: building CUDA kernels: {build_cuda} ({why})", file=sys.stderr)
    if build_cuda:
        print(f"pyfastattn: CUDA archs {archs} (from {archs_from})", file=sys.stderr)
    # Every .cpp outside csrc/cuda is CPU code and always built; csrc/cuda holds
    # the CUDA glue (.cpp, with torch headers) and the kernels (.cu, without).
    all_cpp = sorted(glob.glob("csrc/**/*.cpp", recursive=True))
    sources = [f for f in all_cpp if not f.startswith("csrc/cuda/")]
    # torch picks the C++ standard its headers need. -fopenmp: at::parallel_for
    # is inline OpenMP code in torch's headers; without it the CPU kernels
    # silently run on one thread.
    cxx = ["-O3", "-fvisibility=hidden", "-fopenmp"]
    define_macros = []
    kwargs = {}
    if build_cuda:
        sources += [f for f in all_cpp if f.startswith("csrc/cuda/")]
        sources += sorted(glob.glob("csrc/cuda/**/*.cu", recursive=True))
        define_macros += [("PYFASTATTN_WITH_CUDA", None), ("PYFASTATTN_CUDA_ARCHS", f'"{archs}"')]
        nvcc = ["-O3", "--expt-relaxed-constexpr", "-lineinfo", *_gencode_flags(archs)]
        kwargs["extra_compile_args"] = {"cxx": cxx, "nvcc": nvcc}
        ext_cls = CUDAExtension
    else:
        kwargs["extra_compile_args"] = {"cxx": cxx}
        ext_cls = CppExtension
    kwargs["extra_link_args"] = ["-fopenmp"]
    kwargs["extra_objects"] = _shared_libstdcxx()
    ext = ext_cls(
        "pyfastattn._C",
        sources,
        define_macros=define_macros,
        include_dirs=[os.path.join(ROOT, "csrc")],
        **kwargs,
    )
    build_temp = _build_dir(build_cuda)

    class BuildExt(BuildExtension):
        """torch's BuildExtension (ninja), compiling in a kept directory.

        `pip install -e .` runs setuptools' editable_wheel, which points
        build_temp at a fresh temporary directory: every install then
        recompiled the whole extension. With the objects and ninja's log kept,
        ninja recompiles only what changed (it tracks headers too).
        """

        def finalize_options(self):
            given = self.build_temp is not None  # build_ext --build-temp DIR wins
            super().finalize_options()
            if not given:
                self.build_temp = build_temp

        def build_extensions(self):
            # Python's CFLAGS (sysconfig) carry -g, which torch's ninja file
            # passes to every host compile; without it api.cpp compiles in
            # 6.4 s of CPU instead of 9.9 (see PERF_NOTES.md, "Build time").
            if os.environ.get("PYFASTATTN_DEBUG_INFO", "0") != "1":
                self.compiler.compiler_so = [
                    f for f in self.compiler.compiler_so if f not in ("-g", "-g3", "-ggdb")
                ]
            super().build_extensions()

    return [ext], BuildExt.with_options(use_ninja=True)


ext_modules, build_ext = _extensions()
setup(ext_modules=ext_modules, cmdclass={"build_ext": build_ext})
