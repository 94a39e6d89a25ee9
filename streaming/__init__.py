"""LIVE I/O: the WebRTC presenter (DESIGN.md, "Streaming"). Imports engine only (the model set and avatars come
through engine.models).

* :mod:`streaming.server`  -- aiohttp page + POST /offer, one shared model set, sessions, teardown.
* :mod:`streaming.session` -- one viewer: input audio -> Runner.run_stream -> QueueSink, paced by a feeder thread.
* :mod:`streaming.tracks`  -- the avatar video track and the engine-audio track on one media clock.
* :mod:`streaming.cli`     -- `engine serve`.

aiohttp and aiortc are imported inside the functions that need them, so ``import streaming`` stays light.
"""
