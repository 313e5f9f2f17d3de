import io
import sys

from bench.cli import main

if not sys.stdout.isatty() and isinstance(sys.stdout, io.TextIOWrapper):
    sys.stdout.reconfigure(line_buffering=True)  # a CI log shows each progress line as it happens
sys.exit(main())
