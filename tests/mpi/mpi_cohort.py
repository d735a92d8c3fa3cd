"""A cohort converted into the cache across real MPI ranks (``prepare_cohort``): every subject
is converted by exactly one rank, a second run converts nothing, and a subject that cannot be
converted is reported on every rank, by name, while the others are still converted.

The cohort is nilearn's real MNI152 plus seeded synthetic warps of it
(``build_mni152_cohort``, 4 mm voxels), written by rank 0; the broken subject is a copy of one
of its T1 files cut in half (synthetic damage)."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from pybrain_mpi.data import DataError
from pybrain_mpi.data.cohort import read_manifest
from pybrain_mpi.data.examples import build_mni152_cohort
from pybrain_mpi.data.subjects import prepare_cohort
from data_fixtures import scratch_dir

RANKS = (2,)
TIMEOUT_S = 240
CONVERTING = re.compile(r"^rank (\d+): subject (\S+): converting ")


@pytest.fixture(scope="module")
def cohort_manifest(comm) -> Path:
    # Rank 0 writes the cohort; the others take its path (a scratch dir of rank 0's process
    # would be removed when that process exits, so all share rank 0's).
    path = str(build_mni152_cohort(Path(scratch_dir()) / "cohort", subjects=4, seed=5,
                                   voxel_mm=4.0)) if comm.Get_rank() == 0 else None
    return Path(comm.bcast(path, root=0))


def _prepare(comm, cohort, cache: str):
    """prepare_cohort on every rank; returns (this rank's subjects or its error, every rank's
    conversion messages)."""
    said: list[str] = []
    try:
        result = prepare_cohort(cohort, kind="volume", cache_dir=cache, chunks=(16, 16, 16),
                                timeout_s=120, echo=said.append)
    except DataError as exc:
        result = exc
    return result, [line for lines in comm.allgather(said) for line in lines]


def test_every_subject_is_converted_by_exactly_one_rank_and_only_once(comm, cohort_manifest):
    cohort = read_manifest(cohort_manifest, ["t1"], label="brain_mask")
    cache = str(cohort_manifest.parent.parent / "cache-once")
    subjects, said = _prepare(comm, cohort, cache)
    assert not isinstance(subjects, Exception), subjects
    converted = [CONVERTING.match(line).groups() for line in said if CONVERTING.match(line)]
    ids = [s.id for s in cohort.subjects]
    assert sorted(sid for _, sid in converted) == sorted(ids), said  # each once, none twice
    by_rank = {int(rank) for rank, _ in converted}
    assert by_rank == {0, 1}, f"both ranks must share the work: {said}"
    # Every rank sees the same cache directories and statistics, whoever converted them.
    mine = [(s.id, str(s.root), s.stats["foreground"]["count"]) for s in subjects]
    assert comm.allgather(mine) == [mine] * comm.Get_size()
    again, said_again = _prepare(comm, cohort, cache)
    assert not any(CONVERTING.match(line) for line in said_again), said_again
    assert [str(s.root) for s in again] == [str(s.root) for s in subjects]


def test_a_subject_that_cannot_be_converted_is_named_on_every_rank(comm, cohort_manifest):
    root = cohort_manifest.parent
    if comm.Get_rank() == 0:
        data = (root / "synth-02" / "t1.nii.gz").read_bytes()
        (root / "cut.nii.gz").write_bytes(data[: len(data) // 2])
        lines = cohort_manifest.read_text().splitlines()
        header = lines[0].split("\t")
        t1 = header.index("t1")
        broken = lines[1].split("\t")
        broken[header.index("subject")], broken[t1] = "broken", "cut.nii.gz"
        (root / "broken.tsv").write_text("\n".join(lines + ["\t".join(broken)]) + "\n")
    comm.barrier()
    cohort = read_manifest(root / "broken.tsv", ["t1"])
    cache = str(root.parent / "cache-broken")
    error, said = _prepare(comm, cohort, cache)
    assert isinstance(error, DataError), error
    text = str(error)
    assert re.search(r"1 of 5 subject\(s\) .*broken.tsv could not be prepared:\n  subject broken: "
                     r".*cut.nii.gz is truncated", text), text
    assert comm.allgather(text) == [text] * comm.Get_size()  # the same report on every rank
    # The four good subjects were converted all the same (a rerun after the fix reuses them).
    converted = {m.group(2) for m in map(CONVERTING.match, said) if m}
    assert converted == {s.id for s in cohort.subjects}, said
    built = sorted(p.name.rsplit("-", 1)[0] for p in (Path(cache) / "subjects").iterdir()
                   if not p.name.startswith("."))
    assert built == sorted(s.id for s in cohort.subjects if s.id != "broken"), built
