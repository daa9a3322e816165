"""xgen's Hydra configs. Installed as the package `xgen.conf` (see setup.py), so a wheel
carries them and `python -m xgen.run` finds them as `pkg://xgen.conf` without the source tree."""
