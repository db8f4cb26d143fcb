"""Run specs, the stage graph, run state in the store, resume and the ``vitforge`` CLI."""
