// A bound on how long a process may spend exiting after its pybrain-mpi world failed.
//
// MPI_Finalize (which mpi4py calls after the interpreter has shut down) waits for every
// rank: with MPICH it ends in a process-manager barrier. After a collective timed out on a
// stopped (SIGSTOP) or lost peer, that barrier would keep this rank alive for as long as
// the peer is stopped, although the rank has already reported the failure and asked to
// exit. pybrain_mpi arms this watch at interpreter exit when a collective failed on this
// rank; if the process is still alive `seconds` later it writes `message` to stderr and
// ends with `_exit(status)`: the launcher (mpiexec, srun) sees a failed rank and ends the
// job. Nothing here calls MPI (the watch runs while MPI may be inside MPI_Finalize).
#pragma once

#include <string>

namespace pbm {

// Starts the watch on a detached thread; later calls replace nothing (the first one wins).
void watch_exit(double seconds, const std::string& message, int status);

}  // namespace pbm
