"""In the list of modules the DataLoader's forkserver imports when it starts (pipeline.data.workers): from
then on the forkserver dies with its rank (pipeline.signals.die_with_parent), and the workers it forks die
with it (their worker_init_fn)."""

from pipeline.signals import die_with_parent

die_with_parent()
