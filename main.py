"""Train on the shipped example volume, as the original thesis code's main.py did.

    python main.py            # the README's first command (presets/mri-3d-quick.yaml): about 3 minutes on a 2-core CPU, more on a slow one
    python main.py --full     # the seed's full defaults (hours on a CPU; use a GPU)
"""

import sys

from consingan.cli import run

if __name__ == "__main__":
    quick = ["--config", "presets/mri-3d-quick.yaml"]
    extra = [arg for arg in sys.argv[1:] if arg != "--full"]
    preset = [] if "--full" in sys.argv[1:] else quick
    sys.argv = [sys.argv[0], "train", "--image", "data/vol.nii.gz", "--dim", "3", *preset, *extra]
    run()
