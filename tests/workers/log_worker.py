"""Worker: configures pybrain-mpi's logging at the verbosity given, then logs one message
per level (and one Python warning) on every rank."""

import sys
import warnings

import pybrain_mpi as pbm
from pybrain_mpi import logs

if __name__ == "__main__":
    logs.configure(int(sys.argv[1]))
    pbm.init()
    log = logs.get_logger("test")
    rank = pbm.rank()
    log.debug(f"debug from {rank}")
    log.info(f"info from {rank}\nsecond line from {rank}")
    log.warning(f"warning from {rank}")
    log.error(f"error from {rank}")
    warnings.warn(f"python warning from {rank}", RuntimeWarning)
    pbm.shutdown()
