"""Launchers: where and how trials run. Ray Tune (:mod:`.tune`, with live lines from :mod:`.progress`), a SLURM
array (:mod:`.slurm`), and the GPU packing both use (:mod:`.resources`). Each is a thin shell around
rlhf_ablate/run/trial.py."""
