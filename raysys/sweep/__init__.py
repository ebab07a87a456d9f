"""Sweeps: the plan of trials (`plan`), what they read made before Tune starts (`prepare`),
and the Ray Tune run of train drivers (`tune`)."""
