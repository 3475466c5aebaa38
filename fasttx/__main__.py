"""Command line: `python -m fasttx info`."""
import argparse


def main(argv=None):
    parser = argparse.ArgumentParser(prog="python -m fasttx", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("info", help="print versions, devices, CPU features and which backends can run here")
    args = parser.parse_args(argv)
    if args.command == "info":
        from fasttx.info import report
        print(report())


if __name__ == "__main__":
    main()
