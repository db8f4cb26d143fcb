"""Stage configs: the pydantic models a run spec's stages are validated with, one module per method
plus the shared ones (``train``: every training stage's fields; ``models``, ``init``, ``peft``).

The method modules (``jobs/mae.py`` …) import their config from here and re-export it.
"""
