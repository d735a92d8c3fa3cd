"""Shared data for the tests of pybrain_mpi.data: real volumes shipped in nilearn / nitime."""

from __future__ import annotations

import os

import nibabel as nib
import numpy as np


def nilearn_mni(kind: str) -> str:
    """Path of nilearn's MNI152 2009a ``t1``, ``gm`` or ``wm`` map (197x233x189 uint8, 1 mm)."""
    import nilearn

    return os.path.join(os.path.dirname(nilearn.__file__), "datasets", "data",
                        f"mni_icbm152_{kind}_tal_nlin_sym_09a_converted.nii.gz")


def nitime_fmri() -> str:
    """Path of nitime's 4D fMRI run (10x10x18x40 int16, TR 1.35 s)."""
    import nitime

    return os.path.join(os.path.dirname(nitime.__file__), "data", "fmri1.nii.gz")


def load(path: str) -> np.ndarray:
    """The voxel array nibabel reads (the reference)."""
    return np.asarray(nib.load(path).dataobj)


_TMP: list[str] = []


def scratch_dir() -> str:
    """A directory removed when the test process exits."""
    import atexit
    import shutil
    import tempfile

    if not _TMP:
        _TMP.append(tempfile.mkdtemp(prefix="pbm-data-tests-"))
        atexit.register(shutil.rmtree, _TMP[0], True)
    return _TMP[0]


_CONVERTED: dict = {}


def converted(src: str, name: str, **kwargs) -> str:
    """``src`` converted once per test process into the scratch directory (shared by files)."""
    from pybrain_mpi.data import convert

    key = (src, name, tuple(sorted(kwargs.items())))
    if key not in _CONVERTED:
        dst = os.path.join(scratch_dir(), name)
        _CONVERTED[key] = convert(src, dst, progress=False, overwrite=True, **kwargs)
    return _CONVERTED[key]


def warm_amplification(vol, size, samples: int, *, seed: int = 1, local_window: int = 0) -> float:
    """Read amplification of an epoch of fresh random patches (epoch 1), with the cache left
    as epoch 0's patches (other positions) filled it."""
    import pybrain_mpi.data as pbd

    sampler = pbd.UniformSampler(vol, size, samples, seed=seed, rank=0, world_size=1,
                                 local_window=local_window)
    for spec in sampler:
        vol.read_patch(spec.start, spec.size)
    sampler.set_epoch(1)
    vol.reset_counters()
    for spec in sampler:
        vol.read_patch(spec.start, spec.size)
    return vol.read_amplification
