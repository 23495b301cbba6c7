"""One replica over several devices (`models[].parallel`): rank 0 is the Serve replica, the
other ranks are Ray actors in its placement group, and every denoiser forward runs on all
of them at once. Read `rank_group.py` (how a group forms, fails and is replaced), then
`lockstep.py` (rank 0 leads each forward, the others follow), `context_parallel.py`
(Ulysses and ring attention through diffusers, SD3's plan), `cfg_split.py` (the batch's
halves on two groups) and `attention.py` (the attention diffusers cannot yet split)."""
