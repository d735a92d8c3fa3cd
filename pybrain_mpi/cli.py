"""The ``pybrain-mpi`` command line.

    pybrain-mpi info                         versions, MPI thread level, ranks/nodes, build
    pybrain-mpi train CONFIG [--resume] [--timeline trace.json] [--steps N] [--set k=v ...]
    pybrain-mpi predict CONFIG --checkpoint C --input IMG|MANIFEST --output OUT [--png P]
    pybrain-mpi convert IN OUT.zarr [--chunks ...] [--shard ...]
    pybrain-mpi config [--keys | CONFIG]     every config key, or a config resolved
    pybrain-mpi bench [NAME [ARGS...]]       list the benchmarks, or run one
    pybrain-mpi <command> --help

Every command takes -v (more: DEBUG on rank 0, the time on each line, tracebacks of errors;
-vv: every rank) and -q (warnings and errors only). Messages are prefixed ``[rank R/W]``
(:mod:`pybrain_mpi.logs`); an error is one line saying what failed and what to do.

Run ``train`` (and ``info``, to see the topology) under ``mpiexec -n N`` or ``srun``.
"""

from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
import tomllib
import traceback
from pathlib import Path


_MPI_LAUNCH_VARIABLES = ("PMI_RANK", "PMI_SIZE", "PMIX_RANK", "OMPI_COMM_WORLD_SIZE",
                         "MPI_LOCALNRANKS", "SLURM_STEP_ID")


def _under_mpi_launcher() -> bool:
    return any(name in os.environ for name in _MPI_LAUNCH_VARIABLES)


# ------------------------------------------------------------------------------------ info
def _info(args: argparse.Namespace) -> int:
    from .communication import launcher

    if args.pmi:  # for scripts (slurm/*.sbatch): no MPI initialization, nothing else printed
        print(launcher.srun_mpi_plugin())
        return 0
    import platform
    import socket

    import numpy
    import torch
    from mpi4py import MPI

    import pybrain_mpi as pbm

    from . import __version__
    from .core.library import _core

    pbm.init()
    from .communication.objects import allgather_objects

    hosts = allgather_objects(socket.gethostname(), name="host names")
    if pbm.rank() != 0:
        pbm.shutdown()
        return 0
    print(f"pybrain-mpi {__version__}")
    print(f"python {platform.python_version()}, numpy {numpy.__version__}, torch {torch.__version__}")
    print(f"native core: {_core.__file__}")
    print(f"native core compiled against: {_core.compiled_mpi_vendor()}")
    info = build_info()
    if info:
        print(f"  MPI chosen at build time: {info.get('mpi_home', '?')} (by "
              f"{info.get('mpi_rule', '?')}; rule: README 'Which MPI the build uses')")
        for key in ("mpi_cxx_compiler", "mpi_libraries", "build_type", "native"):
            if info.get(key) not in (None, ""):
                print(f"  build {key}: {info[key]}")
    # Open MPI pads its version string with NULs
    print(f"MPI library loaded: {_core.mpi_library_version().replace(chr(0), '').strip().splitlines()[0]}")
    try:
        import mpi4py

        print(f"mpi4py {mpi4py.__version__}")
    except ImportError:
        print("mpi4py: not installed")
    levels = {MPI.THREAD_SINGLE: "SINGLE", MPI.THREAD_FUNNELED: "FUNNELED",
              MPI.THREAD_SERIALIZED: "SERIALIZED", MPI.THREAD_MULTIPLE: "MULTIPLE"}
    level = MPI.Query_thread()
    print(f"MPI thread level: {levels.get(level, level)}"
          + ("" if level == MPI.THREAD_MULTIPLE else " (no progress thread: collectives run at submission)"))
    nodes: dict[str, list[int]] = {}
    for rank, host in enumerate(hosts):
        nodes.setdefault(host, []).append(rank)
    print(f"topology: {pbm.size()} rank(s) on {len(nodes)} node(s)")
    for host, ranks in nodes.items():
        print(f"  {host}: ranks {_ranges(ranks)}")
    launch = launcher.detect()
    print(f"launcher: {launch.describe()}")
    print(f"PMI: {launch.pmi}")
    print(f"srun --mpi for this build: {launcher.srun_mpi_plugin()} (`pybrain-mpi info --pmi`; "
          "PBM_SRUN_MPI overrides)")
    if launch.launcher == "none" and not _under_mpi_launcher():
        print("  (a single process; run `mpiexec -n N pybrain-mpi info` to see a launched world)")
    print(f"torch threads per rank: {torch.get_num_threads()}, cores: {os.cpu_count()}")
    pbm.shutdown()
    return 0


