"""Mixture-of-Partitions."""
