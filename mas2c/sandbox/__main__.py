"""`python -m mas2c.sandbox build|status|prune`: the sandbox's own command line (what
`mas2c sandbox` wraps; scripts/ensure-docker.sh runs it before the CLI is needed)."""

import sys

from mas2c.sandbox import main

sys.exit(main())
