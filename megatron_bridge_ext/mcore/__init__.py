"""Everything that touches Megatron-Core modules or ``parallel_state``: topology, names, layout detection, tied
embeddings, config, model building (with the local-spec modules of ``modules.py``), the eval forward, and the CPU
compatibility patches.

Submodules are imported on use (megatron-core is a heavy import); ``tests/test_package_layout.py`` checks that
``parallel_state`` appears nowhere else in the package.
"""
