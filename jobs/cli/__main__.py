"""``python -m jobs.cli``: what ``curate submit`` runs on a cluster (same as the ``curate`` script)."""

import sys

from jobs.cli.main import main

sys.exit(main())
