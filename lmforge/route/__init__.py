"""Tiered routing: one model name in front of a cheap and an expensive tier."""
