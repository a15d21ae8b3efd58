"""`deepemd fewshot ...` (being written)."""


def register(subparsers):
    subparsers.add_parser("fewshot", help="(being written)")
