"""Algorithms registered outside the ``midpo`` package, as a user's own would be."""
