"""Builds the optional C extensions (everything else is in pyproject.toml):
- kvfs._native, the data plane's hot loops. If no C compiler is present the
  install goes on without it and kvfs uses its pure-Python data plane
  (kvfs._native_py).
- kvfsd._cfuse, the C mount (libfuse's low-level API), where pkg-config
  finds libfuse3 (libfuse3-dev). Without it the mount is pyfuse3's."""
import subprocess

from setuptools import Extension, setup
from setuptools.command.build_ext import build_ext


def _pkg_config(*args: str) -> list[str] | None:
    try:
        out = subprocess.run(["pkg-config", *args], capture_output=True, text=True, check=True).stdout
    except (OSError, subprocess.CalledProcessError):
        return None
    return out.split()


def _cfuse() -> list[Extension]:
    cflags, libs = _pkg_config("--cflags", "fuse3"), _pkg_config("--libs", "fuse3")
    if cflags is None or libs is None:
        print("warning: libfuse3 not found by pkg-config (apt install libfuse3-dev pkg-config): "
              "kvfsd._cfuse not built; the mount will be pyfuse3's")
        return []
    return [Extension(
        "kvfsd._cfuse", ["native/cfuse.c", "native/cfuse_read.c", "native/cfuse_write.c",
                             "native/cfuse_null.c"],
        include_dirs=["native"],
        extra_compile_args=["-O2", "-std=gnu11", "-Wall", "-Wno-missing-field-initializers", *cflags],
        extra_link_args=libs,
        libraries=["pthread"],
    )]


class OptionalBuildExt(build_ext):
    def run(self) -> None:
        try:
            super().run()
        except Exception as e:  # noqa: BLE001 - a missing compiler must not fail the install
            print(f"warning: kvfs._native not built ({e}); using the pure-Python data plane")

    def build_extension(self, ext: Extension) -> None:
        try:
            super().build_extension(ext)
        except Exception as e:  # noqa: BLE001
            print(f"warning: {ext.name} not built ({e}); "
                  + ("the mount will be pyfuse3's" if ext.name == "kvfsd._cfuse" else "using the pure-Python data plane"))


setup(
    ext_modules=[Extension(
        "kvfs._native", ["native/kvfs_native.c", "native/hash_generic.c", "native/hash_avx2.c",
                          "native/directory.c", "native/socket_wait.c", "native/records.c",
                          "native/mirror.c", "native/put_items.c",
                          "native/write_back.c", "native/arena_alloc.c", "native/plans.c",
                          "native/placement.c"],
        include_dirs=["native", "kvfs"],  # kvfs/xxh3_lanes.h: shared with the GPU kernels
        extra_compile_args=["-O3", "-std=c11", "-Wall", "-Wno-missing-field-initializers"],
        libraries=["pthread"],
    )] + _cfuse(),
    cmdclass={"build_ext": OptionalBuildExt},
)