def build_info() -> dict:
    """What the build recorded (pybrain_mpi/build_info.json): the MPI it chose and the rule
    that chose it, the compiler wrapper, libraries, build type; {} for an older build."""
    import json

    path = Path(__file__).resolve().parent / "build_info.json"
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return {}


def _ranges(values: list[int]) -> str:
    """[0, 1, 2, 5] -> "0-2, 5"."""
    parts, start = [], None
    for i, v in enumerate(values):
        if start is None:
            start = v
        if i + 1 == len(values) or values[i + 1] != v + 1:
            parts.append(f"{start}-{v}" if v != start else str(v))
            start = None
    return ", ".join(parts)


# ------------------------------------------------------------------------------------ train
def _toml_value(text: str) -> str:
    """A --set value as TOML: valid TOML values are kept, anything else becomes a string."""
    try:
        tomllib.loads(f"v = {text}")
        return text
    except tomllib.TOMLDecodeError:
        return '"' + text.replace("\\", "\\\\").replace('"', '\\"') + '"'


def apply_overrides(text: str, overrides: list[str]) -> str:
    """Return TOML ``text`` with ``section.key=value`` overrides applied.

    An existing key's line is replaced; a new key is inserted as a dotted key under the
    deepest existing table of its path (or in a new table at the end), so the result is
    valid TOML that the schema then checks like any file.
    """
    from .config import key_lines

    for item in overrides:
        if "=" not in item:
            raise ValueError(f"--set {item!r}: expected section.key=value, e.g. train.epochs=2")
        dotted, value = (part.strip() for part in item.split("=", 1))
        path = tuple(p.strip() for p in dotted.split("."))
        if len(path) < 2 or not all(re.fullmatch(r"[A-Za-z0-9_-]+", p) for p in path):
            raise ValueError(f"--set {item!r}: the key must be section.key (e.g. train.lr), "
                             f"got {dotted!r}")
        value = _toml_value(value)
        lines = text.splitlines()
        found = key_lines(text)
        if path in found and not re.match(r"^\s*\[", lines[found[path] - 1]):
            number = found[path] - 1
            indent = re.match(r"^\s*", lines[number]).group(0)
            lines[number] = f"{indent}{path[-1]} = {value}"
        else:
            for depth in range(len(path) - 1, 0, -1):
                header = found.get(path[:depth])
                if header is not None and re.match(r"^\s*\[", lines[header - 1]):
                    lines.insert(header, f"{'.'.join(path[depth:])} = {value}")
                    break
            else:
                lines += ["", f"[{'.'.join(path[:-1])}]", f"{path[-1]} = {value}"]
        text = "\n".join(lines) + "\n"
    return text


def _start(command: str, args: argparse.Namespace):
    """``pbm.init()``, then ``(config, fail)``: the config of ``args.config`` with its ``--set``
    overrides and ``fail(message, code)``, which prints the error on rank 0, shuts down and
    returns ``code``. A config that cannot be read or is invalid gives ``(None, report)``:
    ``report()`` does the same for that problem and returns 2."""
    import pybrain_mpi as pbm

    from .config import ConfigError, parse_config

    pbm.init()
    rank = pbm.rank()

    def fail(message: str, code: int) -> int:
        if rank == 0:
            _traceback_if_verbose()
            print(f"pybrain-mpi {command}: error: {message}", file=sys.stderr, flush=True)
        pbm.shutdown()
        return code

    try:
        text = Path(args.config).read_text(encoding="utf-8")
    except OSError as exc:
        message = f"cannot read config {args.config}: {exc.strerror or exc}"
        return None, lambda: fail(message, 2)
    try:
        if args.set:
            text = apply_overrides(text, args.set)
        source = args.config + (" (with --set overrides)" if args.set else "")
        return parse_config(text, source), fail
    except (ConfigError, ValueError) as exc:
        message = str(exc)
        return None, lambda: fail(message, 2)


