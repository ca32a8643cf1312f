"""The process-wide switches of the decode kernels, set from the environment at a command's edge.

A command (the runner, dejavu-lm-eval, the benchmarks, the teardown) calls
apply_environment(os.environ) once at its start; nothing below reads the environment.

  DEJAVU_CPU_KERNELS=0        no C kernels: torch ops everywhere (cpu_kernels.configure)
  DEJAVU_HUGE_PAGES=0         weights stay where they were loaded (huge_pages.configure)
  DEJAVU_KERNEL_CACHE=DIR     where the compiled kernels are kept
  CC=COMPILER                 the C compiler that builds them
"""

from .. import cpu_kernels
from . import huge_pages


def apply_environment(environ):
    huge_pages.configure(environ.get("DEJAVU_HUGE_PAGES", "1") != "0")
    cpu_kernels.configure(enabled=environ.get("DEJAVU_CPU_KERNELS", "1") != "0",
                          cache_folder=environ.get("DEJAVU_KERNEL_CACHE") or None,
                          compiler=environ.get("CC") or None)
