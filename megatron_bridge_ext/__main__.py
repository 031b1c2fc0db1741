"""``python -m megatron_bridge_ext``: see :mod:`megatron_bridge_ext.cli`."""

from megatron_bridge_ext.cli import entry

if __name__ == "__main__":
    entry()
