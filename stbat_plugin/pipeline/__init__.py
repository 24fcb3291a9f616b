"""The cross-city pipeline built on the core: settings, tasks, training, methods, results, CLI.

The core (``stbat_plugin`` itself: the wrapper, the equations, RIAM, the backbone registry,
``testing`` and ``data``) never imports this package; ``tests/test_layering.py`` holds that.
Its heavier dependencies (statsmodels, SciPy, tqdm) come with the ``pipeline`` extra:
``pip install "stbat-plugin[pipeline]"``.
"""
