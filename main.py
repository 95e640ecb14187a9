"""Train on the shipped example volume, as the original thesis code's main.py did.

    python main.py            # quick preset, a few minutes on a laptop CPU
    python main.py --full     # the seed's full defaults (hours on a CPU; use a GPU)
"""

import sys

from consingan.cli import run

if __name__ == "__main__":
    quick = ["--num-scales", "5", "--min-size", "12", "--epochs", "150", "--num-feature-channels", "32",
             "--save-every", "50"]
    extra = [arg for arg in sys.argv[1:] if arg != "--full"]
    preset = [] if "--full" in sys.argv[1:] else quick
    sys.argv = [sys.argv[0], "train", "--image", "data/vol.nii.gz", "--dim", "3", *preset, *extra]
    run()
