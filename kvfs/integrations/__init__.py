"""Adapters that let inference engines use kvfs by configuration alone.

One module per engine (``kvfs.integrations.vllm``, ...); each imports its
engine only inside itself, so importing this package costs nothing. What
they share, without any engine, is in ``kvfs.integrations.kvblocks``.
"""
