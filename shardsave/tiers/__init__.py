"""A Saver's tiers beyond its save path: the local tier, and restoring from the fastest tier."""
