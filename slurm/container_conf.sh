# Sourced by local_cluster.sh and two_node_cluster.sh: the slurm.conf lines both test clusters
# share (a container without cgroups, immediate scheduling, short timeouts).
#
#   slurm_first_job_id                     a FirstJobId= line
#   slurm_container_settings MPI MIN_AGE   the shared settings (MpiDefault=MPI, MinJobAge=MIN_AGE)

slurm_first_job_id() {
    # Job ids never repeat across clusters started on one machine: MPICH names its
    # shared-memory segments after the PMI job ("jobid.step"), and a segment a killed job 1.0
    # left in /dev/shm would be picked up by the next cluster's job 1.0 and break its MPI_Init.
    echo "FirstJobId=$(( ( $(date +%s) % 600000 ) * 100 + RANDOM % 100 + 1 ))"
}

slurm_container_settings() {
    local mpi_default="$1" min_job_age="$2"
    cat <<CONF
SlurmctldDebug=info
SlurmdDebug=info
# No cgroups in containers: track processes by parent pid, bind nothing.
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
JobCompType=jobcomp/none
SwitchType=switch/none
SchedulerType=sched/backfill
# Schedule at once and every second (defaults: batch jobs deferred up to 3 s, main loop every
# 60 s, backfill every 30 s): a test cluster has nothing to protect from the overhead.
SchedulerParameters=batch_sched_delay=0,sched_interval=1,bf_interval=1
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
MpiDefault=$mpi_default
# Reject jobs that can never run (more tasks than CPUs) instead of leaving them pending forever.
EnforcePartLimits=ALL
# Trust the CPU counts given with the nodes rather than the hardware, so n-rank tests fit on 2 cores.
SlurmdParameters=config_overrides
ReturnToService=2
JobRequeue=1
KillWait=5
# sbatch --wait polls every 2 s only while MinJobAge <= 4 (otherwise after 2, 10, 42 s...);
# the price is that finished jobs leave scontrol show job 4 s after they end.
MinJobAge=$min_job_age
SlurmdTimeout=60
InactiveLimit=0
CONF
}
