import sys

from kd_trainers.cli import main

if __name__ == "__main__":
    sys.exit(main())
