"""``python -m bench``: see :mod:`bench.harness`."""

from .harness import main

raise SystemExit(main())
