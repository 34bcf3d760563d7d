"""Training on Kaggle's notebook GPUs: `ens run ENSEMBLE --on kaggle`.

The units of an `ens run` that are not cached travel as a private Kaggle dataset named by its content (ens as a
wheel, the pinned pure-Python libraries, the competition and ensemble YAMLs, the units with their keys) and are
trained in a script kernel that runs the same unit code (`unit.member_entry`) on Kaggle's copy of the competition
data; the entries come back into the local cache, verified. Modules: `gpus` (the kinds asked for and how their
keys resolve), `bundle` (the dataset and the kernel), `kernel` (what runs on Kaggle), `entries` (verifying and
importing what came back), `runs` (the runs table, planning by estimated time, push, follow, fetch).
"""
