"""``python -m twinfer.frontends.console USER``: print a credentials-file line.

The password is read from the terminal (or from stdin's first line); see
:func:`twinfer.frontends.console.auth.main`.
"""

from twinfer.frontends.console.auth import main

raise SystemExit(main())
