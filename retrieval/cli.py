"""`deepemd retrieval ...` and `deepemd demo` (being written)."""


def register(subparsers):
    subparsers.add_parser("retrieval", help="(being written)")


def register_demo(subparsers):
    subparsers.add_parser("demo", help="(being written)")
