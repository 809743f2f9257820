"""``python -m rewrite``: the same command as the ``rewrite`` console script."""

from rewrite.cli import main

raise SystemExit(main())
