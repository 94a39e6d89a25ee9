"""`engine batch`: many renders from a manifest, resumable, locally or over Ray (the command's help: cli.py).

* :mod:`engine.batch.manifest`    -- jobs.jsonl / jobs.csv -> validated Job values (ManifestError names the line).
* :mod:`engine.batch.fingerprint` -- input digests, the fingerprint of a job, when a job is complete (resuming).
* :mod:`engine.batch.job`         -- one job in whatever process runs it: cached model set and avatars, the render.
* :mod:`engine.batch.ray_exec`    -- the Ray fan-out (Ray is imported only with --ray).
* :mod:`engine.batch.run`         -- the job loop: plan, render, reports, summary table.
* :mod:`engine.batch.cli`         -- the parser and the command (`engine batch`, `python -m engine.batch`).
"""
