"""`python -m pymoe.cuda_build`: the CUDA build command (pymoe/backend/cuda_build.py does the work)."""
import sys

from .backend.cuda_build import main

if __name__ == "__main__":
    sys.exit(main())
