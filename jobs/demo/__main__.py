"""``python -m jobs.demo [--pipeline]``: see ``jobs.demo.build``."""

from jobs.demo.build import main

main()
