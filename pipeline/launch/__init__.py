"""Preparing and submitting jobs: everything that runs on the login node, before and after the ranks.

- options: the job's flags and their checks
- prepare: the run (config, plan, DeepSpeed JSON), its checks, its folder, the submitit executor
- submission: dry run, sbatch script, one run or a sweep, following a job
- tuning: submitting a bucket-size tuning job
- jobs: the picklable submitit job objects
- sbatch: rendering slurm/train.sbatch
- status: `--status`: the job's state, last metrics and ETA
"""
