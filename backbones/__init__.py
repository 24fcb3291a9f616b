"""Built-in backbones of stbat-plugin (import name ``stbat_backbones``).

Each module registers itself through the ``stbat`` entry-point group, exactly as
a third-party plugin would (see ``docs/plugins.md``).
"""
