"""llama.cpp's own tools, built from the llama-cpp-python sdist that xvq is locked to: the
references tests and bench/ compare against (never xvq's runtime path).

    python -m xvq.anchors build     # fetch the sdist once (pip download), build the tools (~3 min)
    python -m xvq.anchors path llama-imatrix
"""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tarfile
from pathlib import Path

LLAMA_CPP_PYTHON = "0.3.36"
TOOLS = ("llama-quantize", "llama-imatrix", "llama-perplexity")
CACHE = Path(os.environ.get("XVQ_ANCHORS", Path(__file__).resolve().parents[1] / ".cache" / "anchors"))


def sdist_dir() -> Path:
    """vendor/llama.cpp of the locked llama-cpp-python sdist (downloaded once by pip)."""
    root = CACHE / f"llama_cpp_python-{LLAMA_CPP_PYTHON}"
    if not (root / "vendor" / "llama.cpp" / "CMakeLists.txt").is_file():
        CACHE.mkdir(parents=True, exist_ok=True)
        tarballs = list(CACHE.glob(f"llama_cpp_python-{LLAMA_CPP_PYTHON}.tar.gz"))
        if not tarballs:
            subprocess.run([sys.executable, "-m", "pip", "download", "-q", "--no-deps", "--no-binary", ":all:",
                            f"llama-cpp-python=={LLAMA_CPP_PYTHON}", "-d", str(CACHE)], check=True)
            tarballs = list(CACHE.glob(f"llama_cpp_python-{LLAMA_CPP_PYTHON}.tar.gz"))
        with tarfile.open(tarballs[0]) as tar:
            tar.extractall(CACHE, filter="data")
    return root / "vendor" / "llama.cpp"


def convert_script() -> Path:
    return sdist_dir() / "convert_hf_to_gguf.py"


def gguf_py() -> Path:
    """llama.cpp's own gguf-py, to put first on PYTHONPATH when running its converter."""
    return sdist_dir() / "gguf-py"


def build_dir() -> Path:
    return CACHE / "build"


def tool(name: str, build: bool = True) -> Path | None:
    exe = build_dir() / "bin" / name
    if not exe.is_file() and build:
        build_tools()
    return exe if exe.is_file() else None


def build_tools() -> None:
    src = sdist_dir()
    if not all((build_dir() / "bin" / t).is_file() for t in TOOLS):
        subprocess.run(["cmake", "-S", str(src), "-B", str(build_dir()), "-DCMAKE_BUILD_TYPE=Release",
                        "-DGGML_NATIVE=OFF", "-DLLAMA_CURL=OFF", "-DLLAMA_BUILD_TESTS=OFF",
                        "-DLLAMA_BUILD_SERVER=OFF", "-DLLAMA_BUILD_EXAMPLES=OFF", "-DLLAMA_OPENSSL=OFF"],
                       check=True, stdout=subprocess.DEVNULL)
        subprocess.run(["cmake", "--build", str(build_dir()), "--config", "Release", "-j",
                        str(os.cpu_count() or 2), "--target", *TOOLS], check=True, stdout=subprocess.DEVNULL)


def available() -> bool:
    return all((build_dir() / "bin" / t).is_file() for t in TOOLS)


def run_tool(name: str, *args: str, **kw) -> subprocess.CompletedProcess:
    exe = tool(name)
    return subprocess.run([str(exe), *map(str, args)], capture_output=True, text=True, **kw)


if __name__ == "__main__":
    cmd = sys.argv[1] if len(sys.argv) > 1 else "build"
    if cmd == "build":
        if shutil.which("cmake") is None:
            sys.exit("cmake not found: install cmake to build llama.cpp's reference tools")
        build_tools()
        print(f"llama.cpp tools in {build_dir() / 'bin'}")
    elif cmd == "path":
        print(tool(sys.argv[2]))
