"""Which launcher started this process, and whether the MPI world agrees with it.

A launcher that does not hand its processes to MPI through a PMI the MPI library understands
(``torchrun``, ``srun --mpi=none``, ``srun`` whose default plugin is ``none``, another MPI's
``mpiexec``) starts n processes that each initialize MPI as a world of one: n identical
single-rank runs, all "successful". :func:`check_world` (called by :func:`pybrain_mpi.init`)
compares the size the launcher announces in the environment with the MPI world and raises
:class:`LaunchMismatch` with a one-line reason and fix when they differ.

Which variable describes this process's launch, innermost launcher first:

1. ``TORCHELASTIC_RUN_ID`` + ``WORLD_SIZE``: torchrun (its processes are never MPI ranks).
2. ``OMPI_COMM_WORLD_SIZE``: Open MPI's ``mpirun``/``mpiexec``.
3. ``PMI_SIZE``: a PMI server started this rank: MPICH's hydra ``mpiexec`` (and Intel MPI's),
   or ``srun --mpi=pmi2``. Slurm variables seen beside hydra's describe hydra's own proxies
   (one Slurm task per node), not the ranks, so they are not compared.
4. ``SLURM_STEP_NUM_TASKS``: an ``srun`` step (any plugin). Only step variables count: in a
   batch script or an ``salloc`` shell ``SLURM_NTASKS`` is the allocation, and a process
   started there without srun is a legitimate singleton (or runs its own ``mpiexec``).
5. ``WORLD_SIZE`` + ``RANK`` alone: a torch-style launcher (torch.distributed.launch, ...).

Nothing of the above: a singleton, which is always fine. ``PBM_LAUNCH_CHECK=0`` turns the
check off for launchers this logic does not know.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass

from ..errors import PbmError

__all__ = ["Launch", "LaunchMismatch", "detect", "srun_mpi_plugin", "check_before_mpi_init",
           "check_world", "mismatch_message"]

# srun's --mpi plugin for each MPI family the core can be built against. Open MPI 4/5 as built
# by distributions and most sites only speaks PMIx; MPICH, Intel MPI and MVAPICH take PMI-2.
_PLUGIN_BY_FAMILY = (("open mpi", "pmix"), ("mpich", "pmi2"), ("intel", "pmi2"), ("mvapich", "pmi2"))
DEFAULT_PLUGIN = "pmi2"


class LaunchMismatch(PbmError):
    """The launcher started a different number of processes than the MPI world holds."""


@dataclass(frozen=True)
class Launch:
    """What the environment says about how this process was started."""

    launcher: str          # "torchrun", "mpirun (Open MPI)", "mpiexec (hydra)", "srun", "none", ...
    size: int | None       # processes the launcher started (None: none announced)
    rank: int | None       # this process's rank among them, when announced
    variable: str          # "SLURM_STEP_NUM_TASKS=4": the variable that says so ("" if none)
    pmi: str               # how ranks reach their PMI: "PMI-2 (Slurm mpi/pmi2)", "none", ...
    srun_mpi: str | None   # the srun --mpi plugin of this step ("none" when none), None off srun
    detail: str            # human-readable: Slurm job and step, nodes

    def describe(self) -> str:
        """One line for ``pybrain-mpi info``."""
        if self.launcher == "none":
            return "none (a singleton: no launcher variables in the environment)"
        text = self.launcher
        if self.srun_mpi is not None:
            text += f" --mpi={self.srun_mpi}"
        if self.size is not None:
            text += f", {self.size} process(es) ({self.variable})"
        return text + (f", {self.detail}" if self.detail else "")


def _int(environ: Mapping[str, str], name: str) -> int | None:
    raw = environ.get(name, "").strip()
    try:
        return int(raw) if raw else None
    except ValueError:
        return None


def _pmi(environ: Mapping[str, str], srun_mpi: str | None) -> str:
    namespace = environ.get("PMIX_NAMESPACE", "")
    version = environ.get("PMIX_VERSION")
    if namespace:
        version_text = f" {version}" if version else ""
        if namespace.startswith("slurm.pmix"):
            return f"PMIx{version_text} (Slurm's mpi/pmix plugin)"
        if "OMPI_COMM_WORLD_SIZE" in environ:
            return f"PMIx{version_text} (Open MPI's launcher)"
        return f"PMIx{version_text} (namespace {namespace})"
    if "PMI_FD" in environ or "PMI_PORT" in environ:
        if "MPI_LOCALNRANKS" in environ:
            return "PMI (MPICH hydra's PMI server)"
        if srun_mpi == "pmi2":
            return "PMI-2 (Slurm's mpi/pmi2 plugin)"
        return "PMI (PMI_FD/PMI_PORT)"
    if "PALS_RANKID" in environ:
        return "Cray PALS"
    return "none"


def _slurm_detail(environ: Mapping[str, str]) -> str:
    job, step = environ.get("SLURM_JOB_ID"), environ.get("SLURM_STEP_ID")
    nodes = environ.get("SLURM_STEP_NUM_NODES") or environ.get("SLURM_JOB_NUM_NODES")
    nodelist = environ.get("SLURM_STEP_NODELIST") or environ.get("SLURM_JOB_NODELIST")
    parts = []
    if job:
        parts.append(f"Slurm job {job}" + (f" step {step}" if step else ""))
    if nodes:
        parts.append(f"{nodes} node(s)" + (f" {nodelist}" if nodelist else ""))
    return ", ".join(parts)


def detect(environ: Mapping[str, str] | None = None) -> Launch:
    """Reads the launcher of this process from the environment (``os.environ`` by default).

    ``os.environ`` is the environment the process started with (plus what Python code set),
    not what the MPI library may have added during its initialization.
    """
    env = os.environ if environ is None else environ
    in_step = "SLURM_STEP_ID" in env or "SLURM_STEPID" in env
    srun_mpi = (env.get("SLURM_MPI_TYPE") or "none") if in_step else None
    pmi = _pmi(env, srun_mpi)
    slurm = _slurm_detail(env) if "SLURM_JOB_ID" in env else ""

    world = _int(env, "WORLD_SIZE")
    if "TORCHELASTIC_RUN_ID" in env and world is not None:
        return Launch("torchrun", world, _int(env, "RANK"), f"WORLD_SIZE={world}", pmi, None, slurm)
    ompi = _int(env, "OMPI_COMM_WORLD_SIZE")
    if ompi is not None:
        return Launch("mpirun (Open MPI)", ompi, _int(env, "OMPI_COMM_WORLD_RANK"),
                      f"OMPI_COMM_WORLD_SIZE={ompi}", pmi, None, "")
    pmi_size = _int(env, "PMI_SIZE")
    if pmi_size is not None:
        if in_step and "MPI_LOCALNRANKS" not in env and srun_mpi not in (None, "none"):
            return Launch("srun", pmi_size, _int(env, "PMI_RANK"), f"PMI_SIZE={pmi_size}", pmi,
                          srun_mpi, slurm)
        # hydra (MPICH, Intel MPI); inside a Slurm job it starts its proxies with srun, so the
        # Slurm step variables count proxies, not ranks.
        return Launch("mpiexec (hydra)", pmi_size, _int(env, "PMI_RANK"), f"PMI_SIZE={pmi_size}",
                      pmi, None, slurm if in_step else "")
    if in_step:
        tasks = _int(env, "SLURM_STEP_NUM_TASKS")
        name = "SLURM_STEP_NUM_TASKS"
        if tasks is None:  # Slurm older than 15.08 has no step variables in the task environment
            tasks, name = _int(env, "SLURM_NTASKS"), "SLURM_NTASKS"
        if tasks is not None:
            return Launch("srun", tasks, _int(env, "SLURM_PROCID"), f"{name}={tasks}", pmi,
                          srun_mpi, slurm)
    if world is not None and "RANK" in env:
        return Launch("a torch launcher", world, _int(env, "RANK"), f"WORLD_SIZE={world}", pmi,
                      None, "")
    return Launch("none", None, None, "", pmi, None, slurm)


def _compiled_vendor() -> str:
    from ..core.library import _core

    return str(_core.compiled_mpi_vendor())


def srun_mpi_plugin(vendor: str | None = None, environ: Mapping[str, str] | None = None) -> str:
    """The ``srun --mpi=`` plugin for the MPI the core was built against.

    ``PBM_SRUN_MPI`` overrides it (a site whose Open MPI has PMI-2 support, a Cray's
    ``cray_shasta``); otherwise PMIx for Open MPI, PMI-2 for MPICH and its derivatives.
    """
    env = os.environ if environ is None else environ
    override = env.get("PBM_SRUN_MPI", "").strip()
    if override:
        return override
    text = (vendor if vendor is not None else _compiled_vendor()).lower()
    for family, plugin in _PLUGIN_BY_FAMILY:
        if family in text:
            return plugin
    return DEFAULT_PLUGIN


def mismatch_message(launch: Launch, mpi_size: int, vendor: str | None = None,
                     environ: Mapping[str, str] | None = None) -> str | None:
    """The one-line refusal when ``launch`` disagrees with an MPI world of ``mpi_size``, else None."""
    if launch.size is None or launch.size == mpi_size:
        return None
    vendor = vendor if vendor is not None else _compiled_vendor()
    plugin = srun_mpi_plugin(vendor, environ)
    n = launch.size
    seen = f"but this process's MPI world has {mpi_size} rank{'s' if mpi_size != 1 else ''}"
    alone = mpi_size == 1
    srun_fix = f"`srun --mpi={plugin} ...` (what this {vendor} build needs: `pybrain-mpi info --pmi`)"
    if launch.launcher in ("torchrun", "a torch launcher"):
        return (f"{launch.launcher} started {n} processes ({launch.variable}) {seen}: pybrain-mpi "
                f"ranks are MPI processes, which {launch.launcher} does not connect; launch with "
                f"`mpiexec -n {n} ...` or {srun_fix} instead")
    if launch.launcher == "srun":
        if alone:
            how = ("without a PMI plugin" if launch.srun_mpi in (None, "none")
                   else f"with --mpi={launch.srun_mpi}, which this build does not use")
            why = f"srun started the tasks {how}, so each is a world of its own"
        else:
            why = "the MPI world is not the srun step"
        return (f"srun started {n} tasks ({launch.variable}) {seen}: {why}; launch with "
                f"{srun_fix}, or sbatch slurm/train.sbatch, which picks it")
    if alone:
        why = (f"this {launch.launcher} belongs to another MPI than the {vendor} this build uses, "
               "so each process is a world of its own")
    else:
        why = "the MPI world is not the one the launcher started"
    return (f"{launch.launcher} started {n} ranks ({launch.variable}) {seen}: {why}; use the "
            f"launcher of the MPI pybrain-mpi was built with (`pybrain-mpi info` shows it), "
            f"e.g. the mpiexec beside this python, or {srun_fix}")


def _loaded_libmpi() -> str | None:
    """Path of the libmpi this process has loaded (through the native core), from /proc/self/maps."""
    try:
        with open("/proc/self/maps", encoding="utf-8", errors="replace") as maps:
            for line in maps:
                path = line.rstrip("\n").split(None, 5)[-1] if line.count(" ") >= 5 else ""
                if os.path.basename(path).startswith("libmpi.so"):
                    return path
    except OSError:
        pass
    return None


def _open_mpi_speaks_pmi(vendor: str) -> bool | None:
    """Whether this Open MPI can take its ranks from Slurm's PMI-1/PMI-2 (srun --mpi=pmi2).

    Open MPI 5 only speaks PMIx. Open MPI 3/4 do when built ``--with-pmi`` (components
    ``mca_pmix_s1``/``mca_pmix_s2`` beside libmpi); distributions build without them. None when
    it cannot be told (components linked in statically, library not found).
    """
    words = vendor.split()
    major = next((int(w.split(".")[0]) for w in words if w[:1].isdigit()), None)
    if major is not None and major >= 5:
        return False
    library = _loaded_libmpi()
    if library is None:
        return None
    import glob

    directory = os.path.dirname(os.path.realpath(library))
    # <libdir>/openmpi/ (Open MPI's own layout), <libdir>/openmpi/lib/openmpi3/ (Debian's)
    patterns = (("openmpi*",), ("openmpi", "lib", "openmpi*"))
    components = {os.path.basename(p)[len("mca_pmix_"):].split(".")[0]
                  for parts in patterns
                  for p in glob.glob(os.path.join(directory, *parts, "mca_pmix_*.so"))}
    if not components:
        return None
    return bool(components & {"s1", "s2"})


def check_before_mpi_init(environ: Mapping[str, str] | None = None) -> None:
    """Refuses, before MPI_Init, an srun step that this build's Open MPI cannot join.

    Open MPI direct-launched by srun without PMIx (``--mpi=pmi2``, ``--mpi=none``, a cluster
    whose MpiDefault is either) aborts inside MPI_Init with a page about rebuilding it; this
    raises :class:`LaunchMismatch` with one line instead. MPICH under the same launch starts
    as a singleton, which :func:`check_world` then refuses. ``PBM_LAUNCH_CHECK=0`` skips it.
    """
    env = os.environ if environ is None else environ
    if env.get("PBM_LAUNCH_CHECK", "1").strip() == "0":
        return
    launch = detect(env)
    if launch.srun_mpi is None or "PMIX_NAMESPACE" in env or "OMPI_COMM_WORLD_SIZE" in env:
        return
    if launch.launcher == "mpiexec (hydra)":
        return
    vendor = _compiled_vendor()
    if "open mpi" not in vendor.lower() or _open_mpi_speaks_pmi(vendor) is not False:
        return
    plugin = srun_mpi_plugin(vendor, env)
    plugin = plugin if plugin != launch.srun_mpi else "pmix"
    tasks = f" {launch.size} tasks ({launch.variable})" if launch.size is not None else ""
    raise LaunchMismatch(
        f"srun started{tasks} with --mpi={launch.srun_mpi}, but this build's {vendor} joins "
        f"srun's tasks only through PMIx and would abort in MPI_Init: launch with "
        f"`srun --mpi={plugin} ...` (`pybrain-mpi info --pmi`), or sbatch slurm/train.sbatch, "
        "which picks it")


def check_world(mpi_size: int, environ: Mapping[str, str] | None = None) -> None:
    """Raises :class:`LaunchMismatch` when the launcher's world is not the MPI world.

    ``PBM_LAUNCH_CHECK=0`` skips the check.
    """
    env = os.environ if environ is None else environ
    if env.get("PBM_LAUNCH_CHECK", "1").strip() == "0":
        return
    message = mismatch_message(detect(env), mpi_size, environ=env)
    if message is not None:
        raise LaunchMismatch(message)
