"""python -m train [--preset=NAME] [--resume] [--overwrite] [--section.field=value ...]"""
import sys

from train.config import ConfigError, help_text, parse_args


def main(argv: list[str]) -> int:
    if any(a in ("-h", "--help") for a in argv):
        print(help_text())
        return 0
    try:
        args = parse_args(argv)
        from train.loop import train  # imported after parsing: a bad argument costs no startup time
        train(args)
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
