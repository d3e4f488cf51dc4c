"""The `lorastack` command's entry point. It chooses the memory allocator before anything else
is imported: the process may start itself again, once, with tcmalloc preloaded
(lorastack.adapters.allocator says why), and importing the verbs first would be done twice.
The verbs are composed in lorastack/commands.py.
"""

from __future__ import annotations

from lorastack.adapters import allocator


def main() -> None:
    try:  # tcmalloc before anything allocates
        allocator.reexec()
    except ValueError as exc:
        raise SystemExit(f"error: {exc}") from None
    from lorastack.commands import app

    app()


if __name__ == "__main__":
    main()
