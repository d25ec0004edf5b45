"""Ranks and collectives: process groups, workers, pipeline stages, the fast all-reduce and TP exchange."""
