"""python -m lenet_ext info"""

import argparse

import lenet_ext


def main(argv=None):
    parser = argparse.ArgumentParser(prog="python -m lenet_ext", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)
    commands.add_parser("info", help="print how lenet_ext was built and what it runs with")
    args = parser.parse_args(argv)
    if args.command == "info":
        for key, value in lenet_ext.build_info().items():
            print(f"{key:20} {value}")


if __name__ == "__main__":
    main()
