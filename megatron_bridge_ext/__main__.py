"""``python -m megatron_bridge_ext``: see :mod:`megatron_bridge_ext.cli`."""

import sys

from megatron_bridge_ext.cli import main

if __name__ == "__main__":
    sys.exit(main())
