"""``python -m fastmqtt.broker``: same as the ``fastmqtt-broker`` command."""

import sys

from .cli import main

sys.exit(main())
