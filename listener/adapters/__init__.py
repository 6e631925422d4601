"""Adapters: change sources, stores and effects behind the ports of the engine."""
