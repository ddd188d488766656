"""Entry point: python launch.py --config=configs/stage2.py[:variant] [--workdir=DIR] [--config.x=y].

Training arrives with the models-and-training work; until then this prints its usage.
"""
import sys


def main() -> int:
  print(__doc__.strip())
  return 0


if __name__ == "__main__":
  sys.exit(main())
