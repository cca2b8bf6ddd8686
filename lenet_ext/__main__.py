"""Command line of lenet_ext.

  python -m lenet_ext info       how lenet_ext was built and what it runs with
  python -m lenet_ext summary    LeNet's layer-by-layer shape and parameter table
"""

import argparse

import lenet_ext


def main(argv=None):
    parser = argparse.ArgumentParser(
        prog="python -m lenet_ext", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    commands = parser.add_subparsers(dest="command", required=True)
    commands.add_parser("info", help="print how lenet_ext was built and what it runs with")
    summary = commands.add_parser("summary", help="print LeNet's shape table with parameter counts")
    summary.add_argument("--image-size", type=int, default=28, choices=(28, 32))
    summary.add_argument("--in-channels", type=int, default=1)
    summary.add_argument("--num-classes", type=int, default=10)
    summary.add_argument("--batch", type=int, default=1)
    args = parser.parse_args(argv)
    if args.command == "info":
        try:
            info = lenet_ext.build_info()
        except ValueError as e:  # a LENET_EXT_* variable with a value it does not take
            parser.exit(2, f"python -m lenet_ext info: {e}\n")
        for key, value in info.items():
            print(f"{key:20} {value}")
    elif args.command == "summary":
        net = lenet_ext.LeNet(args.num_classes, args.in_channels, args.image_size)
        lenet_ext.summary(net, (args.batch, args.in_channels, args.image_size, args.image_size))


if __name__ == "__main__":
    main()