def _traceback_if_verbose() -> None:
    """With -v, the traceback of the exception being handled (if any), before its one line."""
    from . import logs

    if logs.verbosity() >= 1 and sys.exc_info()[0] is not None:
        traceback.print_exc(file=sys.stderr)


def _train(args: argparse.Namespace) -> int:
    import pybrain_mpi as pbm

    config, fail = _start("train", args)
    if config is None:
        return fail()

    from .compute import ComputeError, check_device
    from .trainer.checkpoint import CheckpointError
    from .trainer import Trainer, TrainingDiverged, TrainingSetupError

    try:
        check_device(config.train.device)
    except ComputeError as exc:
        return fail(str(exc), 2)
    try:
        trainer = Trainer(config, resume=args.resume, timeline_path=args.timeline,
                          max_steps=args.steps, progress=not args.no_progress and args.quiet == 0,
                          echo=args.quiet == 0)
        trainer.fit()
    except TrainingSetupError as exc:
        return fail(str(exc), 2)
    except (TrainingDiverged, CheckpointError) as exc:
        return fail(str(exc), 1)
    except (pbm.CollectiveTimeout, pbm.PeerFailure) as exc:
        # Said by every rank that saw it (the rank at fault may be rank 0); exiting is then
        # bounded by PBM_TIMEOUT_S even with a stopped peer (communication/context.py).
        print(f"pybrain-mpi train: error: {exc}", file=sys.stderr, flush=True)
        pbm.shutdown()
        return 1
    pbm.shutdown()
    return 0


# ------------------------------------------------------------------------------------ predict
def _predict(args: argparse.Namespace) -> int:
    import pybrain_mpi as pbm

    config, fail = _start("predict", args)
    if config is None:
        return fail()
    from .data.errors import DataError
    from .errors import CollectiveTimeout
    from .trainer.checkpoint import CheckpointError
    from .trainer.predict import PredictError, predict

    try:
        records = predict(config, args.checkpoint, args.input, args.output,
                          probabilities=args.probabilities, png=args.png,
                          batch_size=args.batch_size)
    except (PredictError, DataError, CheckpointError, OSError, ValueError, KeyError) as exc:
        return fail(" ".join(str(exc).split()) if isinstance(exc, OSError) else str(exc), 2)
    except CollectiveTimeout as exc:
        return fail(str(exc), 1)
    if pbm.rank() == 0:
        for record in records:
            shown = {k: v for k, v in record.items() if k not in ("subject", "voxels_per_label")}
            print(f"{record['subject']}: " + ", ".join(f"{k} {v}" for k, v in shown.items()),
                  flush=True)
    pbm.shutdown()
    return 0


# ------------------------------------------------------------------------------------ config
def _config(args: argparse.Namespace) -> int:
    from .config import ConfigError, describe_schema, load_config

    if args.keys or not args.config:
        print(describe_schema())
        return 0
    try:
        config = load_config(args.config)
    except ConfigError as exc:
        _traceback_if_verbose()
        print(f"pybrain-mpi config: error: {exc}", file=sys.stderr)
        return 2
    import json

    from .config import config_to_dict

    print(json.dumps(config_to_dict(config), indent=2))
    return 0


# ------------------------------------------------------------------------------------ bench
def _benchmarks_dir(given: str | None) -> Path:
    """--dir, else ./benchmarks (run from the source checkout), else the benchmarks installed
    with the package (pybrain_mpi/benchmarks), else the checkout an editable install sits in."""
    if given:
        return Path(given)
    here = Path(__file__).resolve().parent
    for candidate in (Path.cwd() / "benchmarks", here / "benchmarks", here.parent / "benchmarks"):
        if (candidate / "allreduce.py").exists():
            return candidate
    return here / "benchmarks"


