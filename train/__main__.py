"""python -m train [--preset=NAME] [--resume] [--overwrite] [--section.field=value ...]"""
import signal
import sys

from train.config import ConfigError, help_text, parse_args


def main(argv: list[str]) -> int:
    if any(a in ("-h", "--help") for a in argv):
        print(help_text())
        return 0
    try:
        args = parse_args(argv)
        from train.guard import TrainingError
        from train.loop import train  # imported after parsing: a bad argument costs no startup time
        try:
            final = train(args)
        except TrainingError as e:
            print(f"error: {e}", file=sys.stderr)
            return 1
        except KeyboardInterrupt:  # a second Ctrl-C while the first was being honoured
            print("error: interrupted twice: exiting at once, without a checkpoint", file=sys.stderr)
            return 130
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 128 + signal.Signals[final["signal"]] if final["event"] == "interrupted" else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
