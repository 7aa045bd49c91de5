"""Every rank reports its rank: the smallest job, to see the launcher work."""

from ranks import world

comm = world()
print(comm.rank, comm.size, flush=True)
