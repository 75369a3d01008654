"""Command-line front ends. Each module parses arguments and calls a library function; the
``scripts/`` files and the ``dropres-*`` console entry points both land here."""
