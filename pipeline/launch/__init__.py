"""Preparing and submitting jobs: everything that runs on the login node, before and after the ranks.

- options: the job's flags and their checks
- run: building the run from the flags (config, plan, DeepSpeed JSON, the resume rules), its folder, the demo's data
- checks: its shards and paths, and where it may run (--cluster auto, this machine's capacity)
- executor: the submitit executor on Slurm or here, submitting, stopping a local job
- local_task: the wrapper of each local rank that writes down how it ended
- submission: dry run, sbatch script, one run or a sweep, following a job
- tuning: submitting a bucket-size tuning job
- jobs: the picklable submitit job objects
- sbatch: rendering slurm/train.sbatch
- status: `--status`: the job's state, last metrics and ETA
"""
