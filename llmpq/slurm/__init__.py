"""SLURM jobs that llmpq submits itself: a plan's stages as one (heterogeneous) job, and the checks its tasks run.

Never imports torch: the Snakefile uses `hetjob` to show a deploy's job in a dry run.
"""