def _bench(args: argparse.Namespace) -> int:
    directory = _benchmarks_dir(args.dir)
    scripts = sorted(p for p in directory.glob("*.py") if p.stem != "common" and not p.stem.startswith("_"))
    if not scripts:
        print(f"pybrain-mpi bench: error: no benchmarks in {directory}\nfix: reinstall "
              "pybrain-mpi (the wheel ships them) or pass --dir CHECKOUT/benchmarks",
              file=sys.stderr)
        return 2
    if not args.name:
        print(f"benchmarks in {directory} (run: pybrain-mpi bench NAME [--ranks N] [ARGS...]):")
        for script in scripts:
            doc = _first_doc_line(script)
            print(f"  {script.stem:<24} {doc}")
        return 0
    names = [s.stem for s in scripts] if args.name == "all" else [args.name]
    status = 0
    for name in names:
        script = directory / f"{name}.py"
        if not script.exists():
            print(f"pybrain-mpi bench: no benchmark {name!r}; available: "
                  f"{', '.join(s.stem for s in scripts)}", file=sys.stderr)
            return 2
        command = [sys.executable, str(script), *args.args]
        if args.ranks > 1:
            from shutil import which

            mpiexec = Path(sys.executable).parent / "mpiexec"
            mpiexec = str(mpiexec) if mpiexec.exists() else which("mpiexec") or "mpiexec"
            command = [mpiexec, "-n", str(args.ranks), *command]
        print(f"$ {' '.join(command)}", flush=True)
        env = dict(os.environ)
        env.setdefault("OMP_NUM_THREADS", "1")
        status = subprocess.run(command, env=env).returncode or status
    return status


def _first_doc_line(script: Path) -> str:
    match = re.search(r'^"""(.*?)$', script.read_text(errors="replace"), re.M)
    return match.group(1).strip().rstrip('"') if match else ""


