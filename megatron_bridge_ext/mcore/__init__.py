"""Everything that touches Megatron-Core modules or ``parallel_state``: topology, names, layout detection, tied
embeddings, config, model building (with the local-spec modules of ``modules.py``), the eval forward, the CPU
compatibility patches, and what differs between the supported megatron-core versions (``versions.py``).

Submodules are imported on use (megatron-core is a heavy import); ``tests/test_package_layout.py`` checks that
``parallel_state`` appears nowhere else in the package. Importing any of them first checks the installed
megatron-core's version (from its metadata, without importing it): outside the supported releases the import fails
with one ``UnsupportedMegatronCoreError`` naming the installed and the supported versions, before any model is built.
"""

from megatron_bridge_ext.mcore.versions import require_supported_megatron_core

require_supported_megatron_core()
