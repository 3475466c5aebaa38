"""Command line: `python -m fasttx info | train | generate | compare`."""
import argparse
import sys
import warnings

# Subcommands whose options and code live in fasttx.lm.<name> (add_arguments(parser), main(args) -> exit code).
LM_COMMANDS = {
    "train": "train the reference GPT language model (torchrun-compatible)",
    "generate": "sample text from a trained checkpoint",
    "compare": "train the eager and the fused GPT side by side and measure both",
}


def _lm_module(name):
    # Imported only for the command that runs, so `info` and `--help` stay light.
    if name == "train":
        from fasttx.lm import train as module
    elif name == "generate":
        from fasttx.lm import generate as module
    else:
        from fasttx.lm import compare as module
    return module


class _Parser(argparse.ArgumentParser):
    """Errors in one line (argparse prints the whole usage first); --help still shows it. Exit code 2."""

    def error(self, message):
        self.exit(2, f"{self.prog}: error: {message} (see --help)\n")


def main(argv=None):
    argv = sys.argv[1:] if argv is None else list(argv)
    parser = _Parser(prog="python -m fasttx", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("info", help="print versions, devices, CPU features and which backends can run here")
    command = next((a for a in argv if not a.startswith("-")), None)
    module = None
    for name, help_text in LM_COMMANDS.items():
        sub_parser = sub.add_parser(name, help=help_text, description=help_text)
        if name == command:
            module = _lm_module(name)
            module.add_arguments(sub_parser)
    args = parser.parse_args(argv)
    args.argv = argv  # for a command that relaunches itself (train --nproc-per-node)
    if args.command == "info":
        from fasttx.info import report
        print(report())
        return 0
    with warnings.catch_warnings():  # a warning is one line too (an old checkpoint without a checksum, ...)
        warnings.showwarning = lambda message, *_, **__: print(f"warning: {message}", file=sys.stderr)
        return module.main(args)


if __name__ == "__main__":
    sys.exit(main())
