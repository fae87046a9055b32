"""``python3 -m popserv``: the ``popserv`` admin command, without the console script."""

from popserv.admin import main

raise SystemExit(main())