# ------------------------------------------------------------------------------------ parser
def build_parser() -> argparse.ArgumentParser:
    """The argument parser with every subcommand (each has --help)."""
    parser = argparse.ArgumentParser(prog="pybrain-mpi", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("-v", "--verbose", action="count", default=0,
                        help="more messages: DEBUG on rank 0, times, tracebacks of errors "
                             "(-vv: every rank's messages)")
    common.add_argument("-q", "--quiet", action="count", default=0,
                        help="warnings and errors only (no progress bar, no summary table)")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    info = sub.add_parser("info", parents=[common], help="versions, MPI library and thread level, ranks/nodes, build",
                          description="Print versions, the MPI library and its thread level, the "
                                      "ranks/nodes topology (run under mpiexec/srun to see a "
                                      "launched world) and how the native core was built.")
    info.add_argument("--pmi", action="store_true",
                      help="print only the srun --mpi plugin this build needs (pmix for Open MPI, "
                           "pmi2 for MPICH; PBM_SRUN_MPI overrides) without initializing MPI")
    info.set_defaults(func=_info)

    from .config import describe_schema

    train = sub.add_parser("train", parents=[common], help="train a model from a TOML config",
                           formatter_class=argparse.RawDescriptionHelpFormatter,
                           description="Train the config's model on its data on every rank, e.g.\n"
                                       "  mpiexec -n 2 pybrain-mpi train examples/dca_fmri.toml\n"
                                       "SIGTERM/SIGUSR1 make all ranks checkpoint at the next step "
                                       "and exit 0; --resume continues from that checkpoint.",
                           epilog="config keys (also: pybrain-mpi config --keys):\n"
                                  + describe_schema())
    train.add_argument("config", help="TOML run configuration (see examples/)")
    train.add_argument("--resume", action="store_true",
                       help="continue from the run's checkpoint if there is one (else start fresh)")
    train.add_argument("--timeline", metavar="TRACE.json",
                       help="write a Chrome trace (Perfetto / chrome://tracing) of every rank")
    train.add_argument("--steps", type=int, metavar="N",
                       help="stop after N optimizer steps in total (resumed steps count)")
    train.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE",
                       help="override a config value, e.g. --set train.epochs=2 (repeatable)")
    train.add_argument("--no-progress", action="store_true", help="no progress bar on rank 0")
    train.set_defaults(func=_train)

    predict = sub.add_parser(
        "predict", parents=[common], help="apply a trained segmentation or regression model to new images",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Predict with a checkpoint on every rank (grid patches shared across ranks), "
                    "e.g.\n  mpiexec -n 2 pybrain-mpi predict examples/unet3d_mni_cohort.toml "
                    "--checkpoint runs/unet3d_mni_cohort/checkpoints/checkpoint.pt \\\n"
                    "      --input t1.nii.gz --output brain.nii.gz --png brain.png\n"
                    "Segmentation writes labels (NIfTI with the input's affine and header, or "
                    ".zarr); regression writes one row per subject (.tsv). --input may be a "
                    "manifest (then --output, --probabilities and --png are directories).")
    predict.add_argument("config", help="the TOML config the model was trained with")
    predict.add_argument("--checkpoint", required=True, help="checkpoint.pt written by train")
    predict.add_argument("--input", required=True,
                         help="an image (.nii.gz, .mgz, .zarr, ...) or a manifest (.tsv/.csv)")
    predict.add_argument("--output", required=True,
                         help="labels: .nii.gz/.nii/.zarr (a directory for a manifest); "
                              "regression: .tsv/.csv")
    predict.add_argument("--probabilities", help="also write class probabilities (segmentation)")
    predict.add_argument("--png", help="three orthogonal slices with the prediction over the image")
    predict.add_argument("--batch-size", type=int, default=None, help="patches per forward pass")
    predict.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE",
                         help="override a config value (e.g. data.cache_dir=...)")
    predict.set_defaults(func=_predict)

    config = sub.add_parser("config", parents=[common], help="list every config key, or show a config resolved",
                            description="With --keys (or no CONFIG): every config key with its "
                                        "type, default and meaning. With CONFIG: the config with "
                                        "every default filled in, as JSON.")
    config.add_argument("config", nargs="?", help="a TOML config to resolve")
    config.add_argument("--keys", action="store_true", help="list every key")
    config.set_defaults(func=_config)

    bench = sub.add_parser("bench", parents=[common], help="list or run the benchmarks (benchmarks/*.py)",
                           description="Without NAME, list the benchmarks; with NAME (or 'all'), "
                                       "run it, under mpiexec with --ranks > 1. Arguments after "
                                       "NAME go to the benchmark (try NAME --help).")
    bench.add_argument("name", nargs="?", help="benchmark to run, or 'all'")
    bench.add_argument("args", nargs=argparse.REMAINDER, help="arguments for the benchmark")
    bench.add_argument("--ranks", type=int, default=2, help="MPI ranks (default 2)")
    bench.add_argument("--dir", help="benchmarks directory (default: the source checkout's)")
    bench.set_defaults(func=_bench)

    from .data.cli import add_convert_subcommand

    add_convert_subcommand(sub, parents=[common])
    return parser


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``pybrain-mpi`` console script."""
    from . import logs
    from .communication.launcher import LaunchMismatch, check_before_mpi_init, detect
    from .errors import MPILibraryMismatch

    parser = build_parser()
    args = parser.parse_args(argv)
    logs.configure(args.verbose - args.quiet)
    try:
        if args.command in ("info", "train") and not getattr(args, "pmi", False):
            check_before_mpi_init()  # before anything imports mpi4py.MPI (which runs MPI_Init)
        return args.func(args)
    except LaunchMismatch as exc:  # mis-launched (torchrun, srun --mpi=none): one line, no traceback
        if detect().rank in (None, 0):  # every process has the same reason; one says it
            _traceback_if_verbose()
            print(f"pybrain-mpi: error: {exc}", file=sys.stderr, flush=True)
        return 2
    except MPILibraryMismatch as exc:  # the core and mpi4py (or the MPI now loaded) disagree
        if detect().rank in (None, 0):
            _traceback_if_verbose()
            print(f"pybrain-mpi: error: {exc}", file=sys.stderr, flush=True)
        return 2


if __name__ == "__main__":
    sys.exit(main())
